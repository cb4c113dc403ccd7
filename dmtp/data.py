"""Training examples from a store, read a chunk at a time (the original `create_dataloaders` API).

    from dmtp.data import create_dataloaders
    train_dl, val_dl, dataset = create_dataloaders(
        "dmtp_data", block_length=4, batch_size=32, train_ratio=0.9
    )
    for epoch in range(num_epochs):
        train_dl.set_epoch(epoch)          # a new, reproducible order each epoch
        for batch in train_dl:   # in_hidden_states [B, H]; input_ids, labels, attention_mask [B, L]
            ...

Example `(shard, row l)` (DESIGN §3): condition `h_l`, `input_ids` all `mask_token_id` (the trainer
adds the diffusion noise), `labels = tokens[l : l + L]` of l's own sequence, -100 past its end.
`loss_on` picks the rows that are examples: `response` (tokens[l] generated), `prompt`, or `all`.

Why it reads the way it does:
- Sequences, not positions, are split into train and validation: neighbouring positions share
  almost all their labels, so a position split would leak.
- A chunk (`chunk_rows` rows) is the unit zarr decompresses and checksums, so the loaders read
  whole chunks (plus `L - 1` token rows past the end for the labels), shuffle the chunk order, and
  mix examples of `shuffle_chunks` chunks in a buffer. Memory is that buffer, whatever the store's
  size; the index kept in RAM is a few numbers per sequence and per chunk.
- Each epoch's order is a pure function of (seed, epoch). The examples of a split form one stream
  (chunks in shuffled order) cut into `world_size x num_workers` contiguous, near-equal slices:
  each rank and DataLoader worker reads its own slice, so ranks are disjoint and, with
  `even_ranks=False`, their union is exactly the split. `even_ranks` (the default for training with
  several ranks) trims every slice to the same length so no rank waits for another's extra batch.
- `dataset[i]` is a map-style view for inspection and tests; random access decompresses a whole
  chunk per example, so training never uses it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from dmtp.config import DataConfig
from dmtp.errors import StoreError
from dmtp.store import Store, count_samples, decode_hidden_states, open_store

TRAIN, VAL, EXCLUDED = 0, 1, -1
IGNORE_INDEX = -100
_DEFAULTS = DataConfig()
INDEX_BLOCK_ROWS = 1 << 20  # rows of is_generated scanned at a time while indexing (1 MB)


# ----------------------------------------------------------------------------------------------
# the index: which rows are examples of which split, counted per chunk


@dataclass
class ShardIndex:
    shard: int
    n_rows: int  # committed rows
    offsets: np.ndarray  # [S + 1] int64 sequence starts
    split: np.ndarray  # [S] int8: TRAIN, VAL or EXCLUDED (beyond max_samples)
    counts: np.ndarray  # [n_chunks, 2] int64 examples per chunk in TRAIN, VAL

    def split_of_rows(self, start: int, stop: int) -> np.ndarray:
        """[stop - start] int8: the split of each row's sequence."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left"))
        bounds = np.clip(self.offsets[first : last + 1], start, stop)
        return np.repeat(self.split[first:last], np.diff(bounds))

    def sequence_end_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """rows: [N] -> [N] the row where each row's sequence ends (exclusive)."""
        return self.offsets[np.searchsorted(self.offsets, rows, side="right")]


