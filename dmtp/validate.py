"""`dmtp validate`: check a store before any GPU time is spent training on it.

    dmtp validate --data_dir dmtp_data                       # everything, streaming
    dmtp validate --data_dir dmtp_data --sample 0.05 --report report.json

What it checks (DESIGN §3), each finding naming shard, array, chunk and rows:
- metadata: schema, root attrs, every shard present and `complete`, every array's dtype and shape
  against the attrs (`hidden_size`, hidden storage dtype, `n_committed`, `n_sequences`,
  `sequence_offsets`, and `layer_states [T, n, H]` where the attrs name n `feature_layers`);
- chunks: every chunk below `n_committed` is present (zarr would silently hand back fill values
  for a missing one), whole, and matches its crc32c; the shard index of each hidden-state file too;
- values: token and input ids in `[0, vocab_size)`, finite hidden and layer states, `input_ids[l + 1] ==
  tokens[l]` where `tokens[l]` is generated (in a generated store), one `sample_id` per sequence;
- stray files: `*.partial` temporaries of an interrupted write (warnings).

Chunks are read as raw files and decoded here (bytes / zstd / crc32c), not through zarr: it is
faster, and zarr cannot tell a missing chunk from one full of zeros. `--sample` decodes a random
fraction of the row blocks; metadata, chunk listings and shard indexes are always checked in full.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
from numcodecs import Zstd

from dmtp.config import ValidateConfig, resolve_store_path
from dmtp.errors import StoreError
from dmtp.store import (
    ARRAY_NAMES,
    LAYER_STATES,
    ROW_ARRAYS,
    ROW_DTYPES,
    SCHEMA,
    STORAGE_DTYPES,
    count_samples,
)

# per (shard, array, check): a store of junk should not make a 1 GB report
MAX_FINDINGS_PER_KIND = 20
EMPTY = 2**64 - 1  # a shard-index entry for a chunk that was never written


@dataclass
class Finding:
    """One problem, located as precisely as the check allows."""

    check: str  # short name: checksum, missing_chunk, truncated, token_range, non_finite, ...
    message: str
    shard: int | None = None
    array: str | None = None
    chunk: str | None = None  # chunk key, e.g. "c/3/0#2" = inner chunk 2 of shard file c/3/0
    rows: list[int] | None = None  # [start, stop) within the shard
    file: str | None = None  # relative to the store, for findings about a file rather than data

    def __str__(self) -> str:
        where = []
        if self.shard is not None:
            where.append(f"shard {self.shard}")
        if self.array:
            where.append(self.array)
        if self.chunk:
            where.append(f"chunk {self.chunk}")
        if self.file:
            where.append(self.file)
        if self.rows:
            start, stop = self.rows
            where.append(f"row {start}" if stop == start + 1 else f"rows {start}-{stop - 1}")
        return f"[{self.check}] {' / '.join(where) or 'store'}: {self.message}"


@dataclass
class ShardSummary:
    index: int
    status: str = "ok"  # ok | errors | missing
    complete: bool = False
    rows: int = 0
    sequences: int = 0
    generated_rows: int | None = None  # None when --sample skipped some blocks
    bytes_on_disk: int = 0
    errors: int = 0


@dataclass
class ValidationReport:
    """What `validate_store` found. `ok` when there is no error (warnings allowed)."""

    path: str
    sample: float
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    shards: list[ShardSummary] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)  # findings beyond the per-kind cap
    hidden_size: int | None = None
    vocab_size: int | None = None
    hidden_dtype: str | None = None
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def sequences(self) -> int:
        return sum(s.sequences for s in self.shards)

    @property
    def bytes_on_disk(self) -> int:
        return sum(s.bytes_on_disk for s in self.shards)

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes_checked / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "sample": self.sample,
            "rows": self.rows,
            "sequences": self.sequences,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "hidden_dtype": self.hidden_dtype,
            "bytes_on_disk": self.bytes_on_disk,
            "bytes_checked": self.bytes_checked,
            "seconds": round(self.seconds, 3),
            "megabytes_per_second": round(self.megabytes_per_second, 1),
            "errors": [asdict(f) for f in self.errors],
            "warnings": [asdict(f) for f in self.warnings],
            "suppressed": self.suppressed,
            "shards": [asdict(s) for s in self.shards],
        }

    def summary(self) -> str:
        """A few readable lines: totals, per-shard status, then every finding."""
        generated = [s.generated_rows for s in self.shards]
        generated_text = (
            f"{sum(generated):,}" if generated and None not in generated else "n/a (sampled)"
        )
        lines = [
            f"store {self.path}",
            f"  {self.rows:,} rows in {self.sequences:,} sequences, "
            f"generated rows {generated_text}, "
            f"hidden {self.hidden_size} x {self.hidden_dtype}, vocab {self.vocab_size}",
            f"  {self.bytes_on_disk / 1e6:,.1f} MB on disk, "
            f"{self.bytes_checked / 1e6:,.1f} MB checked ({self.sample:.0%} of row blocks) "
            f"in {self.seconds:.1f} s = {self.megabytes_per_second:,.0f} MB/s",
        ]
        for s in self.shards:
            lines.append(
                f"  shard {s.index}: {s.status}, {s.rows:,} rows, {s.sequences:,} sequences"
                + ("" if s.complete else ", INCOMPLETE")
                + (f", {s.errors} errors" if s.errors else "")
            )
        lines += [f"ERROR {f}" for f in self.errors]
        lines += [f"warning {f}" for f in self.warnings]
        lines += [f"... and {n} more [{key}] findings" for key, n in self.suppressed.items()]
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} errors")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# raw chunk decoding


class ChunkError(Exception):
    def __init__(self, check: str, message: str):
        super().__init__(message)
        self.check = check


def _codec_names(codecs: list[dict[str, Any]]) -> list[str]:
    names = []
    for codec in codecs:
        name = codec["name"]
        if name == "bytes" and codec.get("configuration", {}).get("endian", "little") != "little":
            raise ChunkError("codec", "big-endian chunks are not written by dmtp")
        if name not in ("bytes", "zstd", "crc32c"):
            raise ChunkError("codec", f"codec {name!r} is not one dmtp writes")
        names.append(name)
    return names


def decode_chunk(data: bytes | memoryview, codecs: list[str], expected_nbytes: int) -> memoryview:
    """Undo a bytes -> [zstd] -> crc32c pipeline, verifying the checksum and the decoded size."""
    data = memoryview(data)  # slices of a memoryview do not copy (a shard file is ~30 MB)
    for name in reversed(codecs):
        if name == "crc32c":
            if len(data) < 4:
                raise ChunkError(
                    "truncated", f"chunk is {len(data)} bytes, too short to hold its checksum"
                )
            stored = int.from_bytes(data[-4:], "little")
            data = data[:-4]
            if crc32c.crc32c(data) != stored:
                raise ChunkError(
                    "checksum",
                    f"crc32c mismatch: the chunk is corrupt or truncated ({len(data) + 4} bytes)",
                )
        elif name == "zstd":
            try:
                data = memoryview(Zstd().decode(data))
            except Exception as error:  # numcodecs raises RuntimeError/ValueError by version
                raise ChunkError("checksum", f"zstd cannot decode the chunk: {error}") from error
    if len(data) != expected_nbytes:
        raise ChunkError(
            "truncated", f"chunk decodes to {len(data)} bytes, expected {expected_nbytes}"
        )
    return data


class ArrayFiles:
    """One array of one shard, read from its files: metadata, chunk keys, raw decoding."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.metadata = json.loads((directory / "zarr.json").read_text())
        self.shape: list[int] = list(self.metadata["shape"])
        self.dtype = np.dtype(self.metadata["data_type"])
        self.chunk_shape: list[int] = list(
            self.metadata["chunk_grid"]["configuration"]["chunk_shape"]
        )
        encoding = self.metadata.get("chunk_key_encoding", {})
        self.separator = encoding.get("configuration", {}).get("separator", "/")
        codecs = self.metadata["codecs"]
        self.sharded = codecs[0]["name"] == "sharding_indexed"
        if self.sharded:
            sharding = codecs[0]["configuration"]
            self.inner_shape: list[int] = list(sharding["chunk_shape"])
            self.codecs = _codec_names(sharding["codecs"])
            self.index_codecs = _codec_names(sharding["index_codecs"])
            self.index_at_end = sharding.get("index_location", "end") == "end"
        else:
            self.inner_shape = self.chunk_shape
            self.codecs = _codec_names(codecs)

    @property
    def rows_per_file(self) -> int:
        return self.chunk_shape[0]

    @property
    def rows_per_chunk(self) -> int:
        return self.inner_shape[0]

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.inner_shape)) * self.dtype.itemsize

    def key(self, file_index: int) -> str:
        coords = [str(file_index)] + ["0"] * (len(self.shape) - 1)
        return self.separator.join(["c", *coords])

    def path(self, file_index: int) -> Path:
        return self.directory / self.key(file_index).replace("/", os.sep)

    def read_file(self, file_index: int) -> bytes | None:
        try:
            return self.path(file_index).read_bytes()
        except FileNotFoundError:
            return None

    def decode(self, data: bytes | memoryview) -> np.ndarray:
        raw = decode_chunk(data, self.codecs, self.chunk_nbytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.inner_shape)

    def shard_index(self, data: bytes, chunks_written: int) -> np.ndarray:
        """A sharded file's index: `[chunks_per_file, 2]` (offset, nbytes), EMPTY for unwritten.

        chunks_written: inner chunks the file should hold; without compression every chunk has a
        known size, so a short file is recognisable as truncated rather than just corrupt.
        """
        n = self.rows_per_file // self.rows_per_chunk
        size = 16 * n + 4 * ("crc32c" in self.index_codecs)
        expected = None
        if "zstd" not in self.codecs:
            expected = chunks_written * (self.chunk_nbytes + 4 * ("crc32c" in self.codecs)) + size
        if len(data) < size or (expected is not None and len(data) < expected):
            raise ChunkError(
                "truncated",
                f"file is {len(data)} bytes, expected {expected or size}; "
                "its index and chunks are lost",
            )
        encoded = data[-size:] if self.index_at_end else data[:size]
        try:
            raw = decode_chunk(encoded, self.index_codecs, 16 * n)
        except ChunkError as error:
            raise ChunkError(
                "shard_index", f"shard index unreadable ({error}); the file is truncated or corrupt"
            ) from None
        return np.frombuffer(raw, dtype="<u8").reshape(n, 2)


