"""Training-example throughput and memory: the chunk-aware loader vs the alternatives, side by side.

    .venv/bin/python tests/benchmarks/bench_loader.py            # 3 GB store, Qwen2.5-7B width
    .venv/bin/python tests/benchmarks/bench_loader.py --size_gb 8 --seconds 60

Builds, in a temporary folder removed afterwards, a store of `--size_gb` of synthetic bf16 hidden
states (dmtp.synthetic, written by the real ShardWriter) plus the same rows as the original
scripts' `.pt` files (windows of 512, stride 512: no duplication, so the comparison is kind to
them). Then, each in a fresh process so peak RSS is its own:

- loader:   `create_dataloaders` (chunk-aware), num_workers 0 and 2, on the full store and on a
            quarter-size store (peak RSS should not grow with the store);
- naive:    the map-style `dataset[i]` under a shuffling DataLoader: one chunk decompressed per
            example, i.e. per-position random access on the same store;
- pt:       the original approach: torch.load the whole `.pt` arrays into RAM, one example per
            (window, position), shuffled.

Prints examples/s, peak RSS and the ratios, plus `dmtp validate` MB/s on the full store. The page
cache is warm for every reader (the files were just written), so these are CPU-bound figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN_SIZE = 3584  # Qwen2.5-7B
VOCAB_SIZE = 152064
SEQUENCE_LENGTH = 2048  # a multiple of the .pt window, so the windows tile sequences exactly
WINDOW = 512
BATCH_SIZE = 128
BLOCK_LENGTH = 4


def machine() -> str:
    import psutil
    import torch
    import zarr

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or platform.machine()
    return (
        f"{psutil.cpu_count()} CPU cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}, zarr {zarr.__version__}"
    )


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# the measured sides (each runs in its own process: `--measure NAME`)


def timed_iteration(batches, seconds: float) -> tuple[int, float]:
    """Iterate until `seconds` pass (after one warm-up batch); returns (examples, seconds)."""
    iterator = iter(batches)
    next(iterator)
    examples, start = 0, time.perf_counter()
    for batch in iterator:
        examples += len(batch["labels"])
        if time.perf_counter() - start > seconds:
            break
    return examples, time.perf_counter() - start


def measure_loader(store: str, seconds: float, num_workers: int) -> dict:
    from dmtp.data import create_dataloaders

    start = time.perf_counter()
    train_dl, _, _ = create_dataloaders(
        store, BLOCK_LENGTH, BATCH_SIZE, 0.9, num_workers=num_workers
    )
    setup = time.perf_counter() - start

    def epochs():
        epoch = 0
        while True:
            train_dl.set_epoch(epoch)
            yield from train_dl
            epoch += 1

    examples, elapsed = timed_iteration(epochs(), seconds)
    return {"examples": examples, "seconds": elapsed, "setup_seconds": setup}


def measure_naive(store: str, seconds: float) -> dict:
    import torch

    from dmtp.data import create_dataloaders

    _, _, dataset = create_dataloaders(store, BLOCK_LENGTH, BATCH_SIZE, 0.9)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    examples, elapsed = timed_iteration(loader, seconds)
    return {"examples": examples, "seconds": elapsed}


class WindowDataset:
    """The original scripts' view: example (window, position) of in-RAM [N, S] arrays."""

    def __init__(self, directory: Path, mask_token_id: int):
        import torch

        self.hidden_states = torch.load(directory / "hidden_states.pt", weights_only=True)
        self.tokens = torch.load(directory / "tokens.pt", weights_only=True)
        self.mask_token_id = mask_token_id

    def __len__(self) -> int:
        return self.tokens.numel()

    def __getitem__(self, i: int) -> dict:
        import torch

        window, position = divmod(i, self.tokens.shape[1])
        labels = torch.full((BLOCK_LENGTH,), -100, dtype=torch.long)
        following = self.tokens[window, position : position + BLOCK_LENGTH]
        labels[: len(following)] = following
        return {
            "in_hidden_states": self.hidden_states[window, position],
            "input_ids": torch.full((BLOCK_LENGTH,), self.mask_token_id, dtype=torch.long),
            "labels": labels,
            "attention_mask": torch.ones(BLOCK_LENGTH, dtype=torch.long),
        }


def measure_pt(directory: str, seconds: float) -> dict:
    import torch

    start = time.perf_counter()
    dataset = WindowDataset(Path(directory), VOCAB_SIZE)
    load = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    examples, elapsed = timed_iteration(loader, seconds)
    return {"examples": examples, "seconds": elapsed, "setup_seconds": load}


def measure_validate(store: str) -> dict:
    from dmtp.validate import validate_store

    report = validate_store(store)
    assert report.ok, report.summary()
    return {"megabytes": report.bytes_checked / 1e6, "seconds": report.seconds}


# ----------------------------------------------------------------------------------------------
# building the data


def build_store(path: Path, size_gb: float, seed: int) -> int:
    from dmtp.config import StoreLayout
    from dmtp.synthetic import write_synthetic_store

    row_bytes = HIDDEN_SIZE * 2
    n_sequences = max(1, round(size_gb * 1e9 / row_bytes / SEQUENCE_LENGTH))
    write_synthetic_store(
        path,
        sequence_lengths=[SEQUENCE_LENGTH] * n_sequences,
        hidden_size=HIDDEN_SIZE,
        vocab_size=VOCAB_SIZE,
        hidden_dtype="bfloat16",
        layout=StoreLayout(),
        seed=seed,
    )
    return n_sequences * SEQUENCE_LENGTH


