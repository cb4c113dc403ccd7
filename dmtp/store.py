"""The token-major Zarr store (DESIGN §3). The one module that knows the layout.

    <output_dir>/collected_data_final/      root group, attrs: schema, base model, hidden_size, ...
      shards/<k>/                            one group per collection shard, ONE writer each
        hidden_states    [T_k, H]  float16/float32, or uint16 holding bfloat16 bits
        tokens           [T_k]     int32   t_l, the token the base model outputs at position l
        input_ids        [T_k]     int32   the token fed at position l
        sample_ids       [T_k]     int64   index of the source prompt/document
        is_generated     [T_k]     bool    tokens[l] belongs to the generated response (so the last
                                           prompt position, whose output is the first response
                                           token, counts: the first speculative round drafts there)
        sequence_offsets [S_k + 1] int64   row where each sequence starts (CSR)
        layer_states     [T_k, n, H]       optional: the states of n more base layers (root attrs
                                           `feature_layers`, `num_hidden_layers`), encoded as
                                           hidden_states; absent when no feature layer is stored
        attrs: n_committed, n_sequences, complete, counts

Feature layers are numbered as transformers' `output_hidden_states` (0 = embeddings, i = output of
decoder layer i - 1). Layer `num_hidden_layers` is the final state after the norm: it is
`hidden_states`, never stored twice. `Shard.read_features` reads any mix of them as float32.

Durability rules, because zarr itself gives none of these:
- Concurrent appends to one array silently lose rows, so each shard group has exactly one writer.
- A never-written chunk reads back as the fill value without error, so readers trust only rows below
  `n_committed`, and `complete` is set last, after every row is on disk.
- Every chunk carries a crc32c checksum, so a flipped byte fails loudly instead of training on junk.
- Writers flush whole shard files (`rows_per_file` rows); a crash loses at most the rows since the
  last flush, and `ShardWriter(resume=True)` rewinds to the last committed resume point.
- A writer told to stop (SIGTERM) writes and commits what it has up to its last resume point and
  drops the rest (`ShardWriter.stop_at_resume_point`).
- A full disk fails the write (zarr writes each file aside and renames it into place, so no file
  is left half-written) with DiskFull; the committed rows stay as they were, to be resumed.
"""

from __future__ import annotations

import errno
import functools
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from dmtp.config import STORE_DIRNAME, StoreLayout
from dmtp.errors import DiskFull, StoreError

SCHEMA = "dmtp.store/1"
ARRAY_NAMES = (
    "hidden_states",
    "tokens",
    "input_ids",
    "sample_ids",
    "is_generated",
    "sequence_offsets",
)
ROW_ARRAYS = ("hidden_states", "tokens", "input_ids", "sample_ids", "is_generated")
# Optional row array (only in stores with feature layers): not in ARRAY_NAMES / ROW_ARRAYS, which
# every store has. Chunked, sharded and encoded like hidden_states.
LAYER_STATES = "layer_states"
FINAL_LAYER = -1  # read_features' name for the final state in any store (hidden_states[-1])
ROW_DTYPES = {
    "tokens": "int32",
    "input_ids": "int32",
    "sample_ids": "int64",
    "is_generated": "bool",
}
# zarr has no bfloat16: store its bit pattern as uint16 (lossless; casting to float16 overflows).
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
OFFSETS_CHUNK = 4096


# ----------------------------------------------------------------------------------------------
# hidden-state encoding


def encode_hidden_states(hidden_states: Any) -> np.ndarray:
    """A torch tensor `[T, H]` or `[T, n, H]` (any float dtype) -> the numpy array the store holds."""
    import torch

    hidden_states = hidden_states.detach().to("cpu")
    if hidden_states.dtype == torch.bfloat16:
        return hidden_states.view(torch.int16).numpy().view(np.uint16)
    return hidden_states.numpy()


def decode_hidden_states(stored: np.ndarray, hidden_dtype: str) -> Any:
    """Stored rows `[T, H]` -> a torch tensor of the logical dtype (bfloat16 from its uint16 bits)."""
    import torch

    stored = np.ascontiguousarray(stored)
    if hidden_dtype == "bfloat16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(stored)


