"""Synthetic stores for tests and benchmarks, written by the real `create_store` + `ShardWriter`.

    from dmtp.synthetic import write_synthetic_store
    store = write_synthetic_store(
        tmp / "data", sequence_lengths=[40, 17, 64], hidden_size=64, vocab_size=320
    )

What the data is, so that a head can actually fit it:
- `tokens` of each sequence are i.i.d. uniform over `[0, vocab_size)`.
- Rows `l >= generated_from` are generated: `is_generated[l]` (as in the store, it means `tokens[l]`
  belongs to the response) and `input_ids[l + 1] == tokens[l]`, as greedy generation produces.
  Other input ids are random.
- The hidden state is a fixed, seed-determined linear function of the next `LOOKAHEAD` tokens plus
  Gaussian noise:  `h_l = (sum_j 2^-j A_j[t_{l+j}]) @ B + NOISE_STD * eps`  for `j < LOOKAHEAD` and
  `l + j` inside the sequence, with `A_j: [V, r]`, `B: [r, H]`, `r = min(H, 64)`,
  entries ~ N(0, 1/r).
  So `t_l` is recoverable from `h_l` with high confidence and `t_{l+1}, t_{l+2}` with less, like a
  real model's last hidden state. The low rank keeps the tables small for any vocabulary size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmtp.config import StoreLayout
from dmtp.store import (
    STORAGE_DTYPES,
    SequenceRows,
    ShardWriter,
    Store,
    count_samples,
    create_store,
    open_store,
)

LOOKAHEAD = 3  # tokens t_l .. t_{l+2} shape h_l, with weights 1, 1/2, 1/4
NOISE_STD = 0.1
MAX_RANK = 64


def _float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even, as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def encode_float32(values: np.ndarray, hidden_dtype: str) -> np.ndarray:
    """float32 rows `[T, H]` -> the storage dtype of `hidden_dtype` (bf16 as uint16 bits)."""
    if hidden_dtype == "bfloat16":
        return _float32_to_bfloat16_bits(values)
    return values.astype(STORAGE_DTYPES[hidden_dtype], copy=False)


class SyntheticStates:
    """The fixed map from a token sequence to its hidden states (see the module docstring)."""

    def __init__(self, hidden_size: int, vocab_size: int, seed: int = 0):
        rank = min(hidden_size, MAX_RANK)
        rng = np.random.default_rng([seed, 0xD417])
        self.token_tables = rng.standard_normal(
            (LOOKAHEAD, vocab_size, rank), dtype=np.float32
        ) / np.sqrt(rank)
        self.projection = (
            rng.standard_normal((rank, hidden_size), dtype=np.float32) / np.sqrt(rank) * 4.0
        )
        self.hidden_size = hidden_size

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """tokens: [T] -> float32 hidden states [T, H]."""
        length = len(tokens)
        features = np.zeros((length, self.token_tables.shape[2]), dtype=np.float32)
        for j in range(LOOKAHEAD):
            if j < length:
                features[: length - j] += self.token_tables[j][tokens[j:]] * (0.5**j)
        states = features @ self.projection
        states += NOISE_STD * rng.standard_normal(states.shape, dtype=np.float32)
        return states


def synthetic_sequence(
    states: SyntheticStates,
    length: int,
    vocab_size: int,
    generated_from: int,
    hidden_dtype: str,
    rng: np.random.Generator,
) -> SequenceRows:
    """One sequence of `length` rows; rows `>= generated_from` are generated (module docstring)."""
    tokens = rng.integers(0, vocab_size, size=length, dtype=np.int32)
    input_ids = rng.integers(0, vocab_size, size=length, dtype=np.int32)
    first = min(generated_from, length)
    input_ids[first + 1 :] = tokens[first : length - 1]
    is_generated = np.zeros(length, dtype=bool)
    is_generated[generated_from:] = True
    hidden_states = encode_float32(states(tokens, rng), hidden_dtype)
    return SequenceRows(
        hidden_states=hidden_states,
        tokens=tokens,
        input_ids=input_ids,
        sample_ids=np.zeros(length, dtype=np.int64),  # set by the caller
        is_generated=is_generated,
    )


def write_synthetic_store(
    path: str | Path,
    *,
    sequence_lengths: list[int],
    hidden_size: int,
    vocab_size: int,
    hidden_dtype: str = "float32",
    num_shards: int = 1,
    layout: StoreLayout | None = None,
    generated_from: int | list[int] = 0,
    seed: int = 0,
    sample_size: int = 512,
    stride: int = 256,
) -> Store:
    """Write a complete store of random sequences (module docstring) and return it opened.

    Sequence `i` goes to shard `i % num_shards` and has `sample_ids == i`. `generated_from` is the
    first generated row of every sequence, or one value per sequence (0: all rows generated).
    A sequence's contents depend only on `(seed, i)`, not on `num_shards` or `layout`.
    """
    layout = layout or StoreLayout()
    lengths = [int(n) for n in sequence_lengths]
    starts = (
        list(generated_from)
        if isinstance(generated_from, list)
        else [generated_from] * len(lengths)
    )
    if len(starts) != len(lengths):
        raise ValueError(f"generated_from has {len(starts)} entries for {len(lengths)} sequences")
    store = create_store(
        path,
        attrs={  # the keys dmtp.collect records that readers use
            "collection": {
                "mode": "synthetic",
                "seed": seed,
                "sample_size": sample_size,
                "stride": stride,
            },
        },
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        hidden_dtype=hidden_dtype,
        num_shards=num_shards,
        layout=layout,
    )
    states = SyntheticStates(hidden_size, vocab_size, seed)
    for shard_index in range(num_shards):
        writer = ShardWriter(store, shard_index)
        for i in range(shard_index, len(lengths), num_shards):
            rng = np.random.default_rng([seed, i])
            rows = synthetic_sequence(states, lengths[i], vocab_size, starts[i], hidden_dtype, rng)
            rows.sample_ids[:] = i
            writer.append(rows)
            writer.mark_resume_point()
        writer.finish({"n_samples": count_samples(writer.sequence_lengths, sample_size, stride)})
    return open_store(store.path)
