"""dmtp.store: the layout, bf16 bits, commit/resume semantics of the single shard writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmtp.config import StoreLayout
from dmtp.errors import StoreError
from dmtp.store import (
    ARRAY_NAMES,
    ROW_ARRAYS,
    SequenceRows,
    ShardWriter,
    count_samples,
    create_store,
    decode_hidden_states,
    encode_hidden_states,
    estimate_bytes_per_row,
    hidden_states_as_float32,
    open_store,
)

LAYOUT = StoreLayout(chunk_rows=4, rows_per_file=8)


def make_store(path, hidden_dtype="bfloat16", num_shards=1, **attrs):
    return create_store(
        path,
        attrs={"run": "test", **attrs},
        hidden_size=6,
        vocab_size=50,
        hidden_dtype=hidden_dtype,
        num_shards=num_shards,
        layout=LAYOUT,
    )


def sequence(
    n: int, sample_id: int, seed: int, dtype=torch.bfloat16
) -> tuple[SequenceRows, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 6, generator=g).to(dtype)
    ids = torch.randint(0, 50, (n + 1,), generator=g).numpy().astype(np.int32)
    rows = SequenceRows(
        encode_hidden_states(hidden),
        ids[1:].copy(),
        ids[:-1].copy(),
        np.full(n, sample_id, np.int64),
        np.arange(n) >= n // 2,
    )
    return rows, hidden


def test_layout_has_the_design_arrays_and_attrs(tmp_path):
    store = make_store(tmp_path / "s")
    writer = ShardWriter(store, 0)
    rows, _ = sequence(5, 0, 0)
    writer.append(rows)
    writer.finish()
    store = open_store(tmp_path / "s", require_complete=True)
    shard = store.shard(0)
    assert sorted(shard.group.array_keys()) == sorted(ARRAY_NAMES)
    assert (
        shard.array("hidden_states").dtype == np.uint16
        and store.attrs["hidden_dtype"] == "bfloat16"
    )
    assert {shard.array(n).dtype.name for n in ("tokens", "input_ids")} == {"int32"}
    assert shard.array("sample_ids").dtype == np.int64 and shard.array("is_generated").dtype == bool
    assert store.attrs["schema"] == "dmtp.store/1" and store.attrs["run"] == "test"
    assert (shard.n_committed, shard.n_sequences, shard.complete) == (5, 1, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_hidden_states_round_trip_bit_exact(dtype):
    hidden = (torch.randn(7, 6) * 1e5).to(dtype)  # bf16 holds values float16 would overflow on
    stored = encode_hidden_states(hidden)
    name = str(dtype).removeprefix("torch.")
    assert torch.equal(decode_hidden_states(stored, name), hidden)
    np.testing.assert_array_equal(hidden_states_as_float32(stored, name), hidden.float().numpy())


def test_a_crash_loses_only_uncommitted_rows_and_resume_rewinds_to_them(tmp_path):
    store = make_store(tmp_path / "s")
    writer = ShardWriter(store, 0)
    sequences = [sequence(n, i, i) for i, n in enumerate([5, 7, 3, 9, 4])]
    for rows, _ in sequences[:3]:
        writer.append(rows)
        writer.mark_resume_point()
    # 15 rows appended; one 8-row file flushed, so the newest resume point on disk is row 5.
    del writer  # "crash": never finished
    shard = open_store(tmp_path / "s").shard(0)
    assert (shard.n_committed, shard.n_sequences, shard.complete) == (5, 1, False)

    writer = ShardWriter(open_store(tmp_path / "s"), 0, resume=True)
    assert (writer.total_rows, writer.n_sequences) == (5, 1)
    for rows, _ in sequences[1:]:
        writer.append(rows)
        writer.mark_resume_point()
    writer.finish()
    shard = open_store(tmp_path / "s", require_complete=True).shard(0)
    lengths = [5, 7, 3, 9, 4]
    assert shard.sequence_offsets().tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    stored = decode_hidden_states(shard.read_rows(0, 28).hidden_states, "bfloat16")
    assert torch.equal(stored, torch.cat([h for _, h in sequences]))
    for name in ROW_ARRAYS[1:]:
        expected = np.concatenate([getattr(r, name) for r, _ in sequences])
        assert np.array_equal(shard.read_rows(0, 28).__getattribute__(name), expected), name


def test_readers_never_see_rows_past_n_committed(tmp_path):
    store = make_store(tmp_path / "s")
    writer = ShardWriter(store, 0)
    rows, _ = sequence(12, 0, 0)
    writer.append(rows)  # flushes 8 rows, but no resume point was marked: nothing is committed
    shard = open_store(tmp_path / "s").shard(0)
    assert shard.n_committed == 0 and len(shard.read_rows(0, 100)) == 0


def test_a_second_writer_without_resume_is_refused(tmp_path):
    store = make_store(tmp_path / "s")
    ShardWriter(store, 0)
    with pytest.raises(StoreError, match="already exists; pass --resume"):
        ShardWriter(store, 0)


def test_store_with_other_settings_is_refused_naming_the_difference(tmp_path):
    make_store(tmp_path / "s", max_new_tokens=4)
    make_store(tmp_path / "s", max_new_tokens=4)  # identical: opens (shard writers may race here)
    with pytest.raises(StoreError, match="max_new_tokens: stored 4, requested 8"):
        make_store(tmp_path / "s", max_new_tokens=8)


def test_open_store_errors_name_the_path(tmp_path):
    with pytest.raises(StoreError, match=f"{tmp_path}: no dmtp store here"):
        open_store(tmp_path)
    store = make_store(tmp_path / "s", num_shards=2)
    writer = ShardWriter(store, 0)
    writer.append(sequence(3, 0, 0)[0])
    writer.finish()
    assert not open_store(tmp_path / "s").complete  # shard 1 never ran
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s", require_complete=True)


def test_count_samples_matches_sliding_windows():
    # one 1000-token sequence, windows of 512 every 256 start at 0, 256 and 512 (the last one short)
    assert count_samples([1000], 512, 256) == 3
    assert count_samples([512, 100, 0], 512, 256) == 2
    assert count_samples([1024], 512, 512) == 2


# ----------------------------------------------------------------------------------------------
# feature layers: layer_states [T, n, H] beside hidden_states


def layered_store(path, feature_layers=(0, 2), num_hidden_layers=4):
    return create_store(
        path,
        attrs={"run": "test"},
        hidden_size=6,
        vocab_size=50,
        hidden_dtype="bfloat16",
        num_shards=1,
        layout=LAYOUT,
        feature_layers=feature_layers,
        num_hidden_layers=num_hidden_layers,
    )


def layered_sequence(n: int, sample_id: int, seed: int, n_layers: int = 2):
    rows, hidden = sequence(n, sample_id, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    layers = torch.randn(n, n_layers, 6, generator=g).to(torch.bfloat16)
    rows.layer_states = encode_hidden_states(layers)
    return rows, hidden, layers


def test_feature_layers_are_read_beside_the_final_state(tmp_path):
    store = layered_store(tmp_path / "s")
    writer = ShardWriter(store, 0)
    sequences = [layered_sequence(n, i, i) for i, n in enumerate([5, 7, 6])]
    for rows, _, _ in sequences:
        writer.append(rows)
        writer.mark_resume_point()
    writer.finish()
    store = open_store(tmp_path / "s", require_complete=True)
    assert store.attrs["feature_layers"] == [0, 2] and store.attrs["num_hidden_layers"] == 4
    assert store.feature_layers == (0, 2, 4)  # the final state (4) is hidden_states
    shard = store.shard(0)
    assert shard.array("layer_states").shape == (18, 2, 6)
    assert shard.array("layer_states").dtype == np.uint16  # bf16 bits, like hidden_states
    hidden = torch.cat([h for _, h, _ in sequences]).float()
    layers = torch.cat([lay for _, _, lay in sequences]).float()
    features = shard.read_features(3, 15, [4, 0, 2, -1])
    assert features.dtype == np.float32 and features.shape == (12, 4, 6)
    assert torch.equal(torch.from_numpy(features[:, 0]), hidden[3:15])
    assert torch.equal(torch.from_numpy(features[:, 1]), layers[3:15, 0])
    assert torch.equal(torch.from_numpy(features[:, 2]), layers[3:15, 1])
    assert torch.equal(torch.from_numpy(features[:, 3]), hidden[3:15])  # -1: the final state
    assert shard.read_rows(0, 18).layer_states.shape == (18, 2, 6)
    with pytest.raises(
        StoreError, match=r"feature layer 1 is not stored; this store holds layers \[0, 2, 4\]"
    ):
        shard.read_features(0, 4, [0, 1])
    with pytest.raises(StoreError, match="outside the committed rows"):
        shard.read_features(10, 19, [4])


def test_a_crash_and_resume_keeps_layer_states_aligned(tmp_path):
    store = layered_store(tmp_path / "s")
    writer = ShardWriter(store, 0)
    sequences = [layered_sequence(n, i, i) for i, n in enumerate([5, 7, 3, 9, 4])]
    for rows, _, _ in sequences[:3]:
        writer.append(rows)
        writer.mark_resume_point()
    del writer  # crash: rows 0-7 flushed, committed up to row 5
    writer = ShardWriter(open_store(tmp_path / "s"), 0, resume=True)
    for rows, _, _ in sequences[1:]:
        writer.append(rows)
        writer.mark_resume_point()
    writer.finish()
    shard = open_store(tmp_path / "s", require_complete=True).shard(0)
    expected = torch.cat([lay for _, _, lay in sequences]).float().numpy()
    np.testing.assert_array_equal(shard.read_features(0, 28, [0, 2]), expected)


def test_layer_states_must_match_the_stores_feature_layers(tmp_path):
    writer = ShardWriter(layered_store(tmp_path / "s"), 0)
    with pytest.raises(StoreError, match=r"layer_states shape \(5, 3, 6\) != \(5, 2, 6\)"):
        writer.append(layered_sequence(5, 0, 0, n_layers=3)[0])
    with pytest.raises(StoreError, match=r"layer_states shape None"):
        writer.append(sequence(5, 0, 0)[0])
    plain = ShardWriter(make_store(tmp_path / "plain"), 0)
    with pytest.raises(StoreError, match="the store has no feature layers"):
        plain.append(layered_sequence(5, 0, 0)[0])
    with pytest.raises(StoreError, match="must be ascending, unique and in"):
        layered_store(tmp_path / "bad", feature_layers=(2, 4))  # 4 is the final state


def test_a_store_without_feature_layers_reads_its_final_state(tmp_path):
    store = make_store(tmp_path / "s")  # as import-pt and older collections write it
    writer = ShardWriter(store, 0)
    rows, hidden = sequence(5, 0, 0)
    writer.append(rows)
    writer.finish()
    store = open_store(tmp_path / "s")
    assert "layer_states" not in store.shard(0).group and store.feature_layers == (-1,)
    assert store.shard(0).read_rows(0, 5).layer_states is None
    features = store.shard(0).read_features(0, 5, [-1])
    assert torch.equal(torch.from_numpy(features[:, 0]), hidden.float())
    with pytest.raises(StoreError, match="feature layer 3 is not stored"):
        store.shard(0).read_features(0, 5, [3])


def test_estimated_bytes_count_the_feature_layers():
    assert estimate_bytes_per_row(576, "bfloat16") == 576 * 2 + 17
    assert estimate_bytes_per_row(576, "bfloat16", 3) == 4 * 576 * 2 + 17


class Killed(BaseException):
    """A SIGKILL stand-in: nothing after it runs, not even `finally` blocks that catch Exception."""


# Uneven sequence lengths: the fault tests' commits land inside and across the store's files.
FAULT_LENGTHS = [5, 7, 3, 9, 4, 11, 2]


def fault_sequences() -> list:
    return [layered_sequence(n, i, i) for i, n in enumerate(FAULT_LENGTHS)]


def write_from_resume_point(writer: ShardWriter, sequences: list) -> None:
    """Append the sequences the shard does not hold yet, one resume point each, and finish."""
    for rows, _, _ in sequences[writer.n_sequences :]:
        writer.append(rows)
        writer.mark_resume_point()
    writer.finish()


def test_a_kill_before_any_file_write_is_resumed_to_a_valid_complete_shard(tmp_path, monkeypatch):
    """Kill the writer before its k-th file write, for every k (every commit boundary and every
    moment between a row write and its commit); the resumed writer must always end with a shard
    that validates and holds exactly the sequences, in order."""
    from zarr.storage import _local

    from dmtp.validate import validate_store

    sequences = fault_sequences()

    def write(writer: ShardWriter) -> None:
        write_from_resume_point(writer, sequences)

    real_put, calls = _local._put, []

    def counting_put(*args, **kwargs):
        calls.append(1)
        return real_put(*args, **kwargs)

    clean = layered_store(tmp_path / "clean")
    monkeypatch.setattr(_local, "_put", counting_put)
    write(ShardWriter(clean, 0))
    total = len(calls)
    assert total > 20  # rows, offsets and attrs files: enough boundaries to be a real test

    for k in range(total):
        path = tmp_path / f"kill{k}"
        store = layered_store(path)
        done = []

        def killing_put(*args, k=k, done=done, **kwargs):
            if len(done) == k:
                raise Killed
            done.append(1)
            return real_put(*args, **kwargs)

        monkeypatch.setattr(_local, "_put", killing_put)
        with pytest.raises(Killed):
            write(ShardWriter(store, 0))
        monkeypatch.setattr(_local, "_put", real_put)
        write(ShardWriter(open_store(path), 0, resume=True))
        report = validate_store(path)
        assert report.ok, f"killed before write {k}: {report.summary()}"
        shard = open_store(path, require_complete=True).shard(0)
        assert shard.sequence_offsets().tolist() == [0, *np.cumsum(FAULT_LENGTHS).tolist()], k
        expected = torch.cat([lay for _, _, lay in sequences]).float().numpy()
        np.testing.assert_array_equal(shard.read_features(0, sum(FAULT_LENGTHS), [0, 2]), expected)


def test_a_full_disk_at_any_write_is_one_error_and_resumes_to_the_clean_shard(
    tmp_path, monkeypatch
):
    """ENOSPC at the k-th file write, for every k: DiskFull naming the shard, never a complete
    shard, and after space is freed the resumed writer ends where an uninterrupted one does."""
    import errno

    from zarr.storage import _local

    from dmtp.errors import DiskFull
    from dmtp.validate import validate_store

    sequences = fault_sequences()

    def write(writer: ShardWriter) -> None:
        write_from_resume_point(writer, sequences)

    real_put, calls = _local._put, []
    clean = layered_store(tmp_path / "clean")
    monkeypatch.setattr(_local, "_put", lambda *a, **k: calls.append(1) or real_put(*a, **k))
    write(ShardWriter(clean, 0))
    monkeypatch.setattr(_local, "_put", real_put)
    clean_shard = open_store(tmp_path / "clean", require_complete=True).shard(0)

    for k in range(len(calls)):
        path = tmp_path / f"full{k}"
        store = layered_store(path)
        done = []

        def full_put(*args, k=k, done=done, **kwargs):
            if len(done) >= k:  # the disk stays full once it is
                raise OSError(errno.ENOSPC, "No space left on device")
            done.append(1)
            return real_put(*args, **kwargs)

        monkeypatch.setattr(_local, "_put", full_put)
        with pytest.raises(DiskFull, match=f"{path}/shards/0: No space left on device") as error:
            write(ShardWriter(store, 0))
        assert "\n" not in str(error.value)
        monkeypatch.setattr(_local, "_put", real_put)
        assert not open_store(path).complete
        write(ShardWriter(open_store(path), 0, resume=True))
        assert validate_store(path).ok, k
        shard = open_store(path, require_complete=True).shard(0)
        for name in (*ROW_ARRAYS, "layer_states"):
            np.testing.assert_array_equal(shard.array(name)[:], clean_shard.array(name)[:])
        np.testing.assert_array_equal(shard.sequence_offsets(), clean_shard.sequence_offsets())


@pytest.mark.parametrize("stop_after", [1, 2, 4, 6])
def test_a_writer_stopped_mid_batch_commits_the_batches_before_and_resumes(tmp_path, stop_after):
    """SIGTERM in the middle of a batch: the batches before it are committed (even part of a
    shard file), the batch cut short is dropped, and a resumed writer redoes it."""
    from dmtp.validate import validate_store

    sequences = fault_sequences()
    batches = [sequences[0:2], sequences[2:5], sequences[5:7]]  # resume points after each

    def write(writer: ShardWriter, stop_after: int | None = None) -> None:
        appended = 0
        done = sum(len(b) for b in batches[: [0, 2, 5, 7].index(writer.n_sequences)])
        for batch in batches:
            for rows, _, _ in batch:
                if done:
                    done -= 1
                    continue
                if appended == stop_after:
                    writer.stop_at_resume_point()
                    return
                writer.append(rows)
                appended += 1
            writer.mark_resume_point()
        writer.finish()

    write(ShardWriter(layered_store(tmp_path / "clean"), 0))
    store = layered_store(tmp_path / "stopped")
    write(ShardWriter(store, 0), stop_after=stop_after)
    shard = open_store(tmp_path / "stopped").shard(0)
    committed = max((n for n in (0, 2, 5, 7) if n <= stop_after), default=0)
    assert not shard.complete and shard.n_sequences == committed
    assert shard.n_committed == sum(FAULT_LENGTHS[:committed])
    report = validate_store(tmp_path / "stopped")
    assert {finding.check for finding in report.errors} == {"incomplete"}, report.summary()
    write(ShardWriter(open_store(tmp_path / "stopped"), 0, resume=True))
    a = open_store(tmp_path / "clean", require_complete=True).shard(0)
    b = open_store(tmp_path / "stopped", require_complete=True).shard(0)
    for name in (*ROW_ARRAYS, "layer_states"):
        np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:])
    np.testing.assert_array_equal(a.sequence_offsets(), b.sequence_offsets())
