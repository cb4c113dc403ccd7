"""`dmtp import-pt`: convert the original scripts' `.pt` files into a store, streaming.

    dmtp import-pt old_run/collected_data_final --vocab_size 151936 --output_dir dmtp_data

The original format holds fixed windows of `S = sample_size` positions:

    hidden_states.pt [N, S, H]   tokens.pt [N, S]   input_ids.pt [N, S]   sample_ids.pt [N]

and consecutive windows of one sample overlap by `S - stride` positions. Each sample becomes one
sequence, every position stored once: a window's rows already present in its predecessor are
dropped. The shift between two windows is `--stride` when their overlapping `input_ids` and
`tokens` agree there, else the smallest shift at which they agree (a last window aligned to the
sample's end has its own shift), else none (the window is appended whole, and counted).

Files are opened with `torch.load(mmap=True, weights_only=True)`: nothing is unpickled, and only
the window being converted is read into memory.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmtp.config import STORE_DIRNAME, ImportPtConfig
from dmtp.errors import InputDataError, StoreError
from dmtp.store import (
    SequenceRows,
    ShardWriter,
    Store,
    count_samples,
    create_store,
    encode_hidden_states,
    remove_store,
)

PT_FILES = ("hidden_states", "tokens", "input_ids", "sample_ids")
MIN_OVERLAP = 8  # positions two windows must share before a searched shift counts as overlap
HIDDEN_DTYPES = {
    "torch.bfloat16": "bfloat16",
    "torch.float16": "float16",
    "torch.float32": "float32",
}


@dataclass
class ImportResult:
    store_path: Path
    windows: int
    sequences: int
    rows: int  # stored positions (after de-duplication)
    window_rows: int  # positions in the .pt files (N x S)
    stride: int | None  # the shift most pairs of windows had
    unmatched_pairs: int  # windows of one sample with no agreeing overlap (appended whole)
    generated_rows: int


def find_pt_dir(path: Path) -> Path:
    """The folder holding the four files: `path` itself or `path/collected_data_final`."""
    for candidate in (path, path / STORE_DIRNAME):
        if all((candidate / f"{name}.pt").exists() for name in PT_FILES):
            return candidate
    missing = [f"{name}.pt" for name in PT_FILES if not (path / f"{name}.pt").exists()]
    raise InputDataError(
        f"{path}: missing {', '.join(missing)} (expected the original scripts' output)"
    )


def load_pt_arrays(directory: Path) -> dict[str, Any]:
    """Memory-mapped tensors; shapes checked against each other."""
    import torch

    arrays = {}
    for name in PT_FILES:
        path = directory / f"{name}.pt"
        try:
            arrays[name] = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except Exception as error:  # a legacy (non-zip) file cannot be mmapped; pickle is refused
            raise InputDataError(f"{path}: cannot load as a plain tensor: {error}") from error
        if not isinstance(arrays[name], torch.Tensor):
            raise InputDataError(
                f"{path}: holds a {type(arrays[name]).__name__}, expected one tensor"
            )
    hidden, tokens = arrays["hidden_states"], arrays["tokens"]
    if hidden.dim() != 3:
        raise InputDataError(
            f"{directory}/hidden_states.pt: shape {tuple(hidden.shape)}, expected [N, S, H]"
        )
    n, s, _ = hidden.shape
    for name in ("tokens", "input_ids"):
        if tuple(arrays[name].shape) != (n, s):
            raise InputDataError(
                f"{directory}/{name}.pt: shape {tuple(arrays[name].shape)}, expected [{n}, {s}]"
            )
    if tuple(arrays["sample_ids"].reshape(-1).shape) != (n,):
        raise InputDataError(
            f"{directory}/sample_ids.pt: shape {tuple(arrays['sample_ids'].shape)}, expected [{n}]"
        )
    if str(hidden.dtype) not in HIDDEN_DTYPES:
        raise InputDataError(
            f"{directory}/hidden_states.pt: dtype {hidden.dtype} is not bf16/fp16/fp32"
        )
    if tokens.dtype.is_floating_point or arrays["input_ids"].dtype.is_floating_point:
        raise InputDataError(f"{directory}: tokens/input_ids must be integer tensors")
    return arrays


def overlap_shift(
    previous: tuple[np.ndarray, np.ndarray], window: tuple[np.ndarray, np.ndarray], hint: int | None
) -> int | None:
    """Shift d (1 <= d < S) with window[:S-d] == previous[d:] in input_ids and tokens, or None.

    Tries `hint` first, then, smallest first, the shifts where window's first position recurs and
    the overlap is long enough (MIN_OVERLAP) not to be a coincidence of a few common tokens.
    """
    size = len(previous[0])
    starts = np.flatnonzero((previous[0] == window[0][0]) & (previous[1] == window[1][0]))
    searched = starts[(starts >= 1) & (size - starts >= min(MIN_OVERLAP, size - 1))]
    candidates = ([hint] if hint is not None and 1 <= hint < size else []) + searched.tolist()
    for d in candidates:
        if all(np.array_equal(p[d:], w[: size - d]) for p, w in zip(previous, window, strict=True)):
            return d
    return None


def generated_rows(tokens: np.ndarray, input_ids: np.ndarray, mode: str) -> np.ndarray:
    """[T] bool: which rows' tokens were generated (see ImportPtConfig.generated)."""
    n = len(tokens)
    if mode != "infer":
        return np.full(n, mode == "all")
    follows = input_ids[1:] == tokens[:-1]  # row l's output is row l + 1's input
    breaks = np.flatnonzero(~follows)
    first = int(breaks[-1]) + 1 if breaks.size else 0
    generated = np.zeros(n, dtype=bool)
    if first < n - 1:  # the tail needs at least one confirming pair; the last row rides along
        generated[first:] = True
    return generated


