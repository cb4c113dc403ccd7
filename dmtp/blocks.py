"""Training batches as the head decodes: whole sequences, many anchored blocks each (DESIGN §4).

    loader = anchored_block_loader(index, split=TRAIN, feature_layers=[2, 15, 28], block_length=4,
                                   sequences_per_batch=8, anchors_per_sequence=64, seed=0)
    for batch in loader:   # context_features [B, S, F, H], context_mask [B, S],
        ...                # anchors [B, A] (row of the block's bonus token; -1 = padding),
                           # labels [B, A, L] (-100 where not a label)

A block anchored at row l is `[t_l, t_{l+1}, …, t_{l+L-1}]` at positions l+1 …, and sees the
context rows ≤ l of its own sequence: exactly what a decoding round sees after the base model
produced `t_l` at row l. One forward computes the context of a sequence once for all its blocks,
as SpecForge's DFlash trainer does, instead of one example per row.

Label validity follows the greedy chain: label j ≥ 1 of anchor l is `t_{l+j}` only where
`input_ids[l+i] == t_{l+i-1}` for every 1 ≤ i ≤ j, i.e. the stored continuation is what the base
model itself would have fed back. Generated rows always satisfy it; prompt rows and teacher-forced
text do only where the model agrees with the text, so a disagreement masks the rest of the block.

Sequences longer than `max_sequence_rows` are cut into segments that do not overlap; a segment's
blocks see context from the segment's start only (so the first blocks of a later segment see
little context: keep `max_sequence_rows` above the typical sequence length).
Each epoch's order is a pure function of (seed, epoch); ranks take disjoint, equal shares.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from dmtp.data import EXCLUDED, IGNORE_INDEX, StoreIndex
from dmtp.errors import StoreError
from dmtp.store import FINAL_LAYER, open_store


def chain_labels(
    tokens: np.ndarray, input_ids: np.ndarray, rows: np.ndarray, end: int, block_length: int
) -> np.ndarray:
    """`[N, L]` labels of blocks anchored at `rows` of one sequence ending (exclusive) at `end`.

    tokens, input_ids: the sequence's rows from its first row on (row r at index r).
    """
    positions = rows[:, None] + np.arange(block_length)[None, :]
    inside = positions < end
    clipped = np.minimum(positions, end - 1)
    labels = np.where(inside, tokens[clipped], IGNORE_INDEX).astype(np.int64)
    # agrees[r] : input_ids[r] == tokens[r-1], the chain continues into row r
    agrees = np.zeros(end + 1, dtype=bool)
    agrees[1:end] = input_ids[1:end] == tokens[: end - 1]
    follows = agrees[np.minimum(positions, end)]
    follows[:, 0] = True
    chain = np.cumprod(follows, axis=1).astype(bool)
    return np.where(chain & inside, labels, IGNORE_INDEX)


@dataclass(frozen=True)
class Segment:
    position: int  # index into StoreIndex.shards
    start: int  # first row (a sequence start, or a cut inside a long sequence)
    stop: int  # rows [start, stop) are the context and the anchors
    end: int  # the sequence's end row (labels may reach past stop, never past end)


class AnchoredBlocks(IterableDataset):
    """Batches of whole sequences (segments) with up to `anchors_per_sequence` blocks each."""

    def __init__(
        self,
        index: StoreIndex,
        *,
        split: int | None,
        feature_layers: Sequence[int],
        block_length: int,
        sequences_per_batch: int,
        anchors_per_sequence: int,
        max_sequence_rows: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        require_draft_label: bool = True,
        teacher_states: bool = False,
    ):
        self.index = index
        self.feature_layers = list(feature_layers)
        self.block_length = block_length
        self.sequences_per_batch = sequences_per_batch
        self.anchors_per_sequence = anchors_per_sequence
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        # decode objectives need t_{l+1}; the seed's also learns from blocks with t_l alone
        self.require_draft_label = require_draft_label
        # the base model's final state at each label's row: its distribution over that token
        self.teacher_states = teacher_states
        self.epoch = 0
        self.segments = self._segments(split, max_sequence_rows)
        self._shards: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}}

    def _segments(self, split: int | None, max_rows: int) -> list[Segment]:
        segments = []
        for position, shard in enumerate(self.index.shards):
            for s in range(len(shard.split)):
                if shard.split[s] == EXCLUDED or (split is not None and shard.split[s] != split):
                    continue
                first, end = int(shard.offsets[s]), int(shard.offsets[s + 1])
                for start in range(first, end - 1, max_rows):
                    segments.append(Segment(position, start, min(start + max_rows, end), end))
        return segments

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_segments(self) -> list[Segment]:
        order = np.arange(len(self.segments))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        per_rank = len(order) // self.world_size if self.world_size > 1 else len(order)
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [self.segments[i] for i in mine]

    def __len__(self) -> int:
        per_rank = (
            len(self.segments) // self.world_size if self.world_size > 1 else len(self.segments)
        )
        return -(-per_rank // self.sequences_per_batch)

    @property
    def n_examples(self) -> int:
        """Anchors per epoch, roughly (each segment's row count, capped per segment)."""
        return sum(min(s.stop - s.start, self.anchors_per_sequence) for s in self.segments)

    def shard(self, position: int) -> Any:
        """The store shard behind `index.shards[position]`, opened once per process."""
        if position not in self._shards:
            self._shards[position] = open_store(self.index.path).shard(
                self.index.shards[position].shard
            )
        return self._shards[position]

    def read_segment(
        self, segment: Segment, rng: np.random.Generator | None
    ) -> dict[str, np.ndarray]:
        """Features `[S, F, H]`, anchors `[A]` (segment rows) and labels `[A, L]` of one segment."""
        shard = self.shard(segment.position)
        label_stop = min(segment.stop + self.block_length, segment.end)
        try:
            features = shard.read_features(segment.start, segment.stop, self.feature_layers)
            tokens = np.asarray(shard.array("tokens")[segment.start : label_stop], dtype=np.int64)
            input_ids = np.asarray(
                shard.array("input_ids")[segment.start : label_stop], dtype=np.int64
            )
            generated = np.asarray(
                shard.array("is_generated")[segment.start : label_stop], dtype=bool
            )
        except ValueError as error:  # zarr's crc32c mismatch, for one
            raise StoreError(
                f"{self.index.path}: shard {shard.index} rows {segment.start}-{label_stop - 1} are "
                f"unreadable ({error}); run `dmtp validate --data_dir {self.index.path}`"
            ) from error
        end = label_stop - segment.start
        rows = np.arange(segment.stop - segment.start)
        labels = chain_labels(tokens, input_ids, rows, end, self.block_length)
        # is_generated[l] already says that t_l, the row's output, is a response token (the last
        # prompt row counts: the first decoding round anchors there), as StoreIndex reads it
        out_generated = generated[: len(rows)]
        loss_on = self.index.loss_on
        keep = labels[:, 0] != IGNORE_INDEX
        if self.require_draft_label and self.block_length > 1:
            keep &= labels[:, 1] != IGNORE_INDEX
        if loss_on != "all":
            keep &= out_generated if loss_on == "response" else ~out_generated
        anchors = np.flatnonzero(keep)
        if len(anchors) > self.anchors_per_sequence:
            if rng is None:  # validation: evenly spaced, the same every time
                pick = (
                    np.linspace(0, len(anchors) - 1, self.anchors_per_sequence).round().astype(int)
                )
            else:
                pick = np.sort(rng.choice(len(anchors), self.anchors_per_sequence, replace=False))
            anchors = anchors[pick]
        item = {"features": features, "anchors": anchors, "labels": labels[anchors]}
        if self.teacher_states:
            # label j of the block at row l is the base model's output at row l + j
            final = shard.read_features(segment.start, label_stop, [FINAL_LAYER])[:, 0]
            rows_of = np.minimum(anchors[:, None] + np.arange(self.block_length), end - 1)
            item["label_states"] = final[rows_of]
        return item

    def collate(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = len(items)
        rows = max(len(item["features"]) for item in items)
        n_anchors = max(max(len(item["anchors"]) for item in items), 1)
        features = np.zeros((batch, rows, *items[0]["features"].shape[1:]), dtype=np.float32)
        context_mask = np.zeros((batch, rows), dtype=bool)
        anchors = np.full((batch, n_anchors), -1, dtype=np.int64)
        labels = np.full((batch, n_anchors, self.block_length), IGNORE_INDEX, dtype=np.int64)
        for i, item in enumerate(items):
            n, a = len(item["features"]), len(item["anchors"])
            features[i, :n], context_mask[i, :n] = item["features"], True
            anchors[i, :a], labels[i, :a] = item["anchors"], item["labels"]
        out = {
            "context_features": torch.from_numpy(features),
            "context_mask": torch.from_numpy(context_mask),
            "anchors": torch.from_numpy(anchors),
            "labels": torch.from_numpy(labels),
        }
        if self.teacher_states:
            hidden = items[0]["features"].shape[-1]
            states = np.zeros((batch, n_anchors, self.block_length, hidden), dtype=np.float32)
            for i, item in enumerate(items):
                states[i, : len(item["anchors"])] = item["label_states"]
            out["label_states"] = torch.from_numpy(states)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        segments = self._rank_segments()
        for first in range(0, len(segments), self.sequences_per_batch):
            items = []
            for k, segment in enumerate(segments[first : first + self.sequences_per_batch]):
                rng = (
                    np.random.default_rng([self.seed, self.epoch, self.rank, first + k])
                    if self.shuffle
                    else None
                )
                items.append(self.read_segment(segment, rng))
            yield self.collate(items)


def one_step_drafts(
    model: Any, head: Any, batch: dict[str, torch.Tensor], mask_token_id: int
) -> torch.Tensor:
    """`[B, A, L-1]` the head's greedy one-step drafts for a batch's blocks, as at inference
    (DESIGN §5): position 0 the known token, the rest masked, every draft position filled at once.

    model: the head or its training wrapper (runs the forward); head: the bare `MTPHeadModel`.
    """
    labels = batch["labels"]
    blocks = torch.full_like(labels, mask_token_id)
    blocks[..., 0] = labels[..., 0].clamp(min=0)
    states = model(
        in_hidden_states=batch["context_features"],
        input_ids=blocks,
        anchors=batch["anchors"],
        context_mask=batch["context_mask"],
        with_logits=False,
    ).hidden_states
    predicted = head.draft_logits(states[..., 1:, :]).argmax(-1)
    ids = head.draft_token_ids(predicted.device)
    return predicted if ids is None else ids[predicted]
