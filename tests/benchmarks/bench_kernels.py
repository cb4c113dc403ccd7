"""Base-model forwards on nn.Linear vs prepacked oneDNN linears (dmtp/kernels.py), side by side.

    .venv/bin/python tests/benchmarks/bench_kernels.py                  # SmolLM2-135M, float32
    .venv/bin/python tests/benchmarks/bench_kernels.py --dtype bfloat16 --reps 20

Two copies of the base model, one with its linear layers packed, alternate in one run:
1. a forward of T = 1..8 tokens after a cache of --context tokens (what a verification of T - 1
   drafts costs), median of --reps, and its cost relative to one token's: the ratio speculative
   decoding's τ is divided by;
2. greedy decoding of the held-out demo prompts, tokens/s, and whether both produce the same tokens.
Prints the machine and the load average: timings only mean something on idle cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from bench_specdec import machine  # noqa: E402  (the script folder is on sys.path)

from dmtp.config import DEMO_EVAL_PROMPTS, EvalConfig
from dmtp.evaluate import load_eval_prompts
from dmtp.kernels import pack_linears
from dmtp.models import eos_token_ids, load_base_model
from dmtp.specdec import _forward, _rollback, greedy_decode, new_cache


def forward_costs(
    models: dict, context: int, reps: int, rows: range
) -> dict[str, dict[int, float]]:
    """Median ms of a forward of T tokens after `context` cached ones, per model, interleaved."""
    times: dict[str, dict[int, list[float]]] = {name: {t: [] for t in rows} for name in models}
    caches = {}
    for name, model in models.items():
        caches[name] = new_cache(model)
        _forward(model, list(range(1000, 1000 + context)), caches[name], last_only=True)
    for rep in range(reps + 2):  # two warm-up passes
        for name, model in models.items():
            for t in rows:
                start = time.perf_counter()
                _forward(model, list(range(2000, 2000 + t)), caches[name])
                elapsed = time.perf_counter() - start
                _rollback(caches[name], context)
                if rep >= 2:
                    times[name][t].append(1000 * elapsed)
    return {name: {t: statistics.median(v) for t, v in d.items()} for name, d in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base_model_path", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--max_rows", type=int, default=8)
    parser.add_argument("--input_data_path", default=str(DEMO_EVAL_PROMPTS))
    parser.add_argument("--max_prompts", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)

    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    plain = load_base_model(args.base_model_path, "cpu", args.dtype)
    packed = load_base_model(args.base_model_path, "cpu", args.dtype)
    count = pack_linears(packed.model)
    print(
        f"base model: {plain.identity['name_or_path']} ({args.dtype}), {count} linear layers packed"
    )
    models = {"nn.Linear": plain.model, "packed": packed.model}
    rows = range(1, args.max_rows + 1)
    with torch.inference_mode():
        costs = forward_costs(models, args.context, args.reps, rows)
    print(
        f"\nforward of T tokens after {args.context} cached, median of {args.reps} (ms; x = / T=1)"
    )
    print(f"{'':10}" + "".join(f"{'T=' + str(t):>13}" for t in rows))
    for name, by_rows in costs.items():
        cells = "".join(f"{by_rows[t]:>7.1f} {by_rows[t] / by_rows[1]:>4.2f}x" for t in rows)
        print(f"{name:10}{cells}")
    ratio = [costs["nn.Linear"][t] / costs["packed"][t] for t in rows]
    print(f"{'speedup':10}" + "".join(f"{r:>12.2f}x" for r in ratio))

    config = EvalConfig(
        base_model_path=args.base_model_path,
        input_data_path=args.input_data_path,
        max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens,
        block_length=4,
    )
    prompts = load_eval_prompts(config.prompts_path, plain, config, 4)
    eos = eos_token_ids(plain)
    seconds = {name: 0.0 for name in models}
    tokens = {name: 0 for name in models}
    same = 0
    for prompt in prompts:
        outputs = {}
        for name, model in models.items():
            result = greedy_decode(model, prompt.ids, prompt.max_new_tokens, eos)
            seconds[name] += result.seconds
            tokens[name] += len(result.tokens)
            outputs[name] = result.tokens
        same += outputs["nn.Linear"] == outputs["packed"]
    print(f"\ngreedy decoding, {len(prompts)} prompts from {config.prompts_path}")
    for name in models:
        print(f"{name:10} {tokens[name] / seconds[name]:>7.1f} tok/s")
    speedup = (tokens["packed"] / seconds["packed"]) / (tokens["nn.Linear"] / seconds["nn.Linear"])
    print(f"{'speedup':10} {speedup:>7.2f}x; same tokens on {same}/{len(prompts)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
