"""`dmtp import-pt`: the original scripts' overlapping `.pt` windows become one copy of each row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dmtp.cli import main
from dmtp.data import create_dataloaders
from dmtp.store import decode_hidden_states, open_store
from dmtp.validate import validate_store

VOCAB = 100
HIDDEN = 8


def make_sequences(
    lengths: list[int], prompt_lengths: list[int], seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Ground truth: prompt rows, then generated rows where input_ids[l + 1] == tokens[l]."""
    rng = np.random.default_rng(seed)
    sequences = []
    for length, prompt in zip(lengths, prompt_lengths, strict=True):
        input_ids = rng.integers(0, VOCAB, length)
        tokens = rng.integers(0, VOCAB, length)
        tokens[: prompt - 1] = (input_ids[1:prompt] + 1) % VOCAB  # prompt outputs never follow
        input_ids[prompt:] = tokens[prompt - 1 : length - 1]
        generated = np.zeros(length, dtype=bool)
        generated[prompt - 1 :] = True  # tokens[prompt - 1] is the first response token
        sequences.append(
            {
                "input_ids": torch.from_numpy(input_ids),
                "tokens": torch.from_numpy(tokens),
                "hidden_states": torch.randn(
                    length, HIDDEN, generator=torch.Generator().manual_seed(length)
                ).to(torch.bfloat16),
                "is_generated": torch.from_numpy(generated),
            }
        )
    return sequences


def write_windows(directory: Path, sequences: list[dict], sample_size: int, stride: int) -> int:
    """The original layout: windows at 0, stride, 2*stride, ..., plus one aligned to the end."""
    windows: dict[str, list[torch.Tensor]] = {
        "hidden_states": [],
        "tokens": [],
        "input_ids": [],
        "sample_ids": [],
    }
    for sample_id, sequence in enumerate(sequences):
        length = len(sequence["tokens"])
        starts = list(range(0, length - sample_size + 1, stride))
        if starts[-1] + sample_size < length:
            starts.append(length - sample_size)
        for start in starts:
            for name in ("hidden_states", "tokens", "input_ids"):
                windows[name].append(sequence[name][start : start + sample_size])
            windows["sample_ids"].append(torch.tensor(sample_id + 1000))
    directory.mkdir(parents=True, exist_ok=True)
    for name, parts in windows.items():
        torch.save(torch.stack(parts), directory / f"{name}.pt")
    return len(windows["sample_ids"])


@pytest.mark.parametrize(
    ("stride", "pass_stride"), [(12, True), (12, False), (32, False), (32, True)]
)
def test_windows_become_unique_rows(tmp_path, capsys, stride, pass_stride):
    sequences = make_sequences([32, 75, 50, 33], [5, 20, 2, 30])
    n_windows = write_windows(
        tmp_path / "old" / "collected_data_final", sequences, sample_size=32, stride=stride
    )
    flags = ["--stride", str(stride)] if pass_stride else []
    argv = [
        "import-pt",
        str(tmp_path / "old"),
        "--vocab_size",
        str(VOCAB),
        "--output_dir",
        str(tmp_path / "new"),
    ]
    assert main([*argv, *flags, "--chunk_rows", "16", "--rows_per_file", "32"]) == 0
    out = capsys.readouterr().out
    assert f"imported {n_windows} windows" in out and f"stride {stride}" in out
    # back-to-back windows look like unrelated ones unless --stride says otherwise
    assert ("share no overlap" in out) == (stride == 32 and not pass_stride)

    store = open_store(tmp_path / "new")
    assert (
        store.hidden_dtype == "bfloat16"
        and store.vocab_size == VOCAB
        and store.hidden_size == HIDDEN
    )
    shard = store.shard(0)
    offsets = shard.sequence_offsets()
    assert np.diff(offsets).tolist() == [len(s["tokens"]) for s in sequences]
    rows = shard.read_rows(0, shard.n_committed)
    for i, sequence in enumerate(sequences):
        part = slice(offsets[i], offsets[i + 1])
        assert rows.tokens[part].tolist() == sequence["tokens"].tolist()
        assert rows.input_ids[part].tolist() == sequence["input_ids"].tolist()
        assert rows.is_generated[part].tolist() == sequence["is_generated"].tolist()
        assert set(rows.sample_ids[part].tolist()) == {1000 + i}
        assert torch.equal(
            decode_hidden_states(rows.hidden_states[part], "bfloat16"), sequence["hidden_states"]
        )
    assert (
        store.attrs["collection"]["stride"] == stride
        and store.attrs["collection"]["sample_size"] == 32
    )
    assert validate_store(store.path).ok

    # the imported store trains like a collected one
    train_dl, _, dataset = create_dataloaders(
        tmp_path / "new", block_length=3, batch_size=4, train_ratio=1.0
    )
    assert len(dataset) == sum(int(s["is_generated"].sum()) for s in sequences)
    assert sum(len(batch["labels"]) for batch in train_dl) == len(dataset)


def test_generated_flag_modes(tmp_path):
    sequences = make_sequences([40], [10])
    write_windows(tmp_path / "old", sequences, sample_size=20, stride=10)
    for mode, expected in (("all", 40), ("none", 0), ("infer", 31)):
        argv = ["import-pt", str(tmp_path / "old"), "--vocab_size", "100", "--generated", mode]
        assert main([*argv, "--output_dir", str(tmp_path / mode)]) == 0
        rows = open_store(tmp_path / mode).shard(0).read_rows(0, 40)
        assert int(rows.is_generated.sum()) == expected


def test_vocab_size_from_the_model_config(tmp_path, capsys):
    write_windows(tmp_path / "old", make_sequences([20], [5]), sample_size=10, stride=5)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"vocab_size": 123}')
    argv = ["import-pt", str(tmp_path / "old"), "--base_model_path", str(tmp_path / "model")]
    assert main([*argv, "--output_dir", str(tmp_path / "new")]) == 0
    assert open_store(tmp_path / "new").vocab_size == 123


def test_user_errors_are_one_line(tmp_path, capsys):
    old = tmp_path / "old"
    write_windows(old, make_sequences([20], [5]), sample_size=10, stride=5)
    out = ["--output_dir", str(tmp_path / "new")]

    assert main(["import-pt", str(tmp_path / "nowhere"), "--vocab_size", "100", *out]) == 2
    assert "missing hidden_states.pt" in capsys.readouterr().err

    assert main(["import-pt", str(old), *out]) == 2
    assert "pass --vocab_size" in capsys.readouterr().err

    assert main(["import-pt", str(old), "--vocab_size", "50", *out]) == 2  # ids go up to 99
    assert "check --vocab_size" in capsys.readouterr().err

    assert main(["import-pt", str(old), "--vocab_size", "100", *out]) == 0
    assert main(["import-pt", str(old), "--vocab_size", "100", *out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-pt", str(old), "--vocab_size", "100", "--overwrite", *out]) == 0

    torch.save({"not": torch.zeros(2)}, old / "sample_ids.pt")
    assert main(["import-pt", str(old), "--vocab_size", "100", "--overwrite", *out]) == 2
    assert "expected one tensor" in capsys.readouterr().err