class SequenceAssembler:
    """Joins the windows of one sample into one sequence of unique rows."""

    def __init__(self, stride: int | None):
        self.hint = stride
        self.shifts: Counter[int] = Counter()  # shifts between windows, last pairs left out
        self.unmatched = 0
        self.reset(None)

    def reset(self, sample_id: int | None) -> None:
        self.sample_id = sample_id
        self.parts: list[dict[str, np.ndarray]] = []
        self.pair_shifts: list[int] = []
        self.last: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, window: dict[str, np.ndarray]) -> None:
        key = (window["input_ids"], window["tokens"])
        if self.last is None:
            self.parts.append(window)
        else:
            size = len(window["tokens"])
            shift = overlap_shift(self.last, key, self.hint)
            if shift is None:
                self.unmatched += self.hint != size  # back to back is what the user said
                shift = size
            elif self.hint is None:
                self.hint = shift  # windows of one run share their stride; verified pair by pair
            self.pair_shifts.append(shift)
            self.parts.append({k: v[size - shift :] for k, v in window.items()})
        self.last = key

    def sequence(self) -> dict[str, np.ndarray]:
        # a sample's last window may be aligned to its end, so its shift says nothing of the stride
        self.shifts.update(self.pair_shifts[:-1])
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}


def check_token_range(source: Path, arrays: dict[str, Any], vocab_size: int) -> None:
    """Every id in tokens.pt and input_ids.pt lies in [0, vocab_size); read a slice at a time."""
    for name in ("tokens", "input_ids"):
        ids = arrays[name]
        for start in range(0, len(ids), 4096):
            block = ids[start : start + 4096]
            bad = (block < 0) | (block >= vocab_size)
            if bool(bad.any()):
                window, position = (int(x) for x in bad.nonzero()[0])
                raise InputDataError(
                    f"{source}/{name}.pt: window {start + window} position {position} holds id "
                    f"{int(block[window, position])}, outside the vocabulary [0, {vocab_size}); "
                    "check --vocab_size"
                )


def vocab_size_of(config: ImportPtConfig) -> int:
    if config.vocab_size is not None:
        return config.vocab_size
    if config.base_model_path is not None:
        path = Path(config.base_model_path) / "config.json"
        try:
            model_config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise InputDataError(f"{path}: cannot read the model's config ({error})") from error
        model_config = model_config.get("text_config", model_config)
        if "vocab_size" not in model_config:
            raise InputDataError(f"{path}: has no vocab_size; pass --vocab_size")
        return int(model_config["vocab_size"])
    raise InputDataError(
        "the .pt files do not record the vocabulary size: pass --vocab_size (e.g. 151936 for "
        "Qwen2.5) or --base_model_path"
    )


