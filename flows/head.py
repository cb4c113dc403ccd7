"""The recommended head for the embedded default model, trained on a CPU in about an hour: `make head`.

    python -m flows.head                      # 8 shards: collect, train, evaluate (~46 min, 2 idle cores)
    python -m flows.head --data_shards 16     # a bigger data budget: adds shards to the same store

Runs the `collect-and-train` flow in this process (as `make demo` does) with the recipe that
measured best (README, "Draft quality"): SmolLM2-135M-Instruct answers ShareGPT prompts greedily
(its own answers are the training data, DESIGN §4), storing the states of a few layers; a one-layer
block-diffusion head learns to draft the next tokens from them; then speculative decoding with the
head, with prompt lookup, and with the two combined (lookup where it matches, the head elsewhere)
is measured against plain greedy decoding on the ShareGPT conversations held out from training.

The data budget is `--data_shards`: the ShareGPT training split is cut into fixed shards of
`PROMPTS_PER_SHARD` prompts, and the flow collects the first N. A larger N reuses every shard
already collected (cached) and collects only the new ones, so a user buys quality with time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from flows.demo import REPO_ROOT, _environment, report

# ~57k rows a shard (~35k answer tokens, answers up to 256): 3.2-3.4 min on 2 idle CPU cores
# (bf16, batch 32), measured 2026-11-28
PROMPTS_PER_SHARD = 160

# The recipe (README, "Draft quality"). Training settings that have no flow parameter of their own
# travel in `train_options`.
HEAD_PARAMETERS: dict[str, Any] = {
    "input_data_path": "sharegpt",
    "max_new_tokens": 256,
    "batch_size": 32,
    "dtype": "bfloat16",
    # Measured on 2 idle cores: 3 shards 21.3 min end to end; growing them to 8 took 35.7 min more
    # (5 shards collected, 1,445 steps in 11.7 min, evaluation 6.5 min): ~46 min from scratch
    "data_shards": 8,
    "block_length": 4,
    "per_device_train_batch_size": 256,
    # τ kept rising to ~5 epochs of 64 anchors a sequence (README, "Draft quality": 200 steps on
    # 832 answers gave held-out τ 1.21, 1,000 steps 1.35)
    "num_train_epochs": 5.0,
    "learning_rate": 1e-3,
    "warmup_steps": 30,
    "logging_steps": 50,
    "save_steps": 500,
    "eval_input_data_path": "sharegpt-heldout",
    "eval_max_new_tokens": 128,
    "eval_max_prompts": 16,
}
TRAIN_OPTIONS: dict[str, Any] = {
    "feature_layers": "auto",
    # Measured best at this budget: all earlier positions (DFlash's design, what serving engines
    # take) reached held-out τ 1.27 against 1.35 with the same 1,000 steps on 832 answers.
    "context_window": 1,
    "objective": "decode_all",
    "draft_vocab_size": 8192,
    "lr_scheduler_type": "cosine",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.head", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data_root", default=str(REPO_ROOT / "runs" / "head"))
    parser.add_argument(
        "--base_model_path", default=None, help="default: the embedded SmolLM2-135M-Instruct"
    )
    parser.add_argument("--prompts_per_shard", type=int, default=PROMPTS_PER_SHARD)
    for name, value in HEAD_PARAMETERS.items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    parser.add_argument("--refresh_cache", action="store_true", help="redo every stage")
    args = parser.parse_args(argv)
    _environment()
    from flows.collect_and_train import collect_and_train

    parameters = vars(args)
    shards = parameters.pop("data_shards")
    started = time.perf_counter()
    summary = collect_and_train(
        **parameters,
        num_shards=shards,
        train_options=dict(TRAIN_OPTIONS),
    )
    print(
        report(summary, time.perf_counter() - started).replace("dmtp demo", "dmtp head"), flush=True
    )
    print(f"  head path   {Path(summary['head']).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
