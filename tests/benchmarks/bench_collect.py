"""Collection throughput vs plain `model.generate`, side by side in one run.

    .venv/bin/python tests/benchmarks/bench_collect.py                      # default model (SmolLM2-135M)
    .venv/bin/python tests/benchmarks/bench_collect.py --quick              # throughput only (~3 min)
    .venv/bin/python tests/benchmarks/bench_collect.py --prompts 32 --max_new_tokens 128 --batch_size 8
    .venv/bin/python tests/benchmarks/bench_collect.py --debug_model        # tiny random Qwen2

Both sides run the same model object (collection's own defaults: dtype auto, batch size, feature
layers), prompts and generation settings. Plain `model.generate` takes the prompts in file order;
collection adds the hooks, the argmax over prompt positions, the copy to host and the Zarr writes,
and orders prompts by length within runs of batches. Rounds alternate plain/collect to cancel
drift. Both are reported in generated tokens per second (response tokens, not prompt rows), beside
the machine and its load average: timings on busy cores are not speedups. Unless --quick, also
prints peak RSS (and its growth when the prompt count doubles: streaming means it should not
grow) and stored bytes per token for each hidden-state codec.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch

from dmtp.collect import (
    batched,
    collect_shard,
    collection_dtype,
    cpu_has_native_bfloat16,
    encode_prompt,
    eos_token_ids,
    pad_left,
    prepare_store,
)
from dmtp.config import CollectConfig, StoreLayout
from dmtp.models import BaseModel, load_base_model
from dmtp.prompts import iter_prompts, scan_prompts
from dmtp.store import directory_bytes, open_store

SHARED_PROMPTS = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "longwriter"
    / "longbench_write_en.jsonl"
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bf16 = "native bf16" if cpu_has_native_bfloat16() else "no native bf16"
    return (
        f"{platform.node()}: {psutil.cpu_count()} CPU cores ({cpu_name()}, {bf16}), "
        f"{torch.get_num_threads()} torch threads, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}, torch {torch.__version__}"
    )


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


class PeakRSS:
    """Samples this process's RSS every few ms while running."""

    def __enter__(self):
        self.peak, self.stop = psutil.Process().memory_info().rss, False
        self.start_rss = self.peak
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        process = psutil.Process()
        while not self.stop:
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


@torch.no_grad()
def plain_generate(base, config: CollectConfig, prompts_path: Path) -> tuple[float, int]:
    """Seconds and generated tokens of plain batched greedy generation (no hook, no store)."""
    from transformers import GenerationConfig

    tokens, started = 0, time.perf_counter()
    for batch in batched(iter(list(iter_prompts(prompts_path))), config.batch_size):
        encoded = [encode_prompt(p, base.tokenizer) for p in batch]
        ids, mask = pad_left(encoded, base.tokenizer.pad_token_id, base.device)
        generation = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=False,
            top_k=None,
            top_p=None,
            eos_token_id=eos_token_ids(base),
            pad_token_id=base.tokenizer.pad_token_id,
        )
        out = base.model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
        tokens += int((out[:, ids.shape[1] :] != base.tokenizer.pad_token_id).sum())
    if base.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, tokens


def timed_collect(
    base, config: CollectConfig, prompts_path: Path, out: Path, refill: bool = True
) -> tuple[float, int, int, int]:
    """Seconds, stored rows, stored bytes and generated rows of a collection into a fresh store.

    refill=False: batched `generate` per batch, the path collection takes for caches its refilled
    generation cannot edit (measured to show what refilling gains).
    """
    import dmtp.collect

    config = replace(config, input_data_path=str(prompts_path), output_dir=str(out), overwrite=True)
    info = scan_prompts(prompts_path)
    store = prepare_store(config, base, info)
    supported = dmtp.collect.refill_supported
    if not refill:
        dmtp.collect.refill_supported = lambda model: False
    try:
        started = time.perf_counter()
        rows, _ = collect_shard(config, base, store, 0, info.generates)
        seconds = time.perf_counter() - started
    finally:
        dmtp.collect.refill_supported = supported
    shard = open_store(out).shard(0)
    generated = int(shard.array("is_generated")[: shard.n_committed].sum())
    return seconds, rows, directory_bytes(out), generated


RANDOM_SHAPES = {
    # (architecture, hidden, intermediate, layers, heads, kv heads, vocab)
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, 49152),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064),
}


