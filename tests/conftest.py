"""Shared fixtures: a tiny random Qwen2 base model, paths to the real prompt data, GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
LONGWRITER_EN = SHARED_DATA / "longwriter" / "longbench_write_en.jsonl"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test computes on one thread: on a shared 2-core box two threads spin-wait each other
    (a 20k-parameter training step takes 100 ms instead of 7). Subprocesses get OMP_NUM_THREADS=1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def debug_model_dir(tmp_path_factory) -> Path:
    """An HF folder holding a tiny random Qwen2ForCausalLM (float32) and its ChatML tokenizer."""
    from dmtp.debug_model import save_debug_model

    return save_debug_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def longwriter_prompts() -> Path:
    if not LONGWRITER_EN.exists():
        pytest.skip(f"shared data not found at {LONGWRITER_EN}")
    return LONGWRITER_EN