# ----------------------------------------------------------------------------------------------
# the checks


@dataclass
class ShardPlan:
    """A shard whose metadata checked out: what the streaming pass reads, block by block."""

    shard: int
    arrays: dict[str, ArrayFiles]  # by array name (ARRAY_NAMES, plus layer_states if any)
    n: int  # committed rows
    offsets: np.ndarray  # [n_sequences + 1] sequence starts, 0 .. n
    n_blocks: int  # hidden_states files holding the n rows
    summary: ShardSummary  # the report's row for this shard, filled in as blocks are read


class Validator:
    def __init__(self, path: Path, sample: float, seed: int, progress: bool):
        self.path = path
        self.sample = sample
        self.rng = np.random.default_rng(seed)
        self.progress = progress
        self.report = ValidationReport(path=str(path), sample=sample)
        self.counts: Counter[str] = Counter()
        self.carry: dict[int, dict[str, Any]] = {}  # shard -> last row of the previous block

    # findings ---------------------------------------------------------------------------------

    def error(self, check: str, message: str, **where: Any) -> None:
        self._add(self.report.errors, check, message, where)

    def warning(self, check: str, message: str, **where: Any) -> None:
        self._add(self.report.warnings, check, message, where)

    def _add(
        self, findings: list[Finding], check: str, message: str, where: dict[str, Any]
    ) -> None:
        key = f"shard {where.get('shard')} {where.get('array') or ''} {check}".strip()
        self.counts[key] += 1
        if self.counts[key] > MAX_FINDINGS_PER_KIND:
            self.report.suppressed[key] = self.counts[key] - MAX_FINDINGS_PER_KIND
            return
        findings.append(Finding(check, message, **where))
        if where.get("shard") is not None and findings is self.report.errors:
            for summary in self.report.shards:
                if summary.index == where["shard"]:
                    summary.errors += 1
                    summary.status = "errors" if summary.status == "ok" else summary.status

    # driver -----------------------------------------------------------------------------------

    def run(self) -> ValidationReport:
        start = time.perf_counter()
        root = self._root_attrs()
        if root is not None:
            self._stray_files()
            plans = [self._plan_shard(k) for k in range(int(root["num_shards"]))]
            plans = [p for p in plans if p is not None]
            self._check_blocks(plans)
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _root_attrs(self) -> dict[str, Any] | None:
        try:
            metadata = json.loads((self.path / "zarr.json").read_text())
        except FileNotFoundError:
            raise StoreError(
                f"{self.path}: no dmtp store here (expected {self.path}/zarr.json)"
            ) from None
        except ValueError as error:
            self.error("metadata", f"zarr.json is not valid JSON: {error}")
            return None
        attrs = metadata.get("attributes", {})
        if attrs.get("schema") != SCHEMA:
            self.error("schema", f"schema is {attrs.get('schema')!r}, dmtp reads {SCHEMA!r}")
            return None
        for key in ("hidden_size", "vocab_size", "hidden_dtype", "num_shards", "layout"):
            if key not in attrs:
                self.error("metadata", f"root attrs lack {key!r}")
                return None
        if attrs["hidden_dtype"] not in STORAGE_DTYPES:
            self.error(
                "metadata",
                f"hidden_dtype {attrs['hidden_dtype']!r} is not one of {sorted(STORAGE_DTYPES)}",
            )
            return None
        self.hidden_size = int(attrs["hidden_size"])
        self.vocab_size = int(attrs["vocab_size"])
        self.hidden_dtype = str(attrs["hidden_dtype"])
        layers = attrs.get("feature_layers", [])
        final = attrs.get("num_hidden_layers")
        if not isinstance(layers, list) or (
            layers
            and (
                not isinstance(final, int)
                or not all(isinstance(i, int) for i in layers)
                or layers != sorted(set(layers))
                or not 0 <= layers[0] <= layers[-1] < final
            )
        ):
            self.error(
                "metadata",
                f"feature_layers {layers!r} must be ascending, unique layer indices in "
                f"[0, num_hidden_layers={final!r})",
            )
            return None
        self.n_layers = len(layers)
        # the row arrays every shard of this store must have: layer_states only with feature layers
        self.row_names = ROW_ARRAYS + ((LAYER_STATES,) if layers else ())
        self.report.hidden_size, self.report.vocab_size = self.hidden_size, self.vocab_size
        self.report.hidden_dtype = self.hidden_dtype
        self.root = attrs
        return attrs

    def _stray_files(self) -> None:
        for directory, _, files in os.walk(self.path):
            for name in files:
                if name.endswith(".partial"):
                    relative = os.path.relpath(os.path.join(directory, name), self.path)
                    self.warning(
                        "stray_file",
                        "temporary file of an interrupted write "
                        "(safe to delete once no writer runs)",
                        file=relative,
                    )

    def _plan_shard(self, k: int) -> ShardPlan | None:
        """Check one shard's metadata; return what the block pass needs, or None if unreadable."""
        directory = self.path / "shards" / str(k)
        summary = ShardSummary(index=k)
        self.report.shards.append(summary)
        summary.bytes_on_disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        attrs = self._shard_attrs(k, directory, summary)
        if attrs is None:
            return None
        arrays = self._open_arrays(k, directory)
        if arrays is None:
            return None
        n = summary.rows
        # every check runs (each reports its own findings) before a failed one stops the plan
        ok = all(
            [
                self._check_dtypes(k, arrays),
                self._check_shapes(k, arrays),
                self._check_row_counts(k, arrays, n, summary.complete),
            ]
        )
        offsets = self._offsets(k, arrays["sequence_offsets"], summary.sequences, n)
        if offsets is not None:
            self._check_sample_count(k, attrs, offsets)
        if not ok or offsets is None:
            return None
        n_blocks = -(-n // arrays["hidden_states"].rows_per_file)
        self._check_listing(k, arrays, n, n_blocks)
        return ShardPlan(k, arrays, n, offsets, n_blocks, summary)

    def _shard_attrs(self, k: int, directory: Path, summary: ShardSummary) -> dict[str, Any] | None:
        """The shard group's attrs, its counts copied into `summary`; None when it is missing."""
        try:
            attrs = json.loads((directory / "zarr.json").read_text()).get("attributes", {})
        except FileNotFoundError:
            summary.status = "missing"
            self.error("missing_shard", "shard was never written (run collection for it)", shard=k)
            return None
        summary.rows = int(attrs.get("n_committed", 0))
        summary.sequences = int(attrs.get("n_sequences", 0))
        summary.complete = bool(attrs.get("complete", False))
        if not summary.complete:
            self.error(
                "incomplete",
                "`complete` is not set: its collection was interrupted (finish it with "
                "`dmtp collect ... --resume`)",
                shard=k,
            )
        return attrs

    def _open_arrays(self, k: int, directory: Path) -> dict[str, ArrayFiles] | None:
        """Every array of the shard by name; None when one is missing or unreadable."""
        arrays: dict[str, ArrayFiles] = {}
        names = (*ARRAY_NAMES, *self.row_names[len(ROW_ARRAYS) :])
        for name in names:
            try:
                arrays[name] = ArrayFiles(directory / name)
            except FileNotFoundError:
                self.error("missing_array", "array is missing", shard=k, array=name)
            except (ChunkError, KeyError, ValueError) as error:
                self.error("metadata", f"unreadable array metadata: {error}", shard=k, array=name)
        return arrays if len(arrays) == len(names) else None

    def _check_dtypes(self, k: int, arrays: dict[str, ArrayFiles]) -> bool:
        expected = {name: np.dtype(dtype) for name, dtype in ROW_DTYPES.items()}
        expected["hidden_states"] = np.dtype(STORAGE_DTYPES[self.hidden_dtype])
        expected[LAYER_STATES] = expected["hidden_states"]
        expected["sequence_offsets"] = np.dtype("int64")
        ok = True
        for name, files in arrays.items():
            if files.dtype != expected[name]:
                self.error(
                    "dtype", f"dtype {files.dtype}, expected {expected[name]}", shard=k, array=name
                )
                ok = False
        return ok

    def _check_shapes(self, k: int, arrays: dict[str, ArrayFiles]) -> bool:
        """hidden_states is [rows, hidden_size]; layer_states [rows, feature layers, hidden_size]."""
        ok = True
        hidden = arrays["hidden_states"]
        if len(hidden.shape) != 2 or hidden.shape[1] != self.hidden_size:
            self.error(
                "shape",
                f"shape {hidden.shape} does not match hidden_size {self.hidden_size} "
                "in the store attrs",
                shard=k,
                array="hidden_states",
            )
            ok = False
        layer_states = arrays.get(LAYER_STATES)
        wanted = [self.n_layers, self.hidden_size]
        if layer_states is not None and layer_states.shape[1:] != wanted:
            self.error(
                "shape",
                f"shape {layer_states.shape} does not match [rows, {self.n_layers} feature_layers, "
                f"hidden_size {self.hidden_size}] in the store attrs",
                shard=k,
                array=LAYER_STATES,
            )
            ok = False
        return ok

    def _check_row_counts(
        self, k: int, arrays: dict[str, ArrayFiles], n: int, complete: bool
    ) -> bool:
        """Each row array holds the n committed rows (exactly n once complete), and all are split
        into files as hidden_states is. Extra rows of a complete shard are reported, not fatal."""
        ok = True
        rows_per_file = arrays["hidden_states"].rows_per_file
        for name in self.row_names:
            files = arrays[name]
            if files.shape[0] < n:
                self.error(
                    "row_count",
                    f"n_committed is {n} but the array holds only {files.shape[0]} rows",
                    shard=k,
                    array=name,
                )
                ok = False
            elif files.shape[0] > n and complete:
                self.error(
                    "row_count",
                    f"the shard is complete with n_committed {n}, "
                    f"but the array holds {files.shape[0]} rows",
                    shard=k,
                    array=name,
                )
            if name != "hidden_states" and files.rows_per_file != rows_per_file:
                self.error(
                    "layout",
                    f"chunked by {files.rows_per_file} rows, "
                    f"hidden_states files by {rows_per_file}",
                    shard=k,
                    array=name,
                )
                ok = False
        return ok

    def _check_sample_count(self, k: int, attrs: dict[str, Any], offsets: np.ndarray) -> None:
        """n_samples, where the shard records it, is what its sequences hold at collection's
        sample_size and stride."""
        collection = self.root.get("collection", {})
        size, stride = collection.get("sample_size"), collection.get("stride")
        if "n_samples" not in attrs or not size or not stride:
            return
        counted = count_samples(np.diff(offsets), size, stride)
        if counted != attrs["n_samples"]:
            self.error(
                "row_count",
                f"n_samples is {attrs['n_samples']}, but the sequences hold {counted} samples of "
                f"{size} (stride {stride})",
                shard=k,
            )

    def _offsets(self, k: int, files: ArrayFiles, n_sequences: int, n: int) -> np.ndarray | None:
        if files.shape[0] < n_sequences + 1:
            self.error(
                "row_count",
                f"n_sequences is {n_sequences} but the array holds {files.shape[0]} offsets",
                shard=k,
                array="sequence_offsets",
            )
            return None
        # a shard that committed nothing never wrote its offsets chunk: [0] is implicit
        chunks = -(-(n_sequences + 1) // files.rows_per_file) if n_sequences else 0
        parts = []
        for i in range(chunks):
            data = files.read_file(i)
            if data is None:
                self.error(
                    "missing_chunk",
                    "chunk file is missing",
                    shard=k,
                    array="sequence_offsets",
                    chunk=files.key(i),
                )
                return None
            try:
                parts.append(files.decode(data))
            except ChunkError as error:
                self.error(
                    error.check, str(error), shard=k, array="sequence_offsets", chunk=files.key(i)
                )
                return None
        offsets = np.concatenate(parts)[: n_sequences + 1] if parts else np.zeros(1, np.int64)
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
            self.error(
                "sequence_offsets",
                f"offsets must rise strictly from 0 to n_committed ({n}); they run "
                f"{int(offsets[0])} .. {int(offsets[-1])}"
                + (", with empty or backward sequences" if np.any(np.diff(offsets) <= 0) else ""),
                shard=k,
                array="sequence_offsets",
            )
            return None
        return offsets

    def _check_listing(self, k: int, arrays: dict[str, ArrayFiles], n: int, n_blocks: int) -> None:
        """Every file below n_committed exists; hidden files' indexes list every chunk."""
        for name in self.row_names:
            files = arrays[name]
            for b in range(n_blocks):
                if not files.path(b).exists():
                    self.error(
                        "missing_chunk",
                        "chunk file is missing (zarr would read it as zeros)",
                        shard=k,
                        array=name,
                        chunk=files.key(b),
                        rows=[b * files.rows_per_file, min((b + 1) * files.rows_per_file, n)],
                    )

    # the streaming pass -----------------------------------------------------------------------

    def _check_blocks(self, plans: list[ShardPlan]) -> None:
        blocks = [(plan, b) for plan in plans for b in range(plan.n_blocks)]
        if self.sample < 1.0:
            keep = max(1, round(self.sample * len(blocks))) if blocks else 0
            chosen = (
                set(self.rng.choice(len(blocks), size=keep, replace=False).tolist())
                if keep
                else set()
            )
            blocks = [block for i, block in enumerate(blocks) if i in chosen]
            for plan in plans:
                plan.summary.generated_rows = None
        else:
            for plan in plans:
                plan.summary.generated_rows = 0
        total = sum(self._block_bytes(plan, b) for plan, b in blocks)
        from tqdm import tqdm

        with tqdm(
            total=total, unit="B", unit_scale=True, desc="validate", disable=not self.progress
        ) as bar:
            for plan, b in blocks:
                checked = self._check_block(plan, b)
                self.report.bytes_checked += checked
                bar.update(checked)

    def _block_bytes(self, plan: ShardPlan, b: int) -> int:
        return sum(
            plan.arrays[name].path(b).stat().st_size if plan.arrays[name].path(b).exists() else 0
            for name in self.row_names
        )

    def _check_block(self, plan: ShardPlan, b: int) -> int:
        """Decode and check rows [b*F, (b+1)*F) of one shard: one file of each row array."""
        k, arrays, n, offsets = plan.shard, plan.arrays, plan.n, plan.offsets
        hidden = arrays["hidden_states"]
        start = b * hidden.rows_per_file
        stop = min(start + hidden.rows_per_file, n)
        checked = self._check_hidden_file(k, "hidden_states", hidden, b, start, stop)
        if LAYER_STATES in arrays:
            checked += self._check_hidden_file(
                k, LAYER_STATES, arrays[LAYER_STATES], b, start, stop
            )
        columns: dict[str, np.ndarray] = {}
        for name in ("tokens", "input_ids", "sample_ids", "is_generated"):
            files = arrays[name]
            data = files.read_file(b)
            if data is None:
                continue  # reported by the listing
            checked += len(data)
            try:
                columns[name] = files.decode(data)[: stop - start]
            except ChunkError as error:
                self.error(
                    error.check,
                    str(error),
                    shard=k,
                    array=name,
                    chunk=files.key(b),
                    rows=[start, stop],
                )
        self._check_values(k, columns, offsets, start, stop, plan.summary)
        return checked

    def _check_hidden_file(
        self, k: int, name: str, files: ArrayFiles, b: int, start: int, stop: int
    ) -> int:
        """Check one sharded file of states (hidden_states or layer_states): index, chunks, values."""
        data = files.read_file(b)
        if data is None:
            return 0  # reported by the listing
        key = files.key(b)
        try:
            # zarr writes the in-bounds chunks of a file (the last file of a shard may be partial)
            in_bounds = min(files.shape[0] - start, files.rows_per_file)
            index = files.shard_index(data, -(-in_bounds // files.rows_per_chunk))
        except ChunkError as error:
            self.error(error.check, str(error), shard=k, array=name, chunk=key, rows=[start, stop])
            return len(data)
        c = files.rows_per_chunk
        view = memoryview(data)
        for i in range(-(-(stop - start) // c)):
            rows = [start + i * c, min(start + (i + 1) * c, stop)]
            where = {"shard": k, "array": name, "chunk": f"{key}#{i}", "rows": rows}
            offset, nbytes = (int(x) for x in index[i])
            if offset == EMPTY:
                self.error(
                    "missing_chunk",
                    "chunk is absent from its shard file (zarr would read zeros)",
                    **where,
                )
                continue
            if offset + nbytes > len(data):
                self.error(
                    "truncated",
                    f"chunk ends at byte {offset + nbytes} of a {len(data)}-byte file",
                    **where,
                )
                continue
            try:
                values = files.decode(view[offset : offset + nbytes])[: rows[1] - rows[0]]
            except ChunkError as error:
                self.error(error.check, str(error), **where)
                continue
            bad = ~_finite_rows(values, self.hidden_dtype)
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                self.error(
                    "non_finite",
                    f"{int(bad.sum())} rows hold NaN or Inf (first: row {rows[0] + first})",
                    **{**where, "rows": [rows[0] + first, rows[0] + first + 1]},
                )
        return len(data)

    def _check_values(
        self,
        k: int,
        columns: dict[str, np.ndarray],
        offsets: np.ndarray,
        start: int,
        stop: int,
        summary: ShardSummary,
    ) -> None:
        for name in ("tokens", "input_ids"):
            if name in columns:
                values = columns[name]
                bad = np.flatnonzero((values < 0) | (values >= self.vocab_size))
                if bad.size:
                    row = start + int(bad[0])
                    self.error(
                        "token_range",
                        f"{bad.size} ids outside [0, vocab_size={self.vocab_size}) "
                        f"(first: {int(values[bad[0]])} "
                        f"at row {row})",
                        shard=k,
                        array=name,
                        rows=[row, row + 1],
                    )
        if "is_generated" in columns and summary.generated_rows is not None:
            summary.generated_rows += int(columns["is_generated"].sum())
        # Pairs (l, l + 1) inside one sequence. The previous block's last row joins this block so
        # the pair straddling the boundary is checked too.
        carry = self.carry.get(k)
        first = start
        if (
            carry is not None
            and carry["row"] == start - 1
            and carry.keys() - {"row"} <= columns.keys()
        ):
            columns = {
                name: np.concatenate([carry[name], columns[name]])
                for name in carry
                if name != "row"
            }
            first = start - 1
        self.carry[k] = {"row": stop - 1, **{name: values[-1:] for name, values in columns.items()}}
        length = stop - first
        inside = np.ones(max(length - 1, 0), dtype=bool)
        starts = offsets[(offsets > first) & (offsets < stop)] - first
        inside[starts - 1] = False  # l + 1 starts a new sequence
        # A generated answer feeds each output back in; a teacher-forced one is text the model may
        # disagree with (the trainer masks labels past a disagreement), so it is not checked.
        teacher_forced = self.root.get("collection", {}).get("mode") == "teacher_forced"
        if not teacher_forced and {"tokens", "input_ids", "is_generated"} <= columns.keys():
            generated = columns["is_generated"][:-1] & inside
            wrong = np.flatnonzero(generated & (columns["input_ids"][1:] != columns["tokens"][:-1]))
            if wrong.size:
                row = first + int(wrong[0])
                self.error(
                    "generated_input",
                    f"{wrong.size} generated positions whose token is not "
                    "the next position's input "
                    f"(first: tokens[{row}] != input_ids[{row + 1}])",
                    shard=k,
                    array="input_ids",
                    rows=[row, row + 2],
                )
        if "sample_ids" in columns:
            changes = np.flatnonzero(
                inside & (columns["sample_ids"][1:] != columns["sample_ids"][:-1])
            )
            if changes.size:
                row = first + int(changes[0]) + 1
                self.error(
                    "sample_ids",
                    f"sample_id changes inside a sequence at row {row}",
                    shard=k,
                    array="sample_ids",
                    rows=[row, row + 1],
                )


def _finite_rows(values: np.ndarray, hidden_dtype: str) -> np.ndarray:
    """values: [C, H] or [C, n, H] stored -> [C] bool, True where every entry is finite."""
    values = values.reshape(len(values), -1)
    if hidden_dtype == "bfloat16":  # exponent bits all ones = Inf or NaN
        return ~np.any((values & 0x7F80) == 0x7F80, axis=1)
    return np.isfinite(values).all(axis=1)


def validate_store(
    path: str | Path, sample: float = 1.0, *, seed: int = 0, progress: bool = False
) -> ValidationReport:
    """Check a store (its path or the output_dir holding it); see the module docstring.

    sample: fraction of row blocks (one hidden-state file + one chunk of each row array) decoded.
    """
    if not 0.0 < sample <= 1.0:
        raise StoreError(f"sample must be in (0, 1], got {sample}")
    path = resolve_store_path(path)
    return Validator(path, sample, seed, progress).run()


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dmtp.cli import add_config_arguments

    add_config_arguments(parser, ValidateConfig)


def run(args: argparse.Namespace) -> int:
    from dmtp.cli import config_from_args

    config: ValidateConfig = config_from_args(ValidateConfig, args)
    report = validate_store(
        config.data_dir, config.sample, seed=config.seed, progress=config.progress
    )
    print(report.summary())
    if config.report:
        Path(config.report).parent.mkdir(parents=True, exist_ok=True)
        Path(config.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report written to {config.report}")
    return 0 if report.ok else 1