def import_pt(config: ImportPtConfig, progress: bool = True) -> ImportResult:
    """Convert `config.input_dir` into a store at `config.store_path`."""
    import torch
    from tqdm import tqdm

    source = find_pt_dir(Path(config.input_dir))
    arrays = load_pt_arrays(source)
    vocab_size = vocab_size_of(config)
    n, size, hidden_size = arrays["hidden_states"].shape
    check_token_range(source, arrays, vocab_size)  # before anything is written
    path = config.store_path
    if (path / "zarr.json").exists():
        if not config.overwrite:
            raise StoreError(
                f"{path} already exists; pass --overwrite to replace it "
                "or choose another --output_dir"
            )
        remove_store(path)
    hidden_dtype = HIDDEN_DTYPES[str(arrays["hidden_states"].dtype)]
    store: Store = create_store(
        path,
        attrs={
            "collection": {
                "mode": "imported_pt",
                "sample_size": int(size),
                "stride": config.stride,
            },
            "imported_from": str(source.resolve()),
            "base_model": {"name_or_path": config.base_model_path},
        },
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        hidden_dtype=hidden_dtype,
        num_shards=1,
        layout=config.layout,
    )
    writer = ShardWriter(store, 0)
    assembler = SequenceAssembler(config.stride)
    sample_ids = arrays["sample_ids"].reshape(-1)
    generated_total = 0
    seen_samples: set[int] = set()
    reappeared = 0

    def flush() -> None:
        nonlocal generated_total
        if not assembler.parts:
            return
        rows = assembler.sequence()
        generated = generated_rows(rows["tokens"], rows["input_ids"], config.generated)
        generated_total += int(generated.sum())
        writer.append(
            SequenceRows(
                hidden_states=rows["hidden_states"],
                tokens=rows["tokens"].astype(np.int32),
                input_ids=rows["input_ids"].astype(np.int32),
                sample_ids=np.full(len(rows["tokens"]), assembler.sample_id, dtype=np.int64),
                is_generated=generated,
            )
        )
        writer.mark_resume_point()

    with torch.inference_mode():
        for i in tqdm(range(n), desc="import-pt", unit="window", disable=not progress):
            sample_id = int(sample_ids[i])
            if sample_id != assembler.sample_id:
                flush()
                reappeared += sample_id in seen_samples  # not adjacent: a separate sequence
                seen_samples.add(sample_id)
                assembler.reset(sample_id)
            window = {
                "hidden_states": encode_hidden_states(arrays["hidden_states"][i]).copy(),
                "tokens": arrays["tokens"][i].numpy().astype(np.int64),
                "input_ids": arrays["input_ids"][i].numpy().astype(np.int64),
            }
            assembler.add(window)
        flush()
    # no repeated shift seen: windows were back to back (or every sample had at most two)
    stride = config.stride or (assembler.shifts.most_common(1)[0][0] if assembler.shifts else size)
    # the stride is known only now; readers count samples with it (--max_samples)
    collection = {**store.attrs["collection"], "stride": int(stride)}
    store.group.update_attributes({"collection": collection})
    writer.finish(
        {
            "n_samples": count_samples(writer.sequence_lengths, size, stride),
            "windows": int(n),
            "unmatched_window_pairs": assembler.unmatched,
            "reappearing_sample_ids": reappeared,
        }
    )
    return ImportResult(
        store_path=path,
        windows=int(n),
        sequences=writer.n_sequences,
        rows=writer.total_rows,
        window_rows=int(n * size),
        stride=stride,
        unmatched_pairs=assembler.unmatched,
        generated_rows=generated_total,
    )


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dmtp.cli import add_config_arguments

    parser.add_argument(
        "source", nargs="?", help="folder holding the .pt files (same as --input_dir)"
    )
    add_config_arguments(parser, ImportPtConfig)


def run(args: argparse.Namespace) -> int:
    from dmtp.cli import config_from_args

    if args.source is not None:
        args.input_dir = args.source
    config: ImportPtConfig = config_from_args(ImportPtConfig, args)
    result = import_pt(config)
    print(
        f"imported {result.windows:,} windows ({result.window_rows:,} positions) into "
        f"{result.sequences:,} sequences of {result.rows:,} unique rows at {result.store_path}; "
        f"stride {result.stride}, {result.generated_rows:,} generated rows"
    )
    if result.unmatched_pairs:
        print(
            f"note: {result.unmatched_pairs} pairs of windows of one sample share no overlap and "
            "were appended whole; if the windows were back to back, pass --stride equal to the "
            "sample size to say so"
        )
    return 0
