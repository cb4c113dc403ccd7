"""`dmtp validate`: a healthy store passes; each kind of damage is named, located, fails the CLI."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np
import pytest
import zarr

from dmtp.cli import main
from dmtp.config import StoreLayout
from dmtp.store import open_store
from dmtp.synthetic import write_synthetic_store
from dmtp.validate import validate_store

LAYOUT = StoreLayout(chunk_rows=16, rows_per_file=64)
# shard 0: sequences 0, 2, 4 = rows 0-99, 100-399, 400-406
# shard 1: sequences 1, 3 = rows 0-19, 20-69
LENGTHS = [100, 20, 300, 50, 7]
GENERATED_FROM = [80, 0, 10, 5, 0]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    """An output_dir holding a complete bf16 store with 2 shards."""
    output_dir = tmp_path_factory.mktemp("healthy")
    write_synthetic_store(
        output_dir / "collected_data_final",
        sequence_lengths=LENGTHS,
        hidden_size=16,
        vocab_size=50,
        hidden_dtype="bfloat16",
        num_shards=2,
        layout=LAYOUT,
        generated_from=GENERATED_FROM,
    )
    return output_dir


def test_healthy_store_passes(healthy, tmp_path, capsys):
    report = validate_store(healthy)
    assert report.ok and not report.warnings, report.summary()
    assert (report.rows, report.sequences) == (sum(LENGTHS), len(LENGTHS))
    generated = sum(n - min(g, n) for n, g in zip(LENGTHS, GENERATED_FROM, strict=True))
    assert sum(s.generated_rows for s in report.shards) == generated
    assert report.bytes_checked > 0

    report_path = tmp_path / "report.json"
    assert (
        main(
            ["validate", "--data_dir", str(healthy), "--report", str(report_path), "--no-progress"]
        )
        == 0
    )
    assert "OK" in capsys.readouterr().out
    written = json.loads(report_path.read_text())
    assert written["ok"] is True and written["rows"] == sum(LENGTHS) and written["errors"] == []


def test_sampling_checks_a_fraction(healthy):
    full, sampled = validate_store(healthy), validate_store(healthy, sample=0.25)
    assert sampled.ok
    assert 0 < sampled.bytes_checked < full.bytes_checked


# ----------------------------------------------------------------------------------------------
# damage, one kind at a time, on a copy of the healthy store


def _flip_byte(store: Path) -> None:
    path = store / "shards/0/hidden_states/c/1/0"  # rows 64-127; inner chunk 1 = rows 80-95
    data = bytearray(path.read_bytes())
    chunk_bytes = 16 * 16 * 2 + 4  # rows x hidden x bf16 + crc32c
    data[chunk_bytes + 37] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate_chunk(store: Path) -> None:
    path = store / "shards/0/hidden_states/c/1/0"
    path.write_bytes(path.read_bytes()[:-300])


def _truncate_row_chunk(store: Path) -> None:
    path = store / "shards/0/tokens/c/1"
    path.write_bytes(path.read_bytes()[:-6])


def _delete_chunk_file(store: Path) -> None:
    os.remove(store / "shards/1/tokens/c/0")


def _drop_chunk_from_shard_index(store: Path) -> None:
    """Mark inner chunk 1 (rows 16-31) of shard 1's first hidden file as never written."""
    path = store / "shards/1/hidden_states/c/0/0"
    data = bytearray(path.read_bytes())
    index_size = 4 * 16 + 4  # 4 inner chunks x (offset, nbytes) + crc32c
    index = np.frombuffer(bytes(data[-index_size:-4]), dtype="<u8").reshape(4, 2).copy()
    index[1] = 2**64 - 1
    raw = index.tobytes()
    data[-index_size:] = raw + crc32c.crc32c(raw).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    # what makes this dangerous: zarr reads the lost chunk as zeros, without error
    assert not zarr.open_array(store / "shards/1/hidden_states", mode="r")[16:32].any()


def _overstate_n_committed(store: Path) -> None:
    zarr.open_group(store / "shards/0", mode="a").attrs["n_committed"] = 500


def _token_out_of_vocab(store: Path) -> None:
    zarr.open_array(store / "shards/1/tokens", mode="a")[45] = 50  # vocab_size is 50


def _nan_hidden_state(store: Path) -> None:
    zarr.open_array(store / "shards/1/hidden_states", mode="a")[33, 2] = 0x7FC0  # bf16 NaN bits


def _break_generated_input(store: Path) -> None:
    array = zarr.open_array(store / "shards/0/input_ids", mode="a")
    array[150] = (array[150] + 1) % 50  # row 149 is generated (sequence 2 from row 110)


