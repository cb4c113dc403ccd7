"""Chunk-aware loaders: labels equal the stored tokens; splits and ranks partition the examples."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmtp.config import StoreLayout
from dmtp.data import ExampleReader, create_dataloaders
from dmtp.errors import DmtpError, StoreError
from dmtp.store import decode_hidden_states, open_store
from dmtp.synthetic import write_synthetic_store

LAYOUT = StoreLayout(chunk_rows=16, rows_per_file=64)
LENGTHS = [100, 20, 300, 50, 7, 33, 80, 41, 64, 12]
GENERATED_FROM = [80, 0, 10, 5, 0, 3, 9, 40, 0, 12]  # the last sequence has no generated row


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    """An output_dir holding a complete 3-shard bf16 store."""
    path = tmp_path_factory.mktemp("data")
    write_synthetic_store(
        path / "collected_data_final",
        sequence_lengths=LENGTHS,
        hidden_size=16,
        vocab_size=50,
        hidden_dtype="bfloat16",
        num_shards=3,
        layout=LAYOUT,
        generated_from=GENERATED_FROM,
    )
    return path


def expected_examples(
    store_path: Path, block_length: int, loss_on: str
) -> dict[tuple[int, int], dict]:
    """Ground truth from whole-shard reads: (shard, row) -> labels, hidden state, sample_id."""
    store = open_store(store_path)
    examples = {}
    for shard in store.shards():
        rows = shard.read_rows(0, shard.n_committed)
        offsets = shard.sequence_offsets()
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
            for row in range(start, stop):
                generated = bool(rows.is_generated[row])
                if (loss_on == "response" and not generated) or (loss_on == "prompt" and generated):
                    continue
                labels = [
                    int(rows.tokens[row + j]) if row + j < stop else -100
                    for j in range(block_length)
                ]
                examples[(shard.index, row)] = {
                    "labels": labels,
                    "hidden": decode_hidden_states(rows.hidden_states[row], store.hidden_dtype),
                    "sample_id": int(rows.sample_ids[row]),
                }
    return examples


def collect(loader) -> list[tuple[int, int]]:
    """(shard, row) of every example a loader yields, in order."""
    positions = []
    for batch in loader:
        positions += list(zip(batch["shard"].tolist(), batch["row"].tolist(), strict=True))
    return positions


# ----------------------------------------------------------------------------------------------
# the property: every example is right, and every example appears exactly once


@settings(
    max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=7),
    prompt_fraction=st.floats(0.0, 1.0),
    num_shards=st.integers(1, 3),
    chunk_rows=st.sampled_from([2, 4, 16]),
    block_length=st.integers(1, 6),
    loss_on=st.sampled_from(["response", "prompt", "all"]),
    batch_size=st.integers(1, 9),
    train_ratio=st.sampled_from([0.5, 0.9, 1.0]),
    seed=st.integers(0, 3),
)
def test_every_label_equals_the_stored_tokens(
    lengths,
    prompt_fraction,
    num_shards,
    chunk_rows,
    block_length,
    loss_on,
    batch_size,
    train_ratio,
    seed,
):
    with tempfile.TemporaryDirectory() as directory:
        store = write_synthetic_store(
            Path(directory) / "store",
            sequence_lengths=lengths,
            hidden_size=4,
            vocab_size=30,
            num_shards=num_shards,
            layout=StoreLayout(chunk_rows=chunk_rows, rows_per_file=chunk_rows * 2),
            generated_from=[int(n * prompt_fraction) for n in lengths],
            seed=seed,
        )
        truth = expected_examples(store.path, block_length, loss_on)
        try:
            train_dl, val_dl, dataset = create_dataloaders(
                store.path, block_length, batch_size, train_ratio, loss_on=loss_on,
                seed=seed, shuffle_chunks=2, return_positions=True,
            )  # fmt: skip
        except StoreError as error:
            assert "no training examples" in str(error)  # every train sequence lacks such rows
            return
        seen: Counter[tuple[int, int]] = Counter()
        for loader in (train_dl, val_dl):
            batches = 0
            for batch in loader:
                batches += 1
                assert batch["input_ids"].eq(store.vocab_size).all()  # mask_token_id = vocab_size
                assert batch["attention_mask"].eq(1).all()
                for i, key in enumerate(
                    zip(batch["shard"].tolist(), batch["row"].tolist(), strict=True)
                ):
                    seen[key] += 1
                    assert batch["labels"][i].tolist() == truth[key]["labels"], key
                    assert torch.equal(batch["in_hidden_states"][i], truth[key]["hidden"]), key
            assert batches == len(loader)
        assert seen == Counter(truth.keys())  # each example exactly once across train and val
        assert len(dataset) == len(truth)
        for i in {0, len(dataset) // 2, len(dataset) - 1}:
            key = dataset.locate(i)
            assert dataset[i]["labels"].tolist() == truth[key]["labels"]


def test_train_and_validation_sequences_are_disjoint(output_dir):
    train_dl, val_dl, _ = create_dataloaders(
        output_dir, 4, 8, 0.7, loss_on="all", return_positions=True
    )
    truth = expected_examples(output_dir / "collected_data_final", 4, "all")
    train = {truth[key]["sample_id"] for key in collect(train_dl)}
    val = {truth[key]["sample_id"] for key in collect(val_dl)}
    assert train and val and not train & val
    assert train | val == set(range(len(LENGTHS)))
    assert len(train) == round(0.7 * len(LENGTHS))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_are_disjoint_and_cover_the_split(output_dir, num_workers):
    single, _, _ = create_dataloaders(output_dir, return_positions=True, batch_size=8)
    split = collect(single)
    shares = []
    for rank in (0, 1):
        train_dl, _, _ = create_dataloaders(
            output_dir, batch_size=8, rank=rank, world_size=2, even_ranks=False,
            num_workers=num_workers, return_positions=True,
        )  # fmt: skip
        shares.append(collect(train_dl))
        assert len(shares[-1]) == len(set(shares[-1]))
        assert len(train_dl) == sum(1 for _ in train_dl)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(split)
    assert abs(len(shares[0]) - len(shares[1])) <= max(num_workers, 1)  # slices differ by <= 1


def test_even_ranks_run_the_same_number_of_steps(output_dir):
    lengths, shares = [], []
    for rank in (0, 1, 2):
        train_dl, _, _ = create_dataloaders(
            output_dir, batch_size=5, rank=rank, world_size=3, num_workers=2, return_positions=True
        )
        shares.append(collect(train_dl))
        lengths.append(len(train_dl))
        assert len(train_dl) == sum(1 for _ in train_dl)
    assert len(set(lengths)) == 1 and len({len(s) for s in shares}) == 1
    assert not set(shares[0]) & set(shares[1]) and not set(shares[1]) & set(shares[2])


def test_same_seed_same_order_and_epochs_differ(output_dir):
    def order(seed: int, epoch: int) -> list[tuple[int, int]]:
        train_dl, _, _ = create_dataloaders(
            output_dir, batch_size=8, seed=seed, return_positions=True
        )
        train_dl.set_epoch(epoch)
        return collect(train_dl)

    first = order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) == first
    assert order(seed=1, epoch=1) != first and sorted(order(seed=1, epoch=1)) == sorted(first)
    assert order(seed=2, epoch=0) != first


def test_loader_reads_each_chunk_once(output_dir, monkeypatch):
    """Chunk-aware: one decompression per chunk per epoch, not one per example."""
    reads: Counter[tuple[int, int]] = Counter()
    original = ExampleReader.read_chunk

    def counting(self, position, chunk, split):
        reads[(position, chunk)] += 1
        return original(self, position, chunk, split)

    monkeypatch.setattr(ExampleReader, "read_chunk", counting)
    train_dl, _, _ = create_dataloaders(output_dir, batch_size=8, loss_on="all", train_ratio=1.0)
    n_examples = sum(len(batch["labels"]) for batch in train_dl)
    assert n_examples == sum(LENGTHS)
    assert set(reads.values()) == {1}
    store = open_store(output_dir)
    assert len(reads) == sum(-(-shard.n_committed // 16) for shard in store.shards())


def test_original_call_and_item_keys(output_dir):
    train_dl, val_dl, dataset = create_dataloaders(
        data_dir=str(output_dir / "collected_data_final"),
        block_length=4,
        batch_size=32,
        train_ratio=0.9,
    )
    sample = dataset[0]
    assert set(sample) == {"in_hidden_states", "input_ids", "labels", "attention_mask"}
    assert (
        sample["in_hidden_states"].shape == (16,)
        and sample["in_hidden_states"].dtype == torch.bfloat16
    )
    assert sample["input_ids"].tolist() == [50] * 4
    batch = next(iter(train_dl))
    assert batch["in_hidden_states"].shape == (32, 16) and batch["labels"].shape == (32, 4)
    assert batch["labels"].dtype == torch.long and batch["input_ids"].dtype == torch.long
    assert len(val_dl) > 0


def test_a_head_of_its_own_vocabulary_consumes_a_batch_as_the_guide_does(output_dir):
    """The guide's loop: create_dataloaders' batch straight into the head, then the seed objective."""
    from dmtp.head import build_head
    from dmtp.loss import block_loss, loss_weights, noised_input_ids, sample_masking
    from dmtp.schedules import get_schedule

    torch.manual_seed(0)
    train_dl, _, _ = create_dataloaders(output_dir, block_length=4, batch_size=8, loss_on="all")
    batch = next(iter(train_dl))
    assert set(batch) == {"in_hidden_states", "input_ids", "labels", "attention_mask"}
    # the seed's head: the final state of one position, its own embedding and LM head
    head = build_head(
        hidden_size=16, vocab_size=51, mask_token_id=50, block_length=4, feature_layers=[-1],
        num_target_layers=-1,
    )  # fmt: skip
    out = head(
        in_hidden_states=batch["in_hidden_states"],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
    )
    assert out.logits.shape == (8, 4, 51) and torch.isfinite(out.logits).all()

    schedule = get_schedule("linear")
    generator = torch.Generator().manual_seed(0)
    t, masked = sample_masking(batch["labels"], schedule, 1e-3, generator, objective="seed")
    states = head(
        in_hidden_states=batch["in_hidden_states"],
        input_ids=noised_input_ids(batch["labels"], masked, head.config.mask_token_id),
        attention_mask=batch["attention_mask"],
    ).hidden_states[:, 0]
    loss = block_loss(
        head, states, batch["labels"], masked, loss_weights(schedule, t, "scheduler", "seed"),
        objective="seed",
    )  # fmt: skip
    loss.backward()
    assert loss.item() > 0 and head.fc.weight.grad.abs().sum() > 0


def test_options(output_dir):
    truth = {
        lo: expected_examples(output_dir / "collected_data_final", 2, lo)
        for lo in ("response", "prompt")
    }
    for loss_on, expected in truth.items():
        *_, dataset = create_dataloaders(output_dir, block_length=2, loss_on=loss_on)
        assert len(dataset) == len(expected)
    *_, dataset = create_dataloaders(output_dir, mask_token_id=7)
    assert dataset[3]["input_ids"].tolist() == [7] * 4
    # max_samples counts sample_size windows (512 / 256 here): each short sequence is one sample
    train_dl, val_dl, dataset = create_dataloaders(
        output_dir, max_samples=3, loss_on="all", train_ratio=1.0, return_positions=True
    )
    assert len(dataset) == sum(LENGTHS[:3])
    with pytest.raises(DmtpError, match="loss_on"):
        create_dataloaders(output_dir, loss_on="everything")


def test_incomplete_store_is_refused_unless_allowed(tmp_path):
    store = write_synthetic_store(
        tmp_path / "s", sequence_lengths=[40, 30], hidden_size=4, vocab_size=30
    )
    zarr.open_group(store.path / "shards/0", mode="a").attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        create_dataloaders(store.path)
    *_, dataset = create_dataloaders(store.path, allow_incomplete=True, loss_on="all")
    assert len(dataset) == 70


def test_teacher_forced_store_needs_loss_on_all(tmp_path):
    store = write_synthetic_store(
        tmp_path / "s",
        sequence_lengths=[40, 30],
        hidden_size=4,
        vocab_size=30,
        generated_from=[40, 30],
    )
    with pytest.raises(StoreError, match="loss_on='all'"):
        create_dataloaders(store.path)


def test_corrupt_chunk_fails_loudly(tmp_path):
    store = write_synthetic_store(
        tmp_path / "s", sequence_lengths=[200], hidden_size=4, vocab_size=30, layout=LAYOUT
    )
    path = store.path / "shards/0/hidden_states/c/1/0"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    train_dl, _, _ = create_dataloaders(store.path, train_ratio=1.0)
    with pytest.raises(StoreError, match=r"shard 0 rows 64-79 are unreadable.*dmtp validate"):
        for _ in train_dl:
            pass
