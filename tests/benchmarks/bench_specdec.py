"""Speculative decoding with a head vs plain greedy decoding, side by side in one run.

    .venv/bin/python tests/benchmarks/bench_specdec.py --head_path runs/demo/heads/final
    .venv/bin/python tests/benchmarks/bench_specdec.py --head_path H --denoising_steps 1 2 --first_position clean masked
    .venv/bin/python tests/benchmarks/bench_specdec.py --debug_model      # tiny random Qwen2, untrained head

Base model: the embedded default (SmolLM2-135M-Instruct) unless --base_model_path. Prompts: the
held-out demo set (dmtp/resources/prompts/demo_eval.jsonl) unless --input_data_path. Every prompt
is decoded by plain greedy decoding and by each drafter, in rotating order, and each speculative
output is checked equal to greedy's. Drafters, all in the same run:
- the given head, for each --denoising_steps K and --first_position variant;
- an untrained head of the same shape built from the base model (`--no-untrained` drops it): what
  training has to beat;
- prompt lookup (n-gram), the training-free baseline.
Prints τ, per-position acceptance, tokens/s, speedup and where the time goes, with the machine.
τ and acceptance do not depend on the machine; tokens/s and speedup do, and only mean something
on cores nobody else is using (check the load average printed first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import psutil
import torch

from dmtp.config import DEMO_EVAL_PROMPTS, EvalConfig
from dmtp.evaluate import (
    build_result,
    decode_prompts,
    drafter_block_length,
    load_decoding_base,
    load_eval_prompts,
    load_head_drafter,
    prompt_lookup_drafter,
)
from dmtp.head import build_head, load_base_model_parts
from dmtp.kernels import PackedLinear
from dmtp.specdec import Drafter, HeadDrafter


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {psutil.cpu_count()} CPU cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def untrained_like(
    head_drafter: HeadDrafter, base_model_path: str | None, packed: bool
) -> HeadDrafter:
    """A fresh head of the trained one's shape: the same base embedding and LM head (or, for a head
    of its own vocabulary, random ones), the same feature layers, random layers."""
    config = head_drafter.head.config
    head = build_head(
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        mask_token_id=config.mask_token_id,
        block_length=config.block_length,
        feature_layers=config.feature_layers,
        num_target_layers=config.num_target_layers,
        context_window=config.context_window,
        num_hidden_layers=config.num_hidden_layers,
        draft_vocab=config.draft_vocab,
        base=None if config.owns_vocabulary else load_base_model_parts(base_model_path),
    )
    head.to(device=head_drafter.device, dtype=head_drafter.dtype).eval()
    return HeadDrafter(
        head,
        head_drafter.block_length,
        config.mask_token_id,
        head_drafter.base_vocab_size,
        packed=packed,
    )


def debug_setup(folder: Path, block_length: int) -> tuple[str, str]:
    """The tiny random Qwen2 and an untrained head for it, saved under `folder`."""
    from dmtp.debug_model import save_debug_model

    model = save_debug_model(folder / "tiny-qwen2")
    parts = load_base_model_parts(str(model))
    head = build_head(
        hidden_size=parts.embeddings.shape[1],
        vocab_size=parts.vocab_size,
        mask_token_id=parts.vocab_size - 1,
        block_length=block_length,
        feature_layers=[1, parts.num_hidden_layers],
        num_target_layers=parts.num_hidden_layers,
        base=parts,
    )
    head.save_pretrained(folder / "head")
    return str(model), str(folder / "head")


def print_table(result: dict) -> None:
    names = list(result["drafters"])
    width = max(len(n) for n in names) + 2
    print(
        f"{'drafter':<{width}} {'tau':>5} {'tok/s':>7} {'greedy':>7} {'speedup':>8} {'drafter%':>8}  acceptance by position"
    )
    for name in names:
        o = result["drafters"][name]["overall"]
        rates = " ".join("  -  " if r is None else f"{r:.3f}" for r in o["acceptance_by_position"])
        share = 100 * o["draft_seconds"] / o["seconds"]
        print(
            f"{name:<{width}} {o['tau']:>5.2f} {o['tokens_per_second']:>7.1f} "
            f"{o['greedy_tokens_per_second']:>7.1f} {o['speedup']:>7.2f}x {share:>7.1f}%  {rates}"
        )
    categories = sorted({p["category"] for p in result["prompts"]})
    print("\ntau by category")
    print(f"{'drafter':<{width}} " + " ".join(f"{c[:11]:>11}" for c in categories))
    for name in names:
        by = result["drafters"][name]["by_category"]
        print(f"{name:<{width}} " + " ".join(f"{by[c]['tau']:>11.2f}" for c in categories))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base_model_path", default=None)
    parser.add_argument("--head_path", default=None)
    parser.add_argument(
        "--debug_model", action="store_true", help="tiny random Qwen2 and an untrained head"
    )
    parser.add_argument("--input_data_path", default=str(DEMO_EVAL_PROMPTS))
    parser.add_argument("--max_prompts", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--block_length", type=int, default=None, help="default: the head's")
    parser.add_argument("--denoising_steps", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--first_position", nargs="+", default=["clean"], choices=["clean", "masked"]
    )
    parser.add_argument("--untrained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--prompt_lookup_max_ngram", type=int, default=EvalConfig.prompt_lookup_max_ngram
    )
    parser.add_argument(
        "--prompt_lookup_num_tokens", type=int, default=EvalConfig.prompt_lookup_num_tokens
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--packed_linears",
        action=argparse.BooleanOptionalAction,
        default=EvalConfig.packed_linears,
        help="on a CPU, oneDNN-prepacked linear layers (dmtp/kernels.py; bench_kernels.py compares)",
    )
    parser.add_argument("--warmup_tokens", type=int, default=16)
    parser.add_argument("--output", default=None, help="also write the results as JSON")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; 1 on a shared machine: with busy cores, multi-threaded matmuls of "
        "several tokens stall at barriers and make verification look many times slower than it is",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="dmtp-bench-") as tmp:
        if args.debug_model:
            args.base_model_path, args.head_path = debug_setup(Path(tmp), args.block_length or 4)
        config = EvalConfig(
            base_model_path=args.base_model_path,
            head_path=args.head_path,
            input_data_path=args.input_data_path,
            max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts,
            block_length=args.block_length,
            device=args.device,
            dtype=args.dtype,
            packed_linears=args.packed_linears,
            prompt_lookup_max_ngram=args.prompt_lookup_max_ngram,
            prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
            warmup_tokens=args.warmup_tokens,
        )
        print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f}", flush=True)
        base = load_decoding_base(config)
        packed = sum(isinstance(m, PackedLinear) for m in base.model.modules())
        print(
            f"base model: {base.identity['name_or_path']} ({base.device}, {base.hidden_dtype}, "
            f"{packed} linear layers packed)",
            flush=True,
        )

        drafters: dict[str, Drafter] = {}
        head_info = None
        block_length = config.block_length
        if config.head_path is not None:
            trained, head_info = load_head_drafter(config, base)
            block_length = trained.block_length
            for steps in args.denoising_steps:
                for first in args.first_position:
                    drafters[f"head K={steps} {first}"] = HeadDrafter(
                        trained.head,
                        block_length,
                        trained.mask_token_id,
                        base.vocab_size,
                        steps,
                        first,
                        packed=config.packed_linears,
                    )
            if args.untrained:
                drafters["untrained head"] = untrained_like(
                    trained, config.base_model_path, config.packed_linears
                )
        drafters["prompt_lookup"] = prompt_lookup_drafter(config)
        if block_length is None:
            parser.error("without --head_path, pass --block_length")
        longest = max(drafter_block_length(d, block_length) for d in drafters.values())
        prompts = load_eval_prompts(config.prompts_path, base, config, longest)
        print(
            f"{len(prompts)} prompts from {config.prompts_path}, up to {config.max_new_tokens} new tokens, "
            f"block length {block_length}",
            flush=True,
        )
        records = decode_prompts(
            base, drafters, prompts, block_length, config.warmup_tokens, str(config.prompts_path)
        )
        settings = {**vars(args), "block_length": block_length}
        result = build_result(records, list(drafters), base=base, head=head_info, settings=settings)
    print(
        f"\nlossless on {len(records)}/{len(records)} prompts ({result['drafters'][next(iter(drafters))]['overall']['generated_tokens']} tokens)\n"
    )
    print_table(result)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"\nresults -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