class StoreIndex:
    """Per-shard sequence offsets, split assignment and per-chunk example counts."""

    def __init__(
        self,
        store: Store,
        *,
        loss_on: str,
        train_ratio: float,
        split_seed: int,
        max_samples: int | None,
    ):
        self.path = store.path
        self.hidden_dtype = store.hidden_dtype
        self.hidden_size = store.hidden_size
        self.vocab_size = store.vocab_size
        self.chunk_rows = store.layout.chunk_rows
        self.loss_on = loss_on
        shards = list(store.shards())
        offsets = [shard.sequence_offsets() for shard in shards]
        split = self._assign_splits(store, offsets, train_ratio, split_seed, max_samples)
        self.shards: list[ShardIndex] = []
        start = 0
        for shard, shard_offsets in zip(shards, offsets, strict=True):
            n_sequences = len(shard_offsets) - 1
            index = ShardIndex(
                shard=shard.index,
                n_rows=int(shard_offsets[-1]),
                offsets=shard_offsets,
                split=split[start : start + n_sequences],
                counts=np.zeros((0, 2), np.int64),
            )
            index.counts = self._count_examples(shard, index)
            self.shards.append(index)
            start += n_sequences
        self.n_sequences = {s: int(np.sum(split == s)) for s in (TRAIN, VAL)}

    @staticmethod
    def _assign_splits(
        store: Store,
        offsets: list[np.ndarray],
        train_ratio: float,
        split_seed: int,
        max_samples: int | None,
    ) -> np.ndarray:
        """[S] int8 over all sequences, shard after shard: TRAIN, VAL or EXCLUDED."""
        empty = [np.zeros(0, np.int64)]
        lengths = np.concatenate([np.diff(o) for o in offsets] or empty)
        n = len(lengths)
        # Collection deals prompt i to shard i % num_shards, so (j-th sequence of a shard, shard)
        # is prompt order: max_samples keeps the first prompts, not the first shard.
        local = np.concatenate([np.arange(len(o) - 1) for o in offsets] or empty)
        shard = np.concatenate([np.full(len(o) - 1, k) for k, o in enumerate(offsets)] or empty)
        fixed = store.attrs.get("collection", {}).get("prompts_per_shard")
        # fixed shards hold consecutive prompts: shard-major order is prompt order
        prompt_order = np.lexsort((local, shard)) if fixed else np.lexsort((shard, local))
        included = n
        if max_samples is not None:
            collection = store.attrs.get("collection", {})
            sample_size = int(collection.get("sample_size") or 512)
            stride = int(collection.get("stride") or sample_size)
            samples = [count_samples([lengths[i]], sample_size, stride) for i in prompt_order]
            # whole sequences, up to and including the one that reaches max_samples
            included = min(int(np.searchsorted(np.cumsum(samples), max_samples)) + 1, n)
        n_train = round(train_ratio * included)
        if train_ratio < 1.0 and included >= 2:
            n_train = min(max(n_train, 1), included - 1)  # both splits non-empty
        rng = np.random.default_rng(split_seed)
        chosen = prompt_order[:included][rng.permutation(included)]
        split = np.full(n, EXCLUDED, dtype=np.int8)
        split[chosen[:n_train]] = TRAIN
        split[chosen[n_train:]] = VAL
        return split

    def _count_examples(self, shard: Any, index: ShardIndex) -> np.ndarray:
        n_chunks = -(-index.n_rows // self.chunk_rows)
        counts = np.zeros((n_chunks, 2), np.int64)
        is_generated = shard.array("is_generated")
        for start in range(0, index.n_rows, INDEX_BLOCK_ROWS):
            stop = min(start + INDEX_BLOCK_ROWS, index.n_rows)
            selected = self._selected(is_generated, start, stop)
            splits = index.split_of_rows(start, stop)
            chunk_of_row = np.arange(start, stop) // self.chunk_rows
            for split in (TRAIN, VAL):
                counts[:, split] += np.bincount(
                    chunk_of_row[selected & (splits == split)], minlength=n_chunks
                )
        return counts

    def _selected(self, is_generated: Any, start: int, stop: int) -> np.ndarray:
        if self.loss_on == "all":
            return np.ones(stop - start, dtype=bool)
        generated = np.asarray(is_generated[start:stop], dtype=bool)
        return generated if self.loss_on == "response" else ~generated

    def n_examples(self, split: int | None = None) -> int:
        columns = [TRAIN, VAL] if split is None else [split]
        return int(sum(s.counts[:, columns].sum() for s in self.shards))


# ----------------------------------------------------------------------------------------------
# reading examples


class ExampleReader:
    """Reads the examples of whole chunks. Zarr arrays are opened lazily in each process."""

    def __init__(self, index: StoreIndex, block_length: int, mask_token_id: int):
        self.index = index
        self.block_length = block_length
        self.mask_token_id = mask_token_id
        self._arrays: dict[int, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": {}}  # workers reopen the store themselves

    def arrays(self, shard: int) -> dict[str, Any]:
        if shard not in self._arrays:
            group = open_store(self.index.path).shard(shard)
            self._arrays[shard] = {
                name: group.array(name) for name in ("hidden_states", "tokens", "is_generated")
            }
        return self._arrays[shard]

    def read_chunk(self, position: int, chunk: int, split: int | None) -> dict[str, np.ndarray]:
        """The examples of one chunk (of `split`, or of both when None), in row order.

        Returns hidden_states [N, H] (storage dtype), labels [N, L] int64, rows [N] int64.
        """
        shard = self.index.shards[position]
        start = chunk * self.index.chunk_rows
        stop = min(start + self.index.chunk_rows, shard.n_rows)
        arrays = self.arrays(shard.shard)
        try:
            hidden_states = arrays["hidden_states"][start:stop]
            # labels of the last rows reach into the next chunk (never past n_committed)
            tokens = arrays["tokens"][start : min(stop + self.block_length - 1, shard.n_rows)]
            splits = shard.split_of_rows(start, stop)
            keep = splits != EXCLUDED if split is None else splits == split
            if self.index.loss_on != "all":
                generated = np.asarray(arrays["is_generated"][start:stop], dtype=bool)
                keep &= generated if self.index.loss_on == "response" else ~generated
        except ValueError as error:  # zarr's crc32c mismatch, for one
            raise StoreError(
                f"{self.index.path}: shard {shard.shard} rows {start}-{stop - 1} are unreadable "
                f"({error}); run `dmtp validate --data_dir {self.index.path}`"
            ) from error
        rows = start + np.flatnonzero(keep)
        return {
            "hidden_states": hidden_states[keep],
            "labels": self.labels(shard, rows, tokens, start),
            "rows": rows,
        }

    def labels(
        self, shard: ShardIndex, rows: np.ndarray, tokens: np.ndarray, first_row: int
    ) -> np.ndarray:
        """rows: [N] -> [N, L] int64 tokens[l : l + L], -100 past each row's sequence end."""
        positions = rows[:, None] + np.arange(self.block_length)[None, :]
        inside = positions < shard.sequence_end_of_rows(rows)[:, None]
        gathered = tokens[np.clip(positions - first_row, 0, max(len(tokens) - 1, 0))]
        return np.where(inside, gathered, IGNORE_INDEX).astype(np.int64)

    def batch(self, hidden_states: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
        """Stored rows -> head inputs.

        in_hidden_states [B, H]; input_ids, labels, attention_mask [B, L].
        """
        n = len(labels)
        return {
            "in_hidden_states": decode_hidden_states(hidden_states, self.index.hidden_dtype),
            "input_ids": torch.full((n, self.block_length), self.mask_token_id, dtype=torch.long),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.ones((n, self.block_length), dtype=torch.long),
        }


class StoreDataset(Dataset):
    """Map-style view of every example (train and validation, in store order): `dataset[i]`.

    Each item decompresses the chunk holding it: fine for inspection, slow for training.
    """

    def __init__(self, index: StoreIndex, reader: ExampleReader):
        self.index = index
        self.reader = reader
        per_chunk = np.concatenate(
            [s.counts.sum(axis=1) for s in index.shards] or [np.zeros(0, np.int64)]
        )
        self._chunk_ends = np.cumsum(per_chunk)
        self._chunk_of = [(p, c) for p, s in enumerate(index.shards) for c in range(len(s.counts))]

    def __len__(self) -> int:
        return int(self._chunk_ends[-1]) if len(self._chunk_ends) else 0

    def locate(self, i: int) -> tuple[int, int]:
        """Example i -> (shard, row)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i %= len(self)
        flat = int(np.searchsorted(self._chunk_ends, i, side="right"))
        position, chunk = self._chunk_of[flat]
        within = i - (int(self._chunk_ends[flat - 1]) if flat else 0)
        shard = self.index.shards[position]
        start = chunk * self.index.chunk_rows
        stop = min(start + self.index.chunk_rows, shard.n_rows)
        keep = shard.split_of_rows(start, stop) != EXCLUDED
        if self.index.loss_on != "all":
            generated = np.asarray(
                self.reader.arrays(shard.shard)["is_generated"][start:stop], dtype=bool
            )
            keep &= generated if self.index.loss_on == "response" else ~generated
        return shard.shard, start + int(np.flatnonzero(keep)[within])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shard_number, row = self.locate(i)
        position = next(p for p, s in enumerate(self.index.shards) if s.shard == shard_number)
        shard = self.index.shards[position]
        arrays = self.reader.arrays(shard_number)
        hidden_states = arrays["hidden_states"][row : row + 1]
        tokens = arrays["tokens"][row : min(row + self.reader.block_length, shard.n_rows)]
        labels = self.reader.labels(shard, np.array([row]), tokens, row)
        return {key: value[0] for key, value in self.reader.batch(hidden_states, labels).items()}


class ChunkedExamples(IterableDataset):
    """The examples of one split as batches, chunk-aware (module docstring). Set the epoch first."""

    def __init__(
        self,
        index: StoreIndex,
        reader: ExampleReader,
        split: int,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        shuffle_chunks: int,
        rank: int,
        world_size: int,
        num_workers: int,
        even_ranks: bool,
        drop_last: bool,
        return_positions: bool = False,
    ):
        self.index = index
        self.reader = reader
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_chunks = shuffle_chunks
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(num_workers, 1)
        self.even_ranks = even_ranks
        self.drop_last = drop_last
        self.return_positions = return_positions
        self.epoch = 0
        units = [
            (p, c, n)
            for p, s in enumerate(index.shards)
            for c, n in enumerate(s.counts[:, split])
            if n
        ]
        self._units = np.asarray(units, dtype=np.int64).reshape(
            -1, 3
        )  # (shard position, chunk, count)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def n_examples(self) -> int:
        """Examples in the split (all ranks)."""
        return int(self._units[:, 2].sum())

    def _slot_ranges(self, n_slots: int) -> list[tuple[int, int]]:
        total = self.n_examples
        if self.even_ranks:
            size = total // n_slots
            return [(s * size, (s + 1) * size) for s in range(n_slots)]
        return [(s * total // n_slots, (s + 1) * total // n_slots) for s in range(n_slots)]

    def __len__(self) -> int:
        """Batches this rank yields per epoch (over all of its DataLoader workers)."""
        n_slots = self.world_size * self.num_workers
        ranges = self._slot_ranges(n_slots)[
            self.rank * self.num_workers : (self.rank + 1) * self.num_workers
        ]
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding((hi - lo) / self.batch_size) for lo, hi in ranges)

    def examples_of_rank(self) -> int:
        ranges = self._slot_ranges(self.world_size * self.num_workers)
        return sum(
            hi - lo
            for lo, hi in ranges[self.rank * self.num_workers : (self.rank + 1) * self.num_workers]
        )

    def _epoch_units(self) -> np.ndarray:
        if not self.shuffle:
            return self._units
        rng = np.random.default_rng([self.seed, self.epoch])
        return self._units[rng.permutation(len(self._units))]

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        slot = self.rank * num_workers + worker_id
        lo, hi = self._slot_ranges(self.world_size * num_workers)[slot]
        units = self._epoch_units()
        ends = np.cumsum(units[:, 2])
        starts = ends - units[:, 2]
        rng = np.random.default_rng([self.seed, self.epoch, slot, 1])
        pending: list[dict[str, np.ndarray]] = []
        carry: dict[str, np.ndarray] | None = None
        first = int(np.searchsorted(ends, lo, side="right"))
        for u in range(first, len(units)):
            if starts[u] >= hi:
                break
            position, chunk, _ = (int(x) for x in units[u])
            examples = self.reader.read_chunk(position, chunk, self.split)
            if len(examples["rows"]) != units[u, 2]:
                raise StoreError(
                    f"{self.index.path}: shard {self.index.shards[position].shard} chunk {chunk} "
                    "holds "
                    f"{len(examples['rows'])} examples, the index counted {units[u, 2]}: the store "
                    "changed after the loaders were made; create them again"
                )
            # this slot's part of the chunk: stream positions [lo, hi) ∩ [starts[u], ends[u])
            take = slice(max(lo - starts[u], 0), min(hi, ends[u]) - starts[u])
            examples = {k: v[take] for k, v in examples.items()}
            examples["shards"] = np.full(len(examples["rows"]), self.index.shards[position].shard)
            pending.append(examples)
            if len(pending) >= (self.shuffle_chunks if self.shuffle else 1):
                carry = yield from self._emit(pending, carry, rng, final=False)
                pending = []
        yield from self._emit(pending, carry, rng, final=True)

    def _emit(self, pending, carry, rng, final: bool):
        """Mix buffered chunks and the carried remainder; yield full batches, return the rest."""
        parts = ([carry] if carry is not None else []) + pending
        if not parts:
            return None
        pool = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        n = len(pool["rows"])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        full = n // self.batch_size * self.batch_size
        cut = n if final and not self.drop_last else full
        for begin in range(0, cut, self.batch_size):
            picked = order[begin : begin + self.batch_size]
            batch = self.reader.batch(pool["hidden_states"][picked], pool["labels"][picked])
            if self.return_positions:
                batch["shard"] = torch.from_numpy(pool["shards"][picked])
                batch["row"] = torch.from_numpy(pool["rows"][picked])
            yield batch
        if final or cut == n:
            return None
        rest = order[cut:]
        return {key: value[rest] for key, value in pool.items()}


class StoreDataLoader(DataLoader):
    """A DataLoader over `ChunkedExamples` (batches come pre-collated) with `set_epoch`."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


# ----------------------------------------------------------------------------------------------
# the original entry point


def distributed_rank_and_world_size(
    rank: int | None = None, world_size: int | None = None
) -> tuple[int, int]:
    """Explicit values, else torch.distributed when initialised, else torchrun's RANK/WORLD_SIZE."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(
                "pass both rank and world_size with 0 <= rank < world_size, "
                f"got {rank}, {world_size}"
            )
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def create_dataloaders(
    data_dir: str | Path,
    block_length: int = _DEFAULTS.block_length,
    batch_size: int = 32,
    train_ratio: float = _DEFAULTS.train_ratio,
    *,
    max_samples: int | None = _DEFAULTS.max_samples,
    loss_on: str = _DEFAULTS.loss_on,
    mask_token_id: int | None = None,
    seed: int = 0,
    split_seed: int = _DEFAULTS.split_seed,
    shuffle_chunks: int = _DEFAULTS.shuffle_chunks,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    even_ranks: bool | None = None,
    drop_last: bool = False,
    val_batch_size: int | None = None,
    allow_incomplete: bool = _DEFAULTS.allow_incomplete,
    pin_memory: bool = False,
    return_positions: bool = False,
    config: DataConfig | None = None,
) -> tuple[StoreDataLoader, StoreDataLoader, StoreDataset]:
    """(train_dl, val_dl, dataset) over a store (its path or the output_dir holding it).

    Batches: in_hidden_states [B, H] in the store's logical dtype; input_ids [B, L] all
    mask_token_id (default: the store's vocab_size, one past the base vocabulary); labels [B, L]
    int64 with -100 past a sequence's end; attention_mask [B, L] ones. `return_positions` adds
    `shard` and `row` [B] (for tests and debugging).

    config: a DataConfig whose fields replace block_length, train_ratio, max_samples, loss_on,
    shuffle_chunks, split_seed and allow_incomplete. `rank`/`world_size` default to
    torch.distributed's. `even_ranks` (default: on for the training loader when world_size > 1)
    trims each rank's share to the same length so DDP ranks run the same number of steps.
    """
    if config is None:
        config = DataConfig(
            block_length=block_length,
            train_ratio=train_ratio,
            max_samples=max_samples,
            loss_on=loss_on,
            shuffle_chunks=shuffle_chunks,
            split_seed=split_seed,
            allow_incomplete=allow_incomplete,
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store = open_store(data_dir, require_complete=not config.allow_incomplete)
    rank, world_size = distributed_rank_and_world_size(rank, world_size)
    index = StoreIndex(
        store,
        loss_on=config.loss_on,
        train_ratio=config.train_ratio,
        split_seed=config.split_seed,
        max_samples=config.max_samples,
    )
    if index.n_examples(TRAIN) == 0:
        hint = (
            " (teacher-forced documents have no response rows: use loss_on='all')"
            if config.loss_on == "response"
            else ""
        )
        raise StoreError(
            f"{store.path}: no training examples with loss_on={config.loss_on!r}{hint}"
        )
    reader = ExampleReader(
        index, config.block_length, store.vocab_size if mask_token_id is None else mask_token_id
    )

    def loader(split: int, size: int, shuffle: bool, even: bool) -> StoreDataLoader:
        examples = ChunkedExamples(
            index,
            reader,
            split,
            batch_size=size,
            shuffle=shuffle,
            seed=seed,
            shuffle_chunks=config.shuffle_chunks,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            even_ranks=even,
            drop_last=drop_last if shuffle else False,
            return_positions=return_positions,
        )
        return StoreDataLoader(
            examples, batch_size=None, num_workers=num_workers, pin_memory=pin_memory
        )

    even = world_size > 1 if even_ranks is None else even_ranks
    train_dl = loader(TRAIN, batch_size, shuffle=True, even=even)
    val_dl = loader(VAL, val_batch_size or batch_size, shuffle=False, even=False)
    return train_dl, val_dl, StoreDataset(index, reader)
