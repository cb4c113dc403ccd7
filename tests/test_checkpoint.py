"""dmtp.checkpoint: what a checkpoint folder holds (only trained tensors, no pickle), how the newest
finished one is found, how old ones are rotated; and the sizes of a Qwen2.5-7B-shape head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmtp.checkpoint import (
    STATE_FILE,
    commit_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_path,
    staging_dir,
)
from dmtp.config import DataConfig, TrainConfig, default_feature_layers
from dmtp.errors import DmtpError
from dmtp.synthetic import write_synthetic_store

# Qwen2.5-7B-Instruct's config.json (the layer shape a head borrows), no download needed.
QWEN25_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
}
QWEN25_7B_VOCAB, QWEN25_7B_LAYERS = 152064, 28


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def _finished(folder: Path, step: int) -> Path:
    tmp, final = staging_dir(folder, step)
    tmp.mkdir(parents=True)
    return commit_checkpoint(tmp, final, {"step": step})


def test_only_finished_checkpoints_are_found_newest_last_and_old_ones_rotated(tmp_path):
    for step in (10, 2, 30):
        _finished(tmp_path, step)
    (tmp_path / "checkpoint-40").mkdir()  # killed before its state file: not a checkpoint
    (tmp_path / ".checkpoint-50.tmp").mkdir()  # killed while writing
    (tmp_path / "checkpoint-notes").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-2", "checkpoint-10", "checkpoint-30"
    ]  # fmt: skip
    assert resolve_resume_path("auto", tmp_path) == tmp_path / "checkpoint-30"
    assert resolve_resume_path(None, tmp_path) is None
    assert resolve_resume_path("auto", tmp_path / "fresh") is None  # nothing yet: start fresh
    with pytest.raises(DmtpError, match=f"not a finished checkpoint \\(no {STATE_FILE}\\)"):
        resolve_resume_path(str(tmp_path / "checkpoint-40"), tmp_path)
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-30"]
    assert json.loads((tmp_path / "checkpoint-30" / STATE_FILE).read_text()) == {
        "step": 30,
        "files": {},  # each file's size and crc32c (this folder holds none)
    }


def test_a_checkpoint_and_the_final_head_hold_only_trained_tensors(debug_model_dir, tmp_path):
    """With a base model's vocabulary borrowed, nothing vocabulary-sized is saved: the head's
    weights and their AdamW moments, one-to-one."""
    from dmtp.head import load_head
    from dmtp.train import train

    vocab = 320  # the debug model's
    store = tmp_path / "data"
    write_synthetic_store(store, sequence_lengths=[20] * 4, hidden_size=64, vocab_size=vocab)
    config = TrainConfig(
        train_data_dir=str(store),
        output_dir=str(tmp_path / "out"),
        base_model_path=str(debug_model_dir),
        data=DataConfig(train_ratio=1.0),
        per_device_train_batch_size=16,
        max_steps=2,
        save_steps=1,
        report_to="none",
    )
    result = train(config)
    trained = {
        name: tuple(p.shape)
        for name, p in load_head(result.final_dir).named_parameters()
        if p.requires_grad
    }
    checkpoint = tmp_path / "out" / "checkpoint-1"
    for folder in (checkpoint, result.final_dir):
        assert _safetensors_shapes(folder / "model.safetensors") == trained, folder
    optimizer = _safetensors_shapes(checkpoint / "optimizer.safetensors")
    moments = sorted(shape for name, shape in optimizer.items() if name.endswith(".exp_avg"))
    assert moments == sorted(trained.values())
    assert len(optimizer) == 3 * len(trained)  # exp_avg, exp_avg_sq, step per parameter
    for path in (tmp_path / "out").rglob("*"):
        assert path.suffix not in {".bin", ".pt", ".pth", ".pkl"}, path
        if path.suffix == ".safetensors":
            shapes = _safetensors_shapes(path).values()
            assert not [s for s in shapes if vocab in s], f"{path} holds a vocabulary-sized tensor"


def test_a_qwen25_7b_shape_head_saves_only_its_trained_tensors():
    """Built on the meta device from the config alone: no weights, no download."""
    from dmtp.head import MTPHeadConfig, MTPHeadModel

    feature_layers = [*default_feature_layers(QWEN25_7B_LAYERS), QWEN25_7B_LAYERS]
    config = MTPHeadConfig(
        hidden_size=QWEN25_7B["hidden_size"],
        vocab_size=QWEN25_7B_VOCAB,
        num_hidden_layers=1,
        block_length=16,
        mask_token_id=QWEN25_7B_VOCAB - 1,
        feature_layers=feature_layers,
        num_target_layers=QWEN25_7B_LAYERS,
        decoder_config=QWEN25_7B,
    )
    with torch.device("meta"):
        head = MTPHeadModel(config)
    saved = head.state_dict()  # what save_pretrained and every checkpoint's model.safetensors hold
    trained = {name: p for name, p in head.named_parameters() if p.requires_grad}
    assert set(saved) == set(trained)
    assert not [name for name, t in saved.items() if QWEN25_7B_VOCAB in t.shape]
    parameters = sum(t.numel() for t in saved.values())
    assert 280e6 < parameters < 290e6, parameters  # README: 284 M

    borrowed = 2 * QWEN25_7B_VOCAB * QWEN25_7B["hidden_size"]  # embedding + LM head, never saved
    gb = 1e9
    print(
        f"\nQwen2.5-7B-shape head (1 layer, feature layers {feature_layers}): "
        f"{parameters / 1e6:.1f} M trained parameters in {len(saved)} tensors\n"
        f"  head folder: {2 * parameters / gb:.2f} GB bf16, {4 * parameters / gb:.2f} GB fp32\n"
        f"  checkpoint:  {4 * parameters / gb:.2f} GB fp32 weights + {8 * parameters / gb:.2f} GB "
        f"AdamW moments = {12 * parameters / gb:.2f} GB\n"
        f"  not saved:   the base model's embedding and LM head, {borrowed / 1e6:.0f} M parameters "
        f"({2 * borrowed / gb:.2f} GB bf16)"
    )


def test_a_damaged_checkpoint_is_refused_by_name_and_skipped_by_auto(tmp_path):
    from safetensors.torch import save_file

    from dmtp.checkpoint import checkpoint_problem

    for step in (1, 2):
        tmp, final = staging_dir(tmp_path, step)
        tmp.mkdir(parents=True)
        save_file({"w": torch.arange(64.0)}, str(tmp / "model.safetensors"))
        commit_checkpoint(tmp, final, {"step": step})
    newest = tmp_path / "checkpoint-2"
    (newest / "model.safetensors").unlink()
    assert checkpoint_problem(newest) == "model.safetensors is missing"
    with pytest.raises(DmtpError, match="model.safetensors is missing; pass an older"):
        resolve_resume_path(str(newest), tmp_path)
    warnings: list[str] = []
    assert resolve_resume_path("auto", tmp_path, warnings.append) == tmp_path / "checkpoint-1"
    assert warnings == [
        f"skipping {newest} (model.safetensors is missing); resuming from "
        f"{tmp_path / 'checkpoint-1'} instead"
    ]
    # a checkpoint from before checksums: its safetensors files must at least open
    state = json.loads((tmp_path / "checkpoint-1" / STATE_FILE).read_text())
    del state["files"]
    (tmp_path / "checkpoint-1" / STATE_FILE).write_text(json.dumps(state))
    assert checkpoint_problem(tmp_path / "checkpoint-1") is None
    (tmp_path / "checkpoint-1" / "model.safetensors").write_bytes(b"\x00" * 5)
    assert "model.safetensors does not open" in checkpoint_problem(tmp_path / "checkpoint-1")
    warnings.clear()
    assert resolve_resume_path("auto", tmp_path, warnings.append) is None
    assert warnings[0].endswith("no loadable checkpoint left: starting at step 0")


def test_disk_full_is_recognised_from_python_and_from_safetensors():
    import errno

    from safetensors import SafetensorError

    from dmtp.checkpoint import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    # what safetensors raises on a full tmpfs (measured here)
    assert is_disk_full(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    )
    assert not is_disk_full(SafetensorError("Error while deserializing header: HeaderTooSmall"))