def hidden_states_as_float32(stored: np.ndarray, hidden_dtype: str) -> np.ndarray:
    """Stored rows -> float32 numpy without torch (bf16 bits are the high half of a float32)."""
    if hidden_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


def count_samples(lengths: np.ndarray | list[int], sample_size: int, stride: int) -> int:
    """Samples (the original scripts' windows) in sequences of these lengths; the last one may be short."""
    lengths = np.asarray(lengths, dtype=np.int64)
    lengths = lengths[lengths > 0]
    return int(np.sum(1 + np.ceil(np.maximum(lengths - sample_size, 0) / stride)))


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class SequenceRows:
    """All rows of one or more consecutive sequences, as numpy arrays (hidden states still encoded)."""

    hidden_states: np.ndarray  # [T, H] storage dtype
    tokens: np.ndarray  # [T] int32
    input_ids: np.ndarray  # [T] int32
    sample_ids: np.ndarray  # [T] int64
    is_generated: np.ndarray  # [T] bool: tokens[l] is part of the generated response
    layer_states: np.ndarray | None = None  # [T, n, H] storage dtype; None: no feature layers

    def __len__(self) -> int:
        return len(self.tokens)


class Shard:
    """One shard group. Only rows below `n_committed` are data; beyond may be junk from a crash."""

    def __init__(
        self,
        group: zarr.Group,
        index: int,
        hidden_dtype: str,
        stored_layers: Sequence[int] = (),
        num_hidden_layers: int | None = None,
    ):
        self.group = group
        self.index = index
        self.hidden_dtype = hidden_dtype
        self.stored_layers = tuple(int(i) for i in stored_layers)  # the layers in layer_states
        self.num_hidden_layers = num_hidden_layers  # None: a store from before feature layers

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def n_committed(self) -> int:
        return int(self.group.attrs.get("n_committed", 0))

    @property
    def n_sequences(self) -> int:
        return int(self.group.attrs.get("n_sequences", 0))

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def sequence_offsets(self) -> np.ndarray:
        """`[S + 1]` committed sequence start rows; the last entry is `n_committed`."""
        return np.asarray(self.array("sequence_offsets")[: self.n_sequences + 1], dtype=np.int64)

    def read_rows(self, start: int, stop: int) -> SequenceRows:
        stop = min(stop, self.n_committed)
        start = min(start, stop)
        rows = SequenceRows(**{name: self.array(name)[start:stop] for name in ROW_ARRAYS})
        if self.stored_layers:
            rows.layer_states = self.array(LAYER_STATES)[start:stop]
        return rows

    def read_features(self, start: int, stop: int, layers: Sequence[int]) -> np.ndarray:
        """Rows `[start, stop)` of the given layers' states as float32 `[stop - start, len(layers), H]`.

        layers: `output_hidden_states` numbers; `num_hidden_layers` (or -1, in any store) is the
        final state (`hidden_states`), the others must be among the stored feature layers.
        """
        if not 0 <= start <= stop <= self.n_committed:
            raise StoreError(
                f"shard {self.index}: rows [{start}, {stop}) are outside the committed rows "
                f"[0, {self.n_committed})"
            )
        final = {FINAL_LAYER, self.num_hidden_layers}
        for layer in layers:
            if layer not in final and layer not in self.stored_layers:
                readable = [*self.stored_layers, self.num_hidden_layers or FINAL_LAYER]
                raise StoreError(
                    f"shard {self.index}: feature layer {layer} is not stored; this store holds "
                    f"layers {readable} (collect again with --feature_layers to add it)"
                )
        hidden_size = int(self.array("hidden_states").shape[1])
        out = np.empty((stop - start, len(layers), hidden_size), dtype=np.float32)
        if any(layer in final for layer in layers):
            hidden = hidden_states_as_float32(
                self.array("hidden_states")[start:stop], self.hidden_dtype
            )
        if any(layer not in final for layer in layers):
            # One read of the slab: a chunk holds all n layers of its rows, so selecting some
            # layers inside zarr would decode the same bytes.
            stored = self.array(LAYER_STATES)[start:stop]
        for j, layer in enumerate(layers):
            if layer in final:
                out[:, j] = hidden
            else:
                column = stored[:, self.stored_layers.index(layer)]
                out[:, j] = hidden_states_as_float32(column, self.hidden_dtype)
        return out