def _unset_complete(store: Path) -> None:
    zarr.open_group(store / "shards/1", mode="a").attrs["complete"] = False


def _wrong_hidden_size_attr(store: Path) -> None:
    zarr.open_group(store, mode="a").attrs["hidden_size"] = 32


def _wrong_dtype(store: Path) -> None:
    path = store / "shards/0/sample_ids/zarr.json"
    metadata = json.loads(path.read_text())
    metadata["data_type"] = "int32"
    path.write_text(json.dumps(metadata))


# (damage, check, shard, array, chunk, rows)
CASES: dict[
    str, tuple[Callable[[Path], None], str, int, str | None, str | None, list[int] | None]
] = {
    "flipped_byte": (_flip_byte, "checksum", 0, "hidden_states", "c/1/0#1", [80, 96]),
    "truncated_chunk": (_truncate_chunk, "truncated", 0, "hidden_states", "c/1/0", [64, 128]),
    "truncated_row_chunk": (_truncate_row_chunk, "checksum", 0, "tokens", "c/1", [64, 128]),
    "missing_chunk_file": (_delete_chunk_file, "missing_chunk", 1, "tokens", "c/0", [0, 64]),
    "missing_chunk_in_shard": (
        _drop_chunk_from_shard_index,
        "missing_chunk",
        1,
        "hidden_states",
        "c/0/0#1",
        [16, 32],
    ),
    "n_committed_too_large": (_overstate_n_committed, "row_count", 0, "hidden_states", None, None),
    "token_out_of_vocab": (_token_out_of_vocab, "token_range", 1, "tokens", None, [45, 46]),
    "nan": (_nan_hidden_state, "non_finite", 1, "hidden_states", "c/0/0#2", [33, 34]),
    "generated_input": (
        _break_generated_input,
        "generated_input",
        0,
        "input_ids",
        None,
        [149, 151],
    ),
    "incomplete": (_unset_complete, "incomplete", 1, None, None, None),
    "hidden_size_attr": (_wrong_hidden_size_attr, "shape", 0, "hidden_states", None, None),
    "dtype": (_wrong_dtype, "dtype", 0, "sample_ids", None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_named_and_located(case, healthy, tmp_path, capsys):
    damage, check, shard, array, chunk, rows = CASES[case]
    store = tmp_path / "store"
    shutil.copytree(healthy / "collected_data_final", store)
    damage(store)

    report = validate_store(store)
    assert not report.ok
    matching = [
        f
        for f in report.errors
        if (f.check, f.shard, f.array) == (check, shard, array)
        and (chunk is None or f.chunk == chunk)
        and (rows is None or f.rows == rows)
    ]
    assert matching, (
        f"no [{check}] finding at shard {shard} {array} {chunk} {rows}:\n{report.summary()}"
    )

    exit_code = main(["validate", "--data_dir", str(store), "--no-progress"])
    out = capsys.readouterr().out
    assert exit_code == 1
    assert f"[{check}] shard {shard}" in out and "FAILED" in out


def test_stray_partial_file_is_a_warning(healthy, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(healthy / "collected_data_final", store)
    (store / "shards/0/tokens/c/1.3f2a9c.partial").write_bytes(b"half a chunk")
    report = validate_store(store)
    assert report.ok
    assert [(w.check, w.file) for w in report.warnings] == [
        ("stray_file", os.path.join("shards", "0", "tokens", "c", "1.3f2a9c.partial"))
    ]


def test_float16_inf_is_found(tmp_path):
    store = write_synthetic_store(
        tmp_path / "f16", sequence_lengths=[30, 40], hidden_size=8, vocab_size=20,
        hidden_dtype="float16", layout=LAYOUT,
    )  # fmt: skip
    zarr.open_array(store.path / "shards/0/hidden_states", mode="a")[69, 0] = np.inf
    findings = [f for f in validate_store(store.path).errors if f.check == "non_finite"]
    assert [(f.shard, f.rows) for f in findings] == [(0, [69, 70])]


def test_not_a_store_is_a_one_line_error(tmp_path, capsys):
    assert main(["validate", "--data_dir", str(tmp_path)]) == 2
    assert "no dmtp store here" in capsys.readouterr().err


def test_store_written_by_the_writer_has_every_chunk(healthy):
    """Chunks that equal the fill value (sample_ids 0, prompt-only is_generated) are on disk too."""
    store = open_store(healthy)
    assert (store.path / "shards/0/sample_ids/c/0").exists()  # sequence 0: sample_ids all 0


def test_a_shard_without_sequences_is_fine(tmp_path):
    """More shards than prompts: the empty shard is complete and valid, and loaders skip it."""
    from dmtp.data import create_dataloaders

    store = write_synthetic_store(
        tmp_path / "s", sequence_lengths=[30, 20], hidden_size=4, vocab_size=20, num_shards=3
    )
    report = validate_store(store.path)
    assert report.ok, report.summary()
    assert [s.rows for s in report.shards] == [30, 20, 0]
    *_, dataset = create_dataloaders(store.path, loss_on="all")
    assert len(dataset) == 50


# ----------------------------------------------------------------------------------------------
# layer_states [T, n, H]: checked like hidden_states


@pytest.fixture(scope="module")
def layered(tmp_path_factory) -> Path:
    """A complete bf16 store with feature layers 1 and 3 of a 4-layer model: 150 rows."""
    import torch

    from dmtp.store import SequenceRows, ShardWriter, create_store, encode_hidden_states

    path = tmp_path_factory.mktemp("layered") / "store"
    store = create_store(
        path, attrs={}, hidden_size=16, vocab_size=50, hidden_dtype="bfloat16", num_shards=1,
        layout=LAYOUT, feature_layers=[1, 3], num_hidden_layers=4,
    )  # fmt: skip
    writer = ShardWriter(store, 0)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate([70, 80]):
        writer.append(
            SequenceRows(
                hidden_states=encode_hidden_states(torch.randn(n, 16, generator=g).bfloat16()),
                tokens=np.arange(n, dtype=np.int32) % 50,
                input_ids=np.arange(n, dtype=np.int32) % 50,
                sample_ids=np.full(n, i, np.int64),
                is_generated=np.zeros(n, bool),
                layer_states=encode_hidden_states(torch.randn(n, 2, 16, generator=g).bfloat16()),
            )
        )
        writer.mark_resume_point()
    writer.finish()
    return path


def _flip_layer_byte(store: Path) -> None:
    path = store / "shards/0/layer_states/c/1/0/0"  # rows 64-127; inner chunk 2 = rows 96-111
    data = bytearray(path.read_bytes())
    chunk_bytes = 16 * 2 * 16 * 2 + 4  # rows x layers x hidden x bf16 + crc32c
    data[2 * chunk_bytes + 5] ^= 0x01
    path.write_bytes(bytes(data))


def _nan_layer_state(store: Path) -> None:
    zarr.open_array(store / "shards/0/layer_states", mode="a")[140, 1, 3] = 0x7FC0


def _delete_layer_states(store: Path) -> None:
    shutil.rmtree(store / "shards/0/layer_states")


def _shorten_layer_states(store: Path) -> None:
    zarr.open_array(store / "shards/0/layer_states", mode="a").resize((100, 2, 16))


def _delete_layer_file(store: Path) -> None:
    os.remove(store / "shards/0/layer_states/c/2/0/0")


def _more_feature_layers_in_attrs(store: Path) -> None:
    zarr.open_group(store, mode="a").attrs["feature_layers"] = [0, 1, 3]


LAYER_CASES: dict[str, tuple[Callable[[Path], None], str, str | None, list[int] | None]] = {
    "flipped_byte": (_flip_layer_byte, "checksum", "c/1/0/0#2", [96, 112]),
    "nan": (_nan_layer_state, "non_finite", "c/2/0/0#0", [140, 141]),
    "missing_array": (_delete_layer_states, "missing_array", None, None),
    "short_array": (_shorten_layer_states, "row_count", None, None),
    "missing_file": (_delete_layer_file, "missing_chunk", "c/2/0/0", [128, 150]),
    "shape": (_more_feature_layers_in_attrs, "shape", None, None),
}


def test_healthy_layered_store_passes(layered):
    report = validate_store(layered)
    assert report.ok and report.rows == 150, report.summary()


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_states_damage_is_named_and_located(case, layered, tmp_path):
    damage, check, chunk, rows = LAYER_CASES[case]
    store = tmp_path / "store"
    shutil.copytree(layered, store)
    damage(store)
    report = validate_store(store)
    matching = [
        f
        for f in report.errors
        if (f.check, f.shard, f.array) == (check, 0, "layer_states")
        and (chunk is None or f.chunk == chunk)
        and (rows is None or f.rows == rows)
    ]
    assert matching, f"no [{check}] finding at layer_states {chunk} {rows}:\n{report.summary()}"
    assert f"[{check}] shard 0 / layer_states" in report.summary()
