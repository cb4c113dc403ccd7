"""The peer check on a real model: dmtp's speculative decoding against DFlash's `dflash_generate`.

    .venv/bin/python tests/benchmarks/bench_dflash_peer.py                    # random head, SmolLM2
    .venv/bin/python tests/benchmarks/bench_dflash_peer.py --init_from_base --fit_steps 100
    .venv/bin/python tests/benchmarks/bench_dflash_peer.py --head_path runs/demo/heads/final
    .venv/bin/python tests/benchmarks/bench_dflash_peer.py --fit_steps 100 --init_from_base --export /tmp/x

The base model is the embedded default (SmolLM2-135M-Instruct) unless --base_model_path. The head
is --head_path, or a randomly initialised one (--feature_layers, --block_length; --init_from_base
starts its layers from the base model's last ones). A random head's drafts are all rejected, which
checks little: --fit_steps first fits the head to the prompts' own greedy answers, so it drafts
some stretches right (with --init_from_base, 100 steps take the loss from ~15 to ~1.6). Its
tensors are loaded strictly into `dflash.model.DFlashDraftModel` (`dflash==0.1.0`, fetched from
PyPI into the dmtp cache, never installed). For each of the first --prompts demo prompts it
decodes greedily, with dmtp's `speculative_decode` and with `dflash_generate` (temperature 0), and
prints whether the tokens are equal, whether the acceptance lengths are equal round by round
(aligned at the token limit, see `tests/dflash_oracle.py:clip_to_limit`; "raw =" compares them
unaligned at the same limit), and τ of each. Nothing is timed: the result depends on the
machine's arithmetic, not on its load. ~5 minutes on 2 busy CPU cores with the defaults.

With --export DIR the head goes through `dmtp export --format dflash` first (a fitted or random
head is saved as `dmtp train` saves one), and the reference side is
`DFlashDraftModel.from_pretrained(DIR)`: the served folder itself, not tensors handed over in memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dflash_oracle import dflash_draft_from_head, fit_head, load_dflash, run_peers  # noqa: E402

from dmtp.config import DEMO_EVAL_PROMPTS, ExportConfig  # noqa: E402
from dmtp.export import export  # noqa: E402
from dmtp.head import build_head, load_base_model_parts, load_head  # noqa: E402
from dmtp.models import encode_prompt, eos_token_ids, load_base_model  # noqa: E402
from dmtp.prompts import iter_prompts  # noqa: E402
from dmtp.specdec import greedy_decode  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {psutil.cpu_count()} CPU cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )


def tau(lengths: list[int]) -> float:
    return sum(lengths) / len(lengths) if lengths else 1.0


def make_head(args: argparse.Namespace, base) -> torch.nn.Module:
    if args.head_path:
        head = load_head(args.head_path)
        head.attach_base(
            base.model.get_input_embeddings().weight, base.model.get_output_embeddings().weight
        )
        return head
    layers = base.model.config.num_hidden_layers
    parts = load_base_model_parts(
        args.base_model_path, layers=range(layers - 1, layers) if args.init_from_base else ()
    )
    return build_head(
        hidden_size=base.hidden_size,
        vocab_size=parts.vocab_size,
        mask_token_id=parts.vocab_size - 1 if args.mask_token_id is None else args.mask_token_id,
        block_length=args.block_length,
        feature_layers=args.feature_layers,
        num_target_layers=layers,
        context_window=None,
        base=parts,
        init_from_base=args.init_from_base,
        seed=args.seed,
    )


def exported_draft(args: argparse.Namespace, head: torch.nn.Module, dflash, like: torch.Tensor):
    """`dmtp export` the head into args.export, then load that folder as the reference does."""
    head_path = args.head_path
    if not head_path:  # a random or fitted head: saved as `dmtp train` saves its final head
        head_path = str(Path(args.export).with_name(Path(args.export).name + "-head"))
        head.save_pretrained(head_path)
    result = export(ExportConfig(head_path=head_path, output_dir=args.export, overwrite=True))
    draft = dflash.DFlashDraftModel.from_pretrained(result.output_dir)
    return draft.to(device=like.device, dtype=like.dtype).eval(), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base_model_path", default=None)
    parser.add_argument("--head_path", default=None, help="default: a randomly initialised head")
    parser.add_argument("--feature_layers", type=int, nargs="+", default=[2, 15, 28, 30])
    parser.add_argument("--block_length", type=int, default=8)
    parser.add_argument("--mask_token_id", type=int, default=None, help="default: the last id")
    parser.add_argument("--init_from_base", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fit_steps",
        type=int,
        default=0,
        help="first fit the head this many steps to the prompts' greedy answers (100 with "
        "--init_from_base: a mix of acceptance lengths, not a random head's all-1s; ~1 s a step "
        "on a CPU core)",
    )
    parser.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="export the head to DIR (dmtp export --format dflash) and load the reference draft "
        "from it with DFlashDraftModel.from_pretrained",
    )
    parser.add_argument("--input_data_path", default=str(DEMO_EVAL_PROMPTS))
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32: both sides round alike")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; nothing is timed, and on a shared box more threads only spin-wait",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"machine: {machine()}", flush=True)
    start = time.perf_counter()
    base = load_base_model(args.base_model_path, args.device, args.dtype)
    head = make_head(args, base).to(device=base.model.device, dtype=base.dtype).eval()
    stop = eos_token_ids(base)
    prompts = [
        encode_prompt(prompt, base.tokenizer)
        for _, prompt in zip(range(args.prompts), iter_prompts(args.input_data_path), strict=False)
    ]
    if args.fit_steps:
        answers = [
            ids + greedy_decode(base.model, ids, args.max_new_tokens, stop).tokens
            for ids in prompts
        ]
        fit_head(head, base.model, answers, args.fit_steps, seed=args.seed)
    dflash = load_dflash()
    if args.export:
        draft, exported = exported_draft(args, head, dflash, next(head.parameters()))
        loaded = (
            f"exported to {exported.output_dir} and loaded with DFlashDraftModel.from_pretrained"
        )
    else:
        draft = dflash_draft_from_head(head, dflash)
        loaded = "loaded strictly into DFlashDraftModel"
    config = head.config
    base_rope = base.model.get_decoder().rotary_emb.inv_freq
    same_rope = torch.equal(draft.rotary_emb.inv_freq, head.rotary_emb.inv_freq) and torch.allclose(
        head.rotary_emb.inv_freq, base_rope.to(head.rotary_emb.inv_freq)
    )
    fitted = ", layers from the base model's" if args.init_from_base and not args.head_path else ""
    fitted += f", fitted {args.fit_steps} steps" if args.fit_steps else ""
    print(
        f"base: {base.identity['name_or_path']} ({base.device}, {base.hidden_dtype}); head: "
        f"{args.head_path or 'random'}{fitted}; feature layers {config.feature_layers} (DFlash "
        f"target_layer_ids {draft.target_layer_ids}), block {config.block_length}, mask token "
        f"{config.mask_token_id}; {loaded}; RoPE equal to the base "
        f"model's: {'yes' if same_rope else 'NO'} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    print(
        f"{'prompt':>6} {'tokens':>6} {'rounds':>6} {'tokens =':>8} {'lengths =':>9} {'raw =':>5} "
        f"{'tau dmtp':>8} {'tau dflash':>10}"
    )
    agree = 0
    for index, ids in enumerate(prompts):
        run = run_peers(dflash, draft, head, base.model, ids, args.max_new_tokens, stop)
        tokens_equal = run.dmtp.tokens == run.greedy == run.dflash_tokens
        lengths_equal = run.dmtp_lengths == run.dflash_lengths_aligned
        raw_equal = run.dmtp_lengths == run.dflash.acceptance_lengths
        agree += tokens_equal and lengths_equal
        yes = {True: "yes", False: "NO"}
        print(
            f"{index:>6} {len(run.greedy):>6} {len(run.dmtp_lengths):>6} {yes[tokens_equal]:>8} "
            f"{yes[lengths_equal]:>9} {yes[raw_equal]:>5} {tau(run.dmtp_lengths):>8.3f} "
            f"{tau(run.dflash.acceptance_lengths):>10.3f}",
            flush=True,
        )
        if not lengths_equal:
            print(f"       dmtp   {run.dmtp_lengths}\n       dflash {run.dflash_lengths_aligned}")
    print(f"\n{agree}/{len(prompts)} prompts agree ({time.perf_counter() - start:.0f} s)")
    return 0 if agree == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