def export_pt(store_path: Path, directory: Path) -> None:
    """The same rows as the original format: [N, 512, H] windows, stride 512."""
    import numpy as np
    import torch

    from dmtp.store import decode_hidden_states, open_store

    store = open_store(store_path)
    n_rows = store.n_rows
    n_windows = n_rows // WINDOW
    hidden = torch.empty((n_windows, WINDOW, HIDDEN_SIZE), dtype=torch.bfloat16)
    tokens = torch.empty((n_windows, WINDOW), dtype=torch.long)
    input_ids = torch.empty((n_windows, WINDOW), dtype=torch.long)
    sample_ids = torch.empty(n_windows, dtype=torch.long)
    flat_hidden, flat_tokens, flat_inputs = (
        hidden.view(-1, HIDDEN_SIZE),
        tokens.view(-1),
        input_ids.view(-1),
    )
    shard = store.shard(0)
    step = store.layout.rows_per_file
    for start in range(0, n_rows, step):
        rows = shard.read_rows(start, start + step)
        stop = start + len(rows)
        flat_hidden[start:stop] = decode_hidden_states(rows.hidden_states, "bfloat16")
        flat_tokens[start:stop] = torch.from_numpy(rows.tokens.astype(np.int64))
        flat_inputs[start:stop] = torch.from_numpy(rows.input_ids.astype(np.int64))
        sample_ids[start // WINDOW : stop // WINDOW] = torch.from_numpy(
            rows.sample_ids[::WINDOW].copy()
        )
    directory.mkdir(parents=True)
    for name, tensor in (
        ("hidden_states", hidden),
        ("tokens", tokens),
        ("input_ids", input_ids),
        ("sample_ids", sample_ids),
    ):
        torch.save(tensor, directory / f"{name}.pt")


def run_side(args: list[str]) -> dict:
    """Run one measurement in a fresh process; returns its JSON plus its peak RSS."""
    result = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size_gb", type=float, default=3.0, help="hidden-state bytes in the full store"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="time each side iterates")
    parser.add_argument(
        "--workdir", default=None, help="where to build (default: the system temp dir)"
    )
    parser.add_argument(
        "--measure", choices=["loader", "naive", "pt", "validate"], help=argparse.SUPPRESS
    )
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--num_workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        if args.measure == "loader":
            result = measure_loader(args.path, args.seconds, args.num_workers)
        elif args.measure == "naive":
            result = measure_naive(args.path, args.seconds)
        elif args.measure == "pt":
            result = measure_pt(args.path, args.seconds)
        else:
            result = measure_validate(args.path)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    workdir = Path(args.workdir or tempfile.gettempdir())
    needed = args.size_gb * 1e9 * (1 + 1.0 + 0.25) * 1.1  # store + .pt copy + quarter store, margin
    free = shutil.disk_usage(workdir).free
    if free < needed:
        sys.exit(
            f"bench_loader: needs ~{needed / 1e9:.1f} GB free in {workdir}, "
            f"has {free / 1e9:.1f} GB; lower --size_gb"
        )
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="dmtp-bench-loader-", dir=workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        rows = build_store(root / "full", args.size_gb, seed=0)
        built = time.perf_counter() - start
        print(
            f"built {rows:,} rows x {HIDDEN_SIZE} bf16 "
            f"({rows * HIDDEN_SIZE * 2 / 1e9:.2f} GB) in {built:.0f} s"
        )
        build_store(root / "quarter", args.size_gb / 4, seed=1)
        export_pt(root / "full", root / "pt")
        print(f"exported the same rows as .pt windows ({WINDOW}, stride {WINDOW})")

        seconds = ["--seconds", str(args.seconds)]
        sides = {
            "loader": run_side(["--measure", "loader", "--path", str(root / "full"), *seconds]),
            "loader, 2 workers": run_side(
                [
                    "--measure",
                    "loader",
                    "--path",
                    str(root / "full"),
                    "--num_workers",
                    "2",
                    *seconds,
                ]
            ),
            "loader, 1/4 store": run_side(
                ["--measure", "loader", "--path", str(root / "quarter"), *seconds]
            ),
            "naive random access": run_side(
                ["--measure", "naive", "--path", str(root / "full"), *seconds]
            ),
            "original .pt in RAM": run_side(
                ["--measure", "pt", "--path", str(root / "pt"), *seconds]
            ),
        }
        validate = run_side(["--measure", "validate", "--path", str(root / "full")])

    rate = {name: side["examples"] / side["seconds"] for name, side in sides.items()}
    print(f"\n{'side':<22} {'examples/s':>12} {'vs naive':>9} {'peak RSS MB':>12} {'setup s':>8}")
    for name, side in sides.items():
        print(
            f"{name:<22} {rate[name]:>12,.0f} {rate[name] / rate['naive random access']:>8.1f}x "
            f"{side['peak_rss_mb']:>12,.0f} {side.get('setup_seconds', 0):>8.1f}"
        )
    print(
        f"\nloader / naive: {rate['loader'] / rate['naive random access']:.1f}x (target >= 20x); "
        f"loader / original .pt: {rate['loader'] / rate['original .pt in RAM']:.2f}x; "
        f"peak RSS loader {sides['loader']['peak_rss_mb']:,.0f} MB (1/4 store: "
        f"{sides['loader, 1/4 store']['peak_rss_mb']:,.0f} MB) "
        f"vs .pt {sides['original .pt in RAM']['peak_rss_mb']:,.0f} MB"
    )
    print(
        f"dmtp validate: {validate['megabytes']:,.0f} MB in {validate['seconds']:.1f} s = "
        f"{validate['megabytes'] / validate['seconds']:,.0f} MB/s (page cache warm)"
    )
    print("(2 workers: peak RSS is the main process only)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