def random_base_model(shape: str, device: str, dtype: str) -> BaseModel:
    """A randomly initialised causal LM of a real model's shape, with the debug tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from dmtp.debug_model import build_tokenizer
    from dmtp.models import resolve_device, resolve_dtype

    arch, hidden, intermediate, layers, heads, kv_heads, vocab = RANDOM_SHAPES[shape]
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    tokenizer = build_tokenizer(320)
    config = config_class(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=8192,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(torch_dtype).eval()
    return BaseModel(
        model,
        tokenizer,
        f"random:{shape}",
        f"random:{shape}",
        f"random-{shape}",
        device,
        torch_dtype,
    )


def take_prompts(source: Path, n: int, dest: Path) -> Path:
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    lines = (lines * (n // len(lines) + 1))[:n]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base_model_path", default=None, help="default: the embedded SmolLM2-135M-Instruct"
    )
    parser.add_argument(
        "--debug_model", action="store_true", help="use the tiny random Qwen2 instead"
    )
    parser.add_argument(
        "--input_data_path",
        default=str(SHARED_PROMPTS if SHARED_PROMPTS.exists() else ""),
        help="prompts file or built-in name (sharegpt: chat prompts whose answers end anywhere "
        "up to the cap, where refilling rows matters); default: LongWriter's English prompts",
    )
    parser.add_argument(
        "--random_shape",
        choices=sorted(RANDOM_SHAPES),
        help="a randomly initialised model of this real shape (what a GPU host without the "
        "weights can measure: throughput depends on the shape, not on the weights)",
    )
    defaults = CollectConfig()
    parser.add_argument("--prompts", type=int, default=2 * defaults.batch_size)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=defaults.dtype)
    parser.add_argument("--feature_layers", default=defaults.feature_layers)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="throughput only: skip the codec and RSS runs"
    )
    parser.add_argument(
        "--compare_generate",
        action="store_true",
        help="also time collection with batched generate instead of refilled rows",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started_load = load_average()

    with tempfile.TemporaryDirectory(prefix="dmtp-bench-collect-") as tmp:
        tmp = Path(tmp)
        model_path = args.base_model_path
        if args.debug_model:
            from dmtp.debug_model import save_debug_model

            model_path = str(save_debug_model(tmp / "tiny-qwen2"))
        from dmtp.sharegpt import resolve_prompt_source

        source = resolve_prompt_source(args.input_data_path) if args.input_data_path else None
        if source is None or not source.exists():
            from dmtp.config import DEMO_PROMPTS

            source = DEMO_PROMPTS
        prompts = take_prompts(source, args.prompts, tmp / "prompts.jsonl")
        from dmtp.models import resolve_device

        device = resolve_device(args.device)
        dtype = collection_dtype(args.dtype, device)
        if args.random_shape:
            base = random_base_model(args.random_shape, device, dtype)
        else:
            base = load_base_model(model_path, device, dtype)
        config = CollectConfig(
            base_model_path=model_path,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            device=base.device,
            dtype=dtype,
            feature_layers=args.feature_layers,
        )
        # warm-up: first calls pay for allocator growth and kernel selection
        warm = take_prompts(source, args.batch_size, tmp / "warm.jsonl")
        plain_generate(base, replace(config, max_new_tokens=8), warm)
        timed_collect(base, replace(config, max_new_tokens=8), warm, tmp / "warm-store")

        plain_s, collect_s, batched_s = [], [], []
        for _ in range(args.rounds):
            seconds, generated = plain_generate(base, config, prompts)
            plain_s.append(seconds)
            seconds, rows, _, collected_generated = timed_collect(
                base, config, prompts, tmp / "store"
            )
            collect_s.append(seconds)
            if args.compare_generate:
                batched_s.append(
                    timed_collect(base, config, prompts, tmp / "store-generate", refill=False)[0]
                )
        plain, collected = statistics.median(plain_s), statistics.median(collect_s)
        print(f"machine: {machine()}")
        print(f"{started_load} at the start, {load_average()} at the end of the timed rounds")
        print(
            f"model: {base.identity['name_or_path']} ({base.hidden_dtype}, hidden {base.hidden_size}) on {base.device}"
        )
        print(
            f"workload: {args.prompts} prompts x up to {args.max_new_tokens} new tokens, batch {args.batch_size}, "
            f"feature layers {args.feature_layers}; plain generate made {generated} tokens, collection "
            f"stored {collected_generated} generated rows ({rows} rows in all)"
        )
        plain_rate, collect_rate = generated / plain, collected_generated / collected
        print(
            f"plain generate:  {plain_rate:8.1f} generated tok/s  ({plain:.2f} s, median of {args.rounds})"
        )
        print(
            f"dmtp collect:    {collect_rate:8.1f} generated tok/s  ({collected:.2f} s)  "
            f"= {rows / collected:.1f} stored rows/s"
        )
        if batched_s:
            batched = statistics.median(batched_s)
            print(
                f"collect, generate per batch: {collected_generated / batched:8.1f} generated tok/s  "
                f"({batched:.2f} s; refilled rows are {batched / collected:.2f}x as fast)"
            )
        print(
            f"throughput ratio collect / plain generate: {collect_rate / plain_rate:.3f}  (target >= 0.95)"
        )
        if args.quick:
            print(
                json.dumps(
                    {
                        "ratio": round(collect_rate / plain_rate, 3),
                        "plain_tok_s": round(plain_rate, 1),
                        "collect_tok_s": round(collect_rate, 1),
                        "load_average": [round(x, 2) for x in os.getloadavg()],
                    }
                )
            )
            return

        results = {}
        for codec in ("none", "zstd"):
            layout = StoreLayout(compressor=codec)
            codec_config = replace(config, layout=layout)
            seconds, rows, stored, _ = timed_collect(
                base, codec_config, prompts, tmp / f"store-{codec}"
            )
            results[codec] = (seconds, stored / rows)
            print(
                f"codec {codec:>4}: {stored / rows:8.1f} bytes stored per token ({stored / 2**20:.1f} MiB for {rows} rows), "
                f"collect {seconds:.2f} s"
            )
        print(f"zstd saves {100 * (1 - results['zstd'][1] / results['none'][1]):.1f}% of bytes")

        with PeakRSS() as small:
            timed_collect(base, config, prompts, tmp / "rss-1x")
        doubled = take_prompts(source, 2 * args.prompts, tmp / "prompts2.jsonl")
        with PeakRSS() as large:
            timed_collect(base, config, doubled, tmp / "rss-2x")
        print(
            f"peak RSS during collection: {small.peak / 2**20:.0f} MiB with {args.prompts} prompts, "
            f"{large.peak / 2**20:.0f} MiB with {2 * args.prompts} prompts "
            f"(process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB)"
        )
        print(
            json.dumps(
                {
                    "ratio": round(collect_rate / plain_rate, 3),
                    "plain_tok_s": round(plain_rate, 1),
                    "collect_tok_s": round(collect_rate, 1),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                    "bytes_per_token": {k: round(v[1], 1) for k, v in results.items()},
                    "peak_rss_mib": [round(small.peak / 2**20), round(large.peak / 2**20)],
                }
            )
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
