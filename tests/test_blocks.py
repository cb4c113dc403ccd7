"""Anchored blocks (dmtp.blocks): whole sequences, chain labels, context never crossing a sequence start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dmtp.blocks import AnchoredBlocks, chain_labels
from dmtp.config import StoreLayout
from dmtp.data import IGNORE_INDEX, StoreIndex
from dmtp.store import ShardWriter, create_store, open_store
from dmtp.synthetic import SyntheticStates, synthetic_sequence, write_synthetic_store

HIDDEN, VOCAB, BLOCK = 8, 6, 4  # a tiny vocabulary: prompt rows agree with the chain by chance
LENGTHS = [30, 7, 45, 12, 2, 19, 1]
GENERATED_FROM = [0, 3, 10, 12, 0, 5, 0]  # sequence 3 is all prompt (teacher-forced)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blocks") / "data"
    write_synthetic_store(
        path, sequence_lengths=LENGTHS, hidden_size=HIDDEN, vocab_size=VOCAB, num_shards=2,
        layout=StoreLayout(chunk_rows=8, rows_per_file=16), generated_from=GENERATED_FROM,
    )  # fmt: skip
    return path


def _sequences(path: Path, layers=(-1,)) -> list[dict[str, np.ndarray]]:
    """Every stored sequence, read whole, in sample-id order (synthetic sequence i has sample id i):
    features [n, F, H], tokens, input_ids, is_generated."""
    found = {}
    for shard in open_store(path).shards():
        offsets = shard.sequence_offsets()
        for start, end in zip(offsets[:-1], offsets[1:], strict=True):
            found[int(shard.array("sample_ids")[start])] = {
                "features": shard.read_features(int(start), int(end), list(layers)),
                "tokens": np.asarray(shard.array("tokens")[start:end], dtype=np.int64),
                "input_ids": np.asarray(shard.array("input_ids")[start:end], dtype=np.int64),
                "is_generated": np.asarray(shard.array("is_generated")[start:end], dtype=bool),
            }  # fmt: skip
    return [found[i] for i in sorted(found)]


def _chain_truth(tokens: np.ndarray, input_ids: np.ndarray, row: int, length: int) -> list[int]:
    """Label j of a block anchored at `row`: t_{row+j} while the stored inputs follow the greedy chain."""
    labels = []
    for j in range(length):
        inside = row + j < len(tokens)
        follows = inside and all(input_ids[row + i] == tokens[row + i - 1] for i in range(1, j + 1))
        labels.append(int(tokens[row + j]) if follows else IGNORE_INDEX)
    return labels


def _blocks(path: Path, loss_on: str = "all", **overrides) -> AnchoredBlocks:
    index = StoreIndex(
        open_store(path), loss_on=loss_on, train_ratio=1.0, split_seed=0, max_samples=None
    )
    values = dict(
        split=None, feature_layers=[-1], block_length=BLOCK, sequences_per_batch=3,
        anchors_per_sequence=1000, max_sequence_rows=1000, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return AnchoredBlocks(index, **values)


def _locate(row_features: np.ndarray, sequences: list[dict]) -> tuple[int, int]:
    """(sequence, row) whose stored features are `row_features` (the synthetic noise makes them unique)."""
    hits = [
        (s, r)
        for s, sequence in enumerate(sequences)
        for r in range(len(sequence["tokens"]))
        if np.array_equal(sequence["features"][r], row_features)
    ]
    assert len(hits) == 1, hits
    return hits[0]


# ----------------------------------------------------------------------------------------------
# chain labels


def test_chain_labels_stop_at_the_first_disagreement():
    tokens = np.array([5, 1, 2, 3, 4, 0, 9])
    input_ids = np.array([7, 5, 1, 8, 3, 4, 0])  # row 3 was fed 8, not the model's t_2 = 2
    labels = chain_labels(tokens, input_ids, np.arange(7), 7, 4)
    assert labels.tolist() == [
        [5, 1, 2, -100],
        [1, 2, -100, -100],
        [2, -100, -100, -100],
        [3, 4, 0, 9],
        [4, 0, 9, -100],  # past the end
        [0, 9, -100, -100],
        [9, -100, -100, -100],
    ]


def test_chain_labels_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 15))
        tokens = rng.integers(0, 3, n)
        input_ids = rng.integers(0, 3, n)
        length = int(rng.integers(1, 6))
        rows = np.arange(n)
        expected = [_chain_truth(tokens, input_ids, r, length) for r in rows]
        assert chain_labels(tokens, input_ids, rows, n, length).tolist() == expected


def test_generated_rows_are_fully_labelled():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50, 20)
    input_ids = np.concatenate([[7], tokens[:-1]])  # greedy generation feeds back its own output
    labels = chain_labels(tokens, input_ids, np.arange(20), 20, 5)
    for row in range(20):
        window = [int(tokens[row + j]) if row + j < 20 else IGNORE_INDEX for j in range(5)]
        assert labels[row].tolist() == window


# ----------------------------------------------------------------------------------------------
# batches against the store


@pytest.mark.parametrize(
    ("loss_on", "require_draft_label"),
    [("all", True), ("response", True), ("prompt", True), ("all", False)],
)
def test_each_batch_row_is_one_whole_sequence_with_its_own_labels(
    store_path, loss_on, require_draft_label
):
    sequences = _sequences(store_path)
    blocks = _blocks(store_path, loss_on, require_draft_label=require_draft_label)
    seen = []
    for batch in blocks:
        features, context_mask = batch["context_features"], batch["context_mask"]
        anchors, labels = batch["anchors"], batch["labels"]
        assert features.shape[:2] == context_mask.shape and features.shape[2:] == (1, HIDDEN)
        for i in range(len(features)):
            n = int(context_mask[i].sum())
            assert context_mask[i, :n].all()  # a prefix: padding only after the sequence
            s, first = _locate(features[i, 0].numpy(), sequences)
            sequence = sequences[s]
            assert first == 0 and n == len(sequence["tokens"])  # from its start, every row
            assert np.array_equal(features[i, :n].numpy(), sequence["features"])
            assert not features[i, n:].any()
            seen.append(s)

            real = anchors[i] >= 0
            assert not (anchors[i][real.logical_not()] != -1).any()
            assert (labels[i][~real] == IGNORE_INDEX).all()
            truth = [
                _chain_truth(sequence["tokens"], sequence["input_ids"], r, BLOCK) for r in range(n)
            ]
            expected_anchors = [
                r for r in range(n)
                if (not require_draft_label or truth[r][1] != IGNORE_INDEX)
                and (loss_on == "all" or sequence["is_generated"][r] == (loss_on == "response"))
            ]  # fmt: skip
            assert anchors[i][real].tolist() == expected_anchors, (s, loss_on)
            assert labels[i][real].tolist() == [truth[r] for r in expected_anchors]
    # every sequence with a row to anchor once per epoch; a 1-row sequence has no block
    assert sorted(seen) == [s for s, n in enumerate(LENGTHS) if n > 1]


def test_long_sequences_are_cut_into_segments_that_see_only_their_own_rows(store_path):
    sequences = _sequences(store_path)
    blocks = _blocks(store_path, max_sequence_rows=10, sequences_per_batch=4)
    covered: dict[int, set[int]] = {}
    for batch in blocks:
        for i in range(len(batch["context_features"])):
            n = int(batch["context_mask"][i].sum())
            s, first = _locate(batch["context_features"][i, 0].numpy(), sequences)
            sequence = sequences[s]
            assert first % 10 == 0 and n == min(10, len(sequence["tokens"]) - first)
            assert np.array_equal(
                batch["context_features"][i, :n].numpy(), sequence["features"][first : first + n]
            )
            covered.setdefault(s, set()).update(range(first, first + n))
            real = batch["anchors"][i] >= 0
            for anchor, labels in zip(
                batch["anchors"][i][real].tolist(), batch["labels"][i][real].tolist(), strict=True
            ):
                assert 0 <= anchor < n
                # labels may run past the segment, never past the sequence
                assert labels == _chain_truth(
                    sequence["tokens"], sequence["input_ids"], first + anchor, BLOCK
                )
    assert covered == {s: set(range(n)) for s, n in enumerate(LENGTHS) if n > 1}


def test_anchors_are_sampled_reproducibly_and_ranks_are_disjoint(store_path):
    def epoch(blocks: AnchoredBlocks, number: int) -> list[list[int]]:
        blocks.set_epoch(number)
        return [row.tolist() for batch in blocks for row in batch["anchors"]]

    a = _blocks(store_path, anchors_per_sequence=3)
    b = _blocks(store_path, anchors_per_sequence=3)
    assert epoch(a, 0) == epoch(b, 0) and epoch(a, 1) != epoch(a, 0)
    assert all(len(row) <= 3 for row in epoch(a, 0))

    sequences = _sequences(store_path)
    shares = []
    for rank in (0, 1):
        blocks = _blocks(store_path, rank=rank, world_size=2, sequences_per_batch=2)
        shares.append([
            _locate(batch["context_features"][i, 0].numpy(), sequences)[0]
            for batch in blocks for i in range(len(batch["context_features"]))
        ])  # fmt: skip
        assert len(blocks) == -(-len(shares[-1]) // 2)
    assert len(shares[0]) == len(shares[1]) and not set(shares[0]) & set(shares[1])


def test_a_head_on_a_batch_equals_the_head_on_each_sequence_alone(store_path):
    """The end-to-end form of 'context never crosses a sequence start': packed, padded batches give
    each block what it gives with only its own sequence's rows up to its anchor."""
    from dmtp.head import build_head

    head = build_head(
        hidden_size=HIDDEN, vocab_size=VOCAB + 1, mask_token_id=VOCAB, block_length=BLOCK,
        feature_layers=[-1], num_target_layers=-1,
    ).eval()  # fmt: skip
    blocks = _blocks(store_path, anchors_per_sequence=3, sequences_per_batch=4)
    checked = 0
    with torch.no_grad():
        for batch in blocks:
            ids = torch.full_like(batch["labels"], VOCAB)
            ids[..., 0] = batch["labels"][..., 0].clamp(min=0)
            packed = head(
                in_hidden_states=batch["context_features"], input_ids=ids,
                anchors=batch["anchors"], context_mask=batch["context_mask"],
            ).hidden_states  # fmt: skip
            for i, a in (batch["anchors"] >= 0).nonzero().tolist():
                anchor = int(batch["anchors"][i, a])
                own = batch["context_features"][i : i + 1, : anchor + 1]
                alone = head(in_hidden_states=own, input_ids=ids[i : i + 1, a]).hidden_states
                torch.testing.assert_close(packed[i, a], alone[0, 0], rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked >= 10


def test_feature_layers_are_read_in_the_requested_order(tmp_path):
    """A store with feature layers: context_features[:, :, j] is layer feature_layers[j]."""
    store = create_store(
        tmp_path / "layers", attrs={}, hidden_size=HIDDEN, vocab_size=VOCAB, hidden_dtype="float32",
        num_shards=1, layout=StoreLayout(chunk_rows=8, rows_per_file=16), feature_layers=[0, 1],
        num_hidden_layers=3,
    )  # fmt: skip
    states = SyntheticStates(HIDDEN, VOCAB)
    writer = ShardWriter(store, 0)
    stacks = []
    for i, length in enumerate([9, 14]):
        rng = np.random.default_rng([0, i])
        rows = synthetic_sequence(states, length, VOCAB, 0, "float32", rng)
        rows.layer_states = rng.standard_normal((length, 2, HIDDEN)).astype(np.float32)
        stacks.append((rows.layer_states, rows.hidden_states))
        writer.append(rows)
        writer.mark_resume_point()
    writer.finish({})
    assert open_store(store.path).feature_layers == (0, 1, 3)

    blocks = _blocks(store.path, feature_layers=[3, 0], sequences_per_batch=2, shuffle=False)
    (batch,) = list(blocks)
    for i, (layer_states, final) in enumerate(stacks):
        n = len(final)
        got = batch["context_features"][i, :n].numpy()
        assert np.array_equal(got[:, 0], final) and np.array_equal(got[:, 1], layer_states[:, 0])


def test_teacher_states_are_the_final_states_at_each_labels_row(store_path):
    """label_states[i, a, j] is the stored final state of the row whose output is label j: the
    base model's distribution over that label comes from it (--distill_weight)."""
    sequences = _sequences(store_path)
    blocks = _blocks(store_path, teacher_states=True)
    checked = 0
    for batch in blocks:
        for i in range(len(batch["anchors"])):
            s, _ = _locate(batch["context_features"][i, 0].numpy(), sequences)
            final = sequences[s]["features"][:, 0]
            for a, row in enumerate(batch["anchors"][i].tolist()):
                if row < 0:
                    assert not batch["label_states"][i, a].any()
                    continue
                for j in range(BLOCK):
                    if batch["labels"][i, a, j] != IGNORE_INDEX:
                        assert np.array_equal(
                            batch["label_states"][i, a, j].numpy(), final[row + j]
                        )
                        checked += 1
    assert checked > 100
