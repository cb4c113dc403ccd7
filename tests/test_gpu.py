"""CUDA code paths: bf16 collection, bf16 training, speculative decoding on the GPU.

Marked `gpu`: skipped without CUDA (conftest.py). One chain, as a user runs it: collect on the GPU
in bfloat16, validate, train a head with bf16 autocast, evaluate it losslessly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_bf16_collect_train_evaluate_on_cuda(debug_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from dmtp.collect import collect
    from dmtp.config import CollectConfig, StoreLayout
    from dmtp.store import decode_hidden_states, open_store
    from dmtp.validate import validate_store

    prompts = tmp_path / "prompts.jsonl"
    texts = [f"Write a story about river number {i} and the sea." for i in range(16)]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    result = collect(
        CollectConfig(
            base_model_path=str(debug_model_dir),
            input_data_path=str(prompts),
            output_dir=str(tmp_path / "data"),
            max_new_tokens=48,
            batch_size=8,
            device="cuda",
            dtype="bfloat16",
            layout=StoreLayout(chunk_rows=64, rows_per_file=256),
        )
    )
    assert result.complete
    store = open_store(tmp_path / "data", require_complete=True)
    assert store.hidden_dtype == "bfloat16"
    assert validate_store(store.path).ok

    # stored bf16 states equal a teacher-forced bf16 forward on the GPU (within bf16 rounding)
    model = (
        AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.bfloat16).cuda().eval()
    )
    shard = store.shard(0)
    offsets = shard.sequence_offsets()
    rows = shard.read_rows(int(offsets[0]), int(offsets[1]))
    with torch.no_grad():
        out = model(
            torch.from_numpy(rows.input_ids.astype(np.int64))[None].cuda(),
            output_hidden_states=True,
        )
    stored = decode_hidden_states(rows.hidden_states, "bfloat16").cuda()
    torch.testing.assert_close(
        stored.float(), out.hidden_states[-1][0].float(), atol=0.1, rtol=0.05
    )
    agreement = (out.logits[0].argmax(-1).cpu().numpy() == rows.tokens).mean()
    assert agreement > 0.95  # bf16 incremental vs full forward may flip rare near-ties

    head_dir = tmp_path / "head"
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmtp.train",
            "--train_data_dir",
            str(tmp_path / "data"),
            "--output_dir",
            str(head_dir),
            "--base_model_path",
            str(debug_model_dir),
            "--device",
            "cuda",
            "--mixed_precision",
            "bf16",
            "--max_steps",
            "60",
            "--learning_rate",
            "1e-3",
            "--per_device_train_batch_size",
            "64",
            "--logging_steps",
            "10",
            "--report_to",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert (head_dir / "final" / "model.safetensors").exists()

    report = tmp_path / "eval.json"
    evaluate = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmtp.evaluate",
            "--base_model_path",
            str(debug_model_dir),
            "--head_path",
            str(head_dir / "final"),
            "--input_data_path",
            str(prompts),
            "--max_prompts",
            "4",
            "--max_new_tokens",
            "32",
            "--device",
            "cuda",
            "--output",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    summary = json.loads(report.read_text())
    assert summary["lossless"] is True
    head = summary["drafters"]["head"]["overall"]
    assert head["tau"] >= 1.0 and head["speedup"] > 0 and head["rounds"] > 0