class Store:
    """An opened store: root attrs plus its shards."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)

    @property
    def hidden_size(self) -> int:
        return int(self.attrs["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.attrs["vocab_size"])

    @property
    def hidden_dtype(self) -> str:
        return str(self.attrs["hidden_dtype"])

    @property
    def num_shards(self) -> int:
        return int(self.attrs["num_shards"])

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(**self.attrs["layout"])

    @property
    def num_hidden_layers(self) -> int | None:
        """The base model's decoder layers (None in a store from before feature layers)."""
        value = self.attrs.get("num_hidden_layers")
        return None if value is None else int(value)

    @property
    def stored_layers(self) -> tuple[int, ...]:
        """The layers held in each shard's `layer_states` (the final state never is)."""
        return tuple(int(i) for i in self.attrs.get("feature_layers", []))

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Every layer `Shard.read_features` can read: the stored ones plus the final state.

        The final state is `num_hidden_layers`, or -1 in a store that does not record it.
        """
        return (*self.stored_layers, self.num_hidden_layers or FINAL_LAYER)

    def has_shard(self, index: int) -> bool:
        return (self.path / "shards" / str(index) / "zarr.json").exists()

    def shard(self, index: int) -> Shard:
        if not 0 <= index < self.num_shards:
            raise StoreError(f"{self.path}: no shard {index} (the store has {self.num_shards})")
        if not self.has_shard(index):
            raise StoreError(
                f"{self.path}: shard {index} was never started (run collection for it)"
            )
        return Shard(
            zarr.open_group(self.path / "shards" / str(index), mode="r"),
            index,
            self.hidden_dtype,
            self.stored_layers,
            self.num_hidden_layers,
        )

    def shards(self) -> Iterator[Shard]:
        for index in range(self.num_shards):
            if self.has_shard(index):
                yield self.shard(index)

    @property
    def complete(self) -> bool:
        """All shards written to the end. Derived, not stored: shard writers never share a flag."""
        return all(self.has_shard(k) and self.shard(k).complete for k in range(self.num_shards))

    @property
    def n_rows(self) -> int:
        return sum(shard.n_committed for shard in self.shards())

    @property
    def n_sequences(self) -> int:
        return sum(shard.n_sequences for shard in self.shards())


def open_store(path: str | Path, require_complete: bool = False) -> Store:
    """Open a store for reading. `path` may be `<output_dir>` or `<output_dir>/collected_data_final`."""
    path = Path(path)
    if (path / STORE_DIRNAME / "zarr.json").exists():
        path = path / STORE_DIRNAME
    if not (path / "zarr.json").exists():
        raise StoreError(
            f"{path}: no dmtp store here (expected {path}/zarr.json; run `dmtp collect` first)"
        )
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises several types for unreadable metadata
        raise StoreError(f"{path}: cannot open the store's metadata: {error}") from error
    schema = group.attrs.get("schema")
    if schema != SCHEMA:
        raise StoreError(f"{path}: schema is {schema!r}, dmtp reads {SCHEMA!r}")
    store = Store(path, group)
    if require_complete and not store.complete:
        raise StoreError(
            f"{path}: the store is incomplete (a collection was interrupted); "
            "finish it with `dmtp collect ... --resume`"
        )
    return store


# ----------------------------------------------------------------------------------------------
# writing


def _hidden_codecs(layout: StoreLayout) -> list[Any]:
    codecs: list[Any] = [ZstdCodec(level=1)] if layout.compressor == "zstd" else []
    return [*codecs, Crc32cCodec()]


def create_store(
    path: str | Path,
    *,
    attrs: dict[str, Any],
    hidden_size: int,
    vocab_size: int,
    hidden_dtype: str,
    num_shards: int,
    layout: StoreLayout,
    feature_layers: Sequence[int] = (),
    num_hidden_layers: int | None = None,
) -> Store:
    """Create the root group, or open it if an identical one exists (shard writers may race here).

    The root attrs are a pure function of the configuration, so two processes creating the same
    store write the same bytes. Anything run-specific goes into shard attrs.

    feature_layers: layers stored in `layer_states` besides the final state, ascending, each in
    `[0, num_hidden_layers)` (the final state `num_hidden_layers` is `hidden_states` already).
    num_hidden_layers: the base model's; recorded when given, required with feature_layers.
    """
    path = Path(path)
    if hidden_dtype not in STORAGE_DTYPES:
        raise StoreError(
            f"hidden dtype {hidden_dtype!r} is not storable; use one of {sorted(STORAGE_DTYPES)}"
        )
    feature_layers = [int(i) for i in feature_layers]
    if feature_layers and (
        num_hidden_layers is None
        or feature_layers != sorted(set(feature_layers))
        or not 0 <= feature_layers[0] <= feature_layers[-1] < num_hidden_layers
    ):
        raise StoreError(
            f"feature layers {feature_layers} must be ascending, unique and in "
            f"[0, num_hidden_layers={num_hidden_layers}) (the final state is stored as hidden_states)"
        )
    layer_attrs: dict[str, Any] = {}
    if num_hidden_layers is not None:
        layer_attrs = {
            "feature_layers": feature_layers,
            "num_hidden_layers": int(num_hidden_layers),
        }
    root_attrs = {
        **attrs,
        "schema": SCHEMA,
        "hidden_size": int(hidden_size),
        "vocab_size": int(vocab_size),
        "hidden_dtype": hidden_dtype,
        "hidden_storage_dtype": STORAGE_DTYPES[hidden_dtype],
        "num_shards": int(num_shards),
        "layout": asdict(layout),
        **layer_attrs,
    }
    root_attrs = json.loads(json.dumps(root_attrs))  # what zarr will hand back: lists, not tuples
    if (path / "zarr.json").exists():
        store = open_store(path)
        differences = describe_differences(store.attrs, root_attrs)
        if differences:
            raise StoreError(f"{path}: holds a store made with other settings: {differences}")
        if not (path / "shards" / "zarr.json").exists():  # a full disk stopped its creation
            zarr.open_group(path, mode="r+").require_group("shards")
        return store
    group = zarr.open_group(path, mode="a", attributes=root_attrs)
    group.require_group("shards")
    return Store(path, group)


def describe_differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> str:
    """'key: stored X, requested Y; ...' for every setting that differs (empty when equal)."""
    parts = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = describe_differences(a, b, f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        elif a != b:
            parts.append(f"{prefix}{key}: stored {a!r}, requested {b!r}")
    return "; ".join(parts)


def remove_store(path: str | Path) -> None:
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)


def _disk_full_is_a_store_error(method: Callable) -> Callable:
    """ENOSPC/EDQUOT from a ShardWriter method -> DiskFull naming the shard (one line, no
    traceback): the store keeps its committed rows and is not marked complete."""

    @functools.wraps(method)
    def wrapper(self: ShardWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DiskFull(
                f"{self.path}: {error.strerror or 'no space left on device'} writing shard "
                f"{self.index} ({self.committed_rows:,} rows committed)"
            ) from None

    return wrapper


class ShardWriter:
    """The single writer of one shard group. Append sequences, mark resume points, then `finish()`.

    Rows are buffered and written a whole shard file (`rows_per_file` rows) at a time. After each
    flush, the newest resume point that is fully on disk becomes `n_committed`. With `resume=True`
    an existing shard is rewound to its committed state and appending continues from there.
    """

    @_disk_full_is_a_store_error
    def __init__(self, store: Store, index: int, *, resume: bool = False):
        if not 0 <= index < store.num_shards:
            raise StoreError(f"{store.path}: no shard {index} (the store has {store.num_shards})")
        self.store = store
        self.index = index
        self.layout = store.layout
        self.path = store.path / "shards" / str(index)
        self.committed_rows = 0  # read from the shard below, once it is open
        if (self.path / "zarr.json").exists() and not resume:
            raise StoreError(
                f"{self.path}: shard {index} already exists; pass --resume to continue it or --overwrite"
            )
        self.group = zarr.open_group(self.path, mode="a")
        self.stored_layers = store.stored_layers
        self.row_names = ROW_ARRAYS + ((LAYER_STATES,) if self.stored_layers else ())
        if "n_committed" not in self.group.attrs:  # new, or a kill stopped its creation half-way
            self._create_arrays()
        if self.stored_layers and LAYER_STATES not in self.group:
            raise StoreError(
                f"{self.path}: the store records feature layers {list(self.stored_layers)} but "
                f"this shard has no {LAYER_STATES} array; use --overwrite to collect it again"
            )
        # zarr skips chunks equal to the fill value by default, which makes a lost chunk
        # indistinguishable from, say, an all-prompt is_generated chunk; write them all so
        # `dmtp validate` can treat every missing chunk as damage.
        self.arrays = {
            name: self.group[name].with_config({"write_empty_chunks": True})
            for name in (*ARRAY_NAMES, *self.row_names[len(ROW_ARRAYS) :])
        }
        # Committed state: what a reader may trust, and where a resumed writer restarts.
        self.committed_rows = int(self.group.attrs.get("n_committed", 0))
        self.committed_sequences = int(self.group.attrs.get("n_sequences", 0))
        self.offsets: list[int] = (
            np.asarray(self.arrays["sequence_offsets"][: self.committed_sequences + 1]).tolist()
            if self.committed_sequences
            else [0]
        )
        # Rows of the last, partly filled shard file are read back and rewritten with the new rows.
        self.written_rows = (
            self.committed_rows // self.layout.rows_per_file
        ) * self.layout.rows_per_file
        tail = Shard(self.group, index, store.hidden_dtype, self.stored_layers).read_rows(
            self.written_rows, self.committed_rows
        )
        self.buffer: list[SequenceRows] = [tail] if len(tail) else []
        self.buffered_rows = len(tail)
        self.resume_points: list[tuple[int, int]] = []
        for name in self.row_names:  # drop junk a crash may have left past the committed rows
            if self.arrays[name].shape[0] != self.committed_rows:
                self.arrays[name].resize((self.committed_rows, *self.arrays[name].shape[1:]))
        if self.group.attrs.get("complete"):
            self.group.update_attributes({"complete": False})

    @property
    def total_rows(self) -> int:
        return self.offsets[-1]

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def sequence_lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets, dtype=np.int64))

    def _create_arrays(self) -> None:
        layout, hidden_size = self.layout, self.store.hidden_size
        storage = STORAGE_DTYPES[self.store.hidden_dtype]
        states = {"hidden_states": (hidden_size,)}
        if self.stored_layers:
            states[LAYER_STATES] = (len(self.stored_layers), hidden_size)
        existing = set(self.group.array_keys())
        for name, inner in states.items():
            if name in existing:
                continue
            self.group.create_array(
                name,
                shape=(0, *inner),
                dtype=storage,
                chunks=(layout.chunk_rows, *inner),
                shards=(layout.rows_per_file, *inner),
                serializer=BytesCodec(),
                compressors=_hidden_codecs(layout),
                fill_value=0,
            )
        for name, dtype in ROW_DTYPES.items():
            if name in existing:
                continue
            self.group.create_array(
                name,
                shape=(0,),
                dtype=dtype,
                chunks=(layout.rows_per_file,),
                compressors=[ZstdCodec(level=1), Crc32cCodec()],
                fill_value=0,
            )
        if "sequence_offsets" not in existing:
            self.group.create_array(
                "sequence_offsets",
                shape=(1,),
                dtype="int64",
                chunks=(OFFSETS_CHUNK,),
                compressors=[ZstdCodec(level=1), Crc32cCodec()],
                fill_value=0,
            )
        self.group.update_attributes({"n_committed": 0, "n_sequences": 0, "complete": False})

    @_disk_full_is_a_store_error
    def append(self, rows: SequenceRows) -> None:
        """Append one sequence (all its rows). Flushes whole shard files as they fill."""
        n = len(rows)
        if n == 0:
            raise StoreError(f"{self.path}: refusing to append an empty sequence")
        if rows.hidden_states.shape != (n, self.store.hidden_size):
            raise StoreError(
                f"{self.path}: hidden_states shape {rows.hidden_states.shape} != ({n}, {self.store.hidden_size})"
            )
        expected = (n, len(self.stored_layers), self.store.hidden_size)
        if self.stored_layers and (
            rows.layer_states is None or rows.layer_states.shape != expected
        ):
            got = None if rows.layer_states is None else rows.layer_states.shape
            raise StoreError(f"{self.path}: layer_states shape {got} != {expected}")
        if not self.stored_layers and rows.layer_states is not None:
            raise StoreError(
                f"{self.path}: layer_states given, but the store has no feature layers"
            )
        self.buffer.append(rows)
        self.buffered_rows += n
        self.offsets.append(self.total_rows + n)
        if self.buffered_rows >= self.layout.rows_per_file:
            self._flush(final=False)

    def mark_resume_point(self) -> None:
        """Everything appended so far may be committed as a unit (e.g. one finished batch)."""
        self.resume_points.append((self.total_rows, self.n_sequences))

    @_disk_full_is_a_store_error
    def finish(self, extra_attrs: dict[str, Any] | None = None) -> None:
        """Write the remaining rows, commit them, and set `complete` last."""
        self.mark_resume_point()
        self._flush(final=True)
        self.group.update_attributes({**(extra_attrs or {}), "complete": True})

    @_disk_full_is_a_store_error
    def stop_at_resume_point(self) -> None:
        """Write the rows up to the newest resume point (part of a shard file if need be), commit
        them, and drop the rows appended after it: a batch cut short by SIGTERM. The shard stays
        incomplete, and `ShardWriter(resume=True)` continues from that resume point."""
        if self.resume_points:
            self._write(max(self.resume_points[-1][0] - self.written_rows, 0))
            self._commit()
        self.buffer, self.buffered_rows = [], 0

    def _flush(self, final: bool) -> None:
        whole_files = (self.buffered_rows // self.layout.rows_per_file) * self.layout.rows_per_file
        self._write(self.buffered_rows if final else whole_files)
        self._commit()

    def _write(self, size: int) -> None:
        """Write the first `size` buffered rows to the arrays (not yet committed)."""
        if size <= 0:
            return
        merged = {
            name: np.concatenate([getattr(r, name) for r in self.buffer]) for name in self.row_names
        }
        start, stop = self.written_rows, self.written_rows + size
        for name in self.row_names:
            array = self.arrays[name]
            if array.shape[0] < stop:
                array.resize((stop, *array.shape[1:]))
            array[start:stop] = merged[name][:size]
        self.written_rows = stop
        rest = SequenceRows(**{name: merged[name][size:] for name in self.row_names})
        self.buffer = [rest] if len(rest) else []
        self.buffered_rows = len(rest)

    def _commit(self) -> None:
        durable = [p for p in self.resume_points if p[0] <= self.written_rows]
        if not durable:
            return
        rows, sequences = durable[-1]
        self.resume_points = [p for p in self.resume_points if p[0] > self.written_rows]
        if (rows, sequences) == (self.committed_rows, self.committed_sequences):
            return
        offsets = self.arrays["sequence_offsets"]
        if offsets.shape[0] < sequences + 1:
            offsets.resize((sequences + 1,))
        first = self.committed_sequences  # entries before this are already on disk
        offsets[first : sequences + 1] = np.asarray(
            self.offsets[first : sequences + 1], dtype=np.int64
        )
        self.group.update_attributes({"n_committed": int(rows), "n_sequences": int(sequences)})
        self.committed_rows, self.committed_sequences = rows, sequences


def estimate_bytes_per_row(hidden_size: int, hidden_dtype: str, n_feature_layers: int = 0) -> int:
    """Uncompressed bytes one stored position takes (final state, feature layers, token columns).

    n_feature_layers: layers stored in layer_states (not counting the final state).
    """
    itemsize = np.dtype(STORAGE_DTYPES[hidden_dtype]).itemsize
    return (1 + n_feature_layers) * hidden_size * itemsize + 4 + 4 + 8 + 1


def directory_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
