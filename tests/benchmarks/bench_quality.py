"""Draft quality side by side: the guide's head, each change alone, the combined best, prompt lookup.

    .venv/bin/python tests/benchmarks/bench_quality.py --data_dir runs/sharegpt --steps 400
    .venv/bin/python tests/benchmarks/bench_quality.py --data_dir D --configs best --sizes 56 112 224 448

Every head is trained on the same store with the same budget (steps × blocks per step), then all
heads and prompt lookup draft for the same base model (the embedded SmolLM2-135M-Instruct unless
--base_model_path) on prompts no head saw: the ShareGPT held-out split (by conversation) and the
demo's held-out prompts. Each prompt is decoded greedily and by every drafter in rotating order,
and every speculative output is checked equal to greedy's. Printed per drafter: τ, acceptance by
block position, speedup (tokens/s ÷ greedy's, same run), the training-time τ proxy, and the
machine with its load average (speedups only mean something on idle cores; τ never depends on the
machine).

Configurations (`--configs`; `seed` is the guide's head, the next four change one thing each):
    seed        final state only, context of 1 position, the guide's literal objective
    objective   seed + train as you decode (position 0 clean, every draft position masked)
    context     seed + all earlier positions as context
    features    seed + every feature layer the store holds
    init        seed + draft layer copied from the base model's last layer
    dflash      features + all earlier positions + decode_all: DFlash's design
    window      the same with a 16-position context window
    best        features + decode_all with the final position only: what measured best on a CPU
                budget (README, "Draft quality")
`--sizes N …` trains `--curve` (default dflash) on the first N sequences of the store for each N
(same epochs), to show what more data buys.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from dmtp.config import DEMO_EVAL_PROMPTS, DataConfig, EvalConfig, TrainConfig
from dmtp.evaluate import (
    decode_prompts,
    load_decoding_base,
    load_eval_prompts,
    load_head_drafter,
    summarize,
)
from dmtp.specdec import PromptLookupDrafter
from dmtp.train import train

SEED_HEAD = {"feature_layers": "last", "context_window": 1, "objective": "seed"}
CONFIGS = {
    "seed": SEED_HEAD,
    "objective": {**SEED_HEAD, "objective": "decode_all"},
    "context": {**SEED_HEAD, "context_window": None},
    "features": {**SEED_HEAD, "feature_layers": "auto"},
    "init": {**SEED_HEAD, "init_from_base": True},
    "dflash": {"feature_layers": "auto", "context_window": None, "objective": "decode_all"},
    "window": {"feature_layers": "auto", "context_window": 16, "objective": "decode_all"},
    "best": {"feature_layers": "auto", "context_window": 1, "objective": "decode_all"},
    # best, first trained on --pretrain_dir (teacher-forced answers: cheap data), then on the store
    "pretrained": {
        "feature_layers": "auto",
        "context_window": 1,
        "objective": "decode_all",
        "pretrain": True,
    },
    "pretrained_all": {
        "feature_layers": "auto",
        "context_window": None,
        "objective": "decode_all",
        "pretrain": True,
    },
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.node()}: {psutil.cpu_count()} CPU cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load}"
    )


def train_head(
    args: argparse.Namespace, name: str, settings: dict, out: Path, max_samples: int | None = None
) -> dict:
    settings = dict(settings)
    start_from = None
    if settings.pop("pretrain", False):
        if not args.pretrain_dir:
            raise SystemExit(f"bench_quality: config {name} needs --pretrain_dir")
        first = argparse.Namespace(
            **{**vars(args), "data_dir": args.pretrain_dir, "steps": args.pretrain_steps}
        )
        # one pretraining per pretraining budget, shared by every size of a curve
        pretrain = f"pretrain_{args.pretrain_steps}_{settings['context_window']}"
        start_from = train_head(first, pretrain, settings, out)["head_path"]
    config = TrainConfig(
        train_data_dir=args.data_dir,
        model_name_or_path=start_from,
        base_model_path=args.base_model_path,
        output_dir=str(out / name),
        data=DataConfig(
            block_length=args.block_length,
            max_samples=max_samples,
            allow_incomplete=True,
            anchors_per_sequence=args.anchors_per_sequence,
        ),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps if max_samples is None else None,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=min(50, args.steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=max(1, args.steps // 5),
        save_steps=10**9,
        max_eval_examples=1024,
        validate_sample=0,
        report_to="none",
        seed=args.seed,
        # the same draft vocabulary for every head: a training-speed setting, not an ablation
        draft_vocab_size=args.draft_vocab_size,
        **settings,
    )
    record, summary = out / name / "bench_quality.json", out / name / "train_summary.json"
    if args.reuse and record.exists():  # trained by an earlier run with the same settings
        return json.loads(record.read_text())
    if args.reuse and summary.exists():  # trained, but that run ended before writing its record
        trained = json.loads(summary.read_text())
        return {
            "head_path": str(out / name / "final"),
            "train_seconds": None,
            "steps": trained["step"],
            "val_tau": trained["metrics"].get("val/tau"),
            "settings": settings,
            "max_samples": max_samples,
        }
    started = time.perf_counter()
    result = train(config)
    figures = {
        "head_path": str(result.final_dir),
        "train_seconds": time.perf_counter() - started,
        "steps": result.steps,
        "val_tau": result.metrics.get("val/tau"),
        "settings": settings,
        "max_samples": max_samples,
    }
    record.write_text(json.dumps(figures))
    return figures


def replay_heads(args: argparse.Namespace, heads: dict[str, dict]) -> dict:
    """Every head, prompt lookup, lookup_head and the lookup&head tree replayed on the held-out
    greedy store."""
    from dmtp.head import load_base_model_parts, load_head
    from dmtp.replay import replay_store

    parts = load_base_model_parts(args.base_model_path)
    results = {}
    for name, trained in heads.items():
        head = load_head(trained["head_path"])
        head.attach_base(parts.embeddings, parts.lm_head)
        figures = replay_store(
            head,
            args.replay_dir,
            max_new_tokens=args.max_new_tokens,
            prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        )
        results[name] = figures["head"]
        results[f"{name}+lookup"] = figures["lookup_head"]
        results[f"{name}&lookup tree"] = figures["lookup_and_head"]
        results.setdefault("prompt_lookup", figures["prompt_lookup"])
    return results


def count_answers(store_path: str) -> int:
    from dmtp.store import open_store

    store = open_store(store_path)
    return sum(store.shard(k).n_sequences for k in range(store.num_shards) if store.has_shard(k))


def print_replay_table(results: dict, heads: dict[str, dict], answers: int) -> None:
    print(f"\n## replayed: {answers} held-out greedy answers")
    print("| drafter | τ | acceptance by position | rounds | val τ proxy | train s |")
    print("|---|---|---|---|---|---|")
    for name, f in results.items():
        head = heads.get(name, {})
        acceptance = " / ".join(f"{a:.3f}" for a in f["acceptance_by_position"] if a is not None)
        proxy = f"{head['val_tau']:.3f}" if head.get("val_tau") else "–"
        seconds = f"{head['train_seconds']:.0f}" if head.get("train_seconds") else "–"
        print(f"| {name} | {f['tau']:.3f} | {acceptance} | {f['rounds']} | {proxy} | {seconds} |")


def evaluate_heads(args: argparse.Namespace, heads: dict[str, dict]) -> dict:
    base = load_decoding_base(
        EvalConfig(
            base_model_path=args.base_model_path,
            device=args.device,
            block_length=args.block_length,
            prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        )
    )
    results = {}
    for source in args.eval_prompts:
        config = EvalConfig(
            input_data_path=source,
            max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts,
            block_length=args.block_length,
        )
        path = config.prompts_path
        longest = max(args.block_length, args.prompt_lookup_num_tokens + 1)  # lookup's block
        prompts = load_eval_prompts(path, base, config, longest)
        drafters = {}
        for name, head in heads.items():
            drafter, _ = load_head_drafter(EvalConfig(head_path=head["head_path"]), base)
            drafter.name = name
            drafters[name] = drafter
        drafters["prompt_lookup"] = PromptLookupDrafter(num_tokens=args.prompt_lookup_num_tokens)
        records = decode_prompts(base, drafters, prompts, args.block_length, source=source)
        results[source] = {name: summarize(records, name) for name in drafters}
    return results


def print_table(results: dict, heads: dict[str, dict]) -> None:
    for source, figures in results.items():
        print(f"\n## {source}")
        print("| drafter | τ | acceptance by position | speedup | val τ proxy | train s |")
        print("|---|---|---|---|---|---|")
        for name, f in figures.items():
            head = heads.get(name, {})
            acceptance = " / ".join(
                f"{a:.3f}" for a in f["acceptance_by_position"] if a is not None
            )
            proxy = f"{head['val_tau']:.3f}" if head.get("val_tau") else "–"
            seconds = f"{head['train_seconds']:.0f}" if head.get("train_seconds") else "–"
            print(
                f"| {name} | {f['tau']:.3f} | {acceptance} | {f['speedup']:.2f}× | {proxy} | {seconds} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_dir", required=True, help="the store (collected from the base model)"
    )
    parser.add_argument("--base_model_path", default=None)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--sizes", nargs="*", type=int, default=[], help="sequences, for the curve")
    parser.add_argument(
        "--curve", default="dflash", choices=list(CONFIGS), help="config of --sizes"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=2.0, help="for --sizes runs")
    parser.add_argument("--batch_size", type=int, default=256, help="blocks per step")
    parser.add_argument("--anchors_per_sequence", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--draft_vocab_size", type=int, default=8192)
    parser.add_argument("--block_length", type=int, default=4)
    parser.add_argument(
        "--prompt_lookup_num_tokens",
        type=int,
        default=EvalConfig.prompt_lookup_num_tokens,
        help="most tokens prompt lookup drafts, alone and beside the heads (as dmtp evaluate)",
    )
    parser.add_argument(
        "--eval_prompts", nargs="*", default=["sharegpt-heldout", str(DEMO_EVAL_PROMPTS)]
    )
    parser.add_argument(
        "--replay_dir",
        default=None,
        help="a greedy store of held-out prompts (dmtp collect --input_data_path "
        "sharegpt-heldout): τ of every head, prompt lookup and head+lookup replayed on all of it",
    )
    parser.add_argument("--pretrain_dir", default=None, help="teacher-forced store (pretrained*)")
    parser.add_argument("--pretrain_steps", type=int, default=700)
    parser.add_argument(
        "--max_prompts", type=int, default=12, help="prompts decoded for real (0: none)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=None, help="write everything as JSON here")
    parser.add_argument("--work_dir", default=None, help="keep the trained heads here")
    parser.add_argument(
        "--reuse", action="store_true", help="evaluate heads an earlier run left in --work_dir"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    out = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_quality_"))
    heads = {name: train_head(args, name, CONFIGS[name], out) for name in args.configs}
    for size in args.sizes:
        heads[f"{args.curve}@{size}"] = train_head(
            args, f"{args.curve}_{size}", CONFIGS[args.curve], out, max_samples=size
        )
    for name, head in heads.items():
        print(
            f"trained {name}: {head['steps']} steps, {head['train_seconds'] or 0:.0f} s, "
            f"val τ {head['val_tau']}",
            flush=True,
        )
    replayed = replay_heads(args, heads) if args.replay_dir else {}
    results = evaluate_heads(args, heads) if args.max_prompts else {}
    print(f"\nmachine: {machine()}")
    if replayed:
        print_replay_table(replayed, heads, count_answers(args.replay_dir))
    print_table(results, heads)
    if args.output:
        everything = {"machine": machine(), "heads": heads, "replayed": replayed}
        Path(args.output).write_text(json.dumps({**everything, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
