"""Training-step throughput and peak memory of the draft head, to size GPUs before a run.

    .venv/bin/python tests/benchmarks/bench_train.py                       # both shapes, this device
    .venv/bin/python tests/benchmarks/bench_train.py --shapes qwen2.5-7b --batch_sizes 64 1024
    .venv/bin/python tests/benchmarks/bench_train.py --draft_vocab 49152 8192

One training step is what `dmtp train` does per micro-batch (`dmtp.train.diffusion_loss` with
`decode_all`, backward, gradient clipping, AdamW; bf16 autocast on CUDA, fp32 on CPU). Inputs are
random tensors of the right shapes, so the figures exclude data loading
(tests/benchmarks/bench_loader.py measures that). Layouts, one decoder layer, L = 4:

    seed       the guide's head: one position of context (the final state), one block per example
    anchored   how `dmtp train` packs data: sequences of ROWS rows of 4 feature layers, ANCHORS
               blocks each, the context computed once per sequence

each with the full vocabulary and a draft vocabulary (`--draft_vocab`). Shapes:

    smollm2-135m   the default base model: hidden 576, vocab 49 152
    qwen2.5-7b     the flagship: hidden 3584, vocab 152 064

TFLOP/s counts the head's forward FLOPs (`head_flops`) × 3; divide by the device's peak for MFU.
Each case runs in a fresh process so its peak memory (CUDA: max allocated; CPU: peak RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "max_position_embeddings": 32768,
        "vocab_size": 152064,
    },
}
BLOCK_LENGTH = 4
ROWS, ANCHORS = 256, 64  # the anchored layout: rows of context and blocks per sequence


def machine(device: str) -> str:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (
        f"{psutil.cpu_count()} CPU cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        text += f"; GPU {properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    return text


def head_flops(shape: dict, rows: int, anchors: int, features: int, draft_vocab: int) -> float:
    """Forward FLOPs of one training sequence (multiply-adds x 2): fc, one layer, the LM head rows
    the loss reads (L - 1 per block), attention over the context and the block."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape.get("head_dim", hidden // heads)
    queries = anchors * BLOCK_LENGTH
    keys = rows + queries
    flops = 2 * rows * features * hidden * hidden  # fc
    flops += 2 * queries * hidden * heads * head_dim * 2  # q, o
    flops += 2 * keys * hidden * kv_heads * head_dim * 2  # k, v
    flops += 2 * queries * hidden * inter * 3  # gated MLP
    flops += 2 * queries * keys * heads * head_dim * 2  # scores and values (dense mask)
    flops += 2 * anchors * (BLOCK_LENGTH - 1) * hidden * draft_vocab  # LM head
    return float(flops)


def run_case(
    shape_name: str, blocks: int, layout: str, draft_vocab: int, device: str, steps: int
) -> dict:
    """Time `steps` training steps after 2 warm-up steps; returns the figures as a dict.

    layout `seed`: the guide's head (one position of context: the final state) and one block per
    example; `anchored`: sequences of ROWS rows, 4 feature layers, ANCHORS blocks per sequence,
    as `dmtp train` packs them by default.
    """
    import torch

    from dmtp.head import MTPHeadConfig, MTPHeadModel
    from dmtp.schedules import get_schedule
    from dmtp.train import diffusion_loss

    shape = dict(SHAPES[shape_name])
    vocab = shape.pop("vocab_size")
    seed = layout == "seed"
    rows, anchors, features = (1, 1, 1) if seed else (ROWS, ANCHORS, 4)
    sequences = max(1, blocks // anchors)
    config = MTPHeadConfig(
        hidden_size=shape["hidden_size"],
        vocab_size=vocab,
        mask_token_id=vocab - 1,
        block_length=BLOCK_LENGTH,
        num_hidden_layers=1,
        feature_layers=list(range(features)),
        context_window=1 if seed else None,
        decoder_config=shape,
        draft_vocab=list(range(draft_vocab)) if draft_vocab < vocab else None,
    )
    torch.manual_seed(0)
    with torch.device(device):  # a 7B-shape LM head is 0.5 G weights: make it on the device
        head = MTPHeadModel(config)
        embeddings = torch.randn(vocab, config.hidden_size) * 0.02
    head.attach_base(embeddings, embeddings)
    head.train()
    parameters = list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=device == "cuda")
    schedule = get_schedule("linear")
    batch = {
        "context_features": torch.randn(
            sequences, rows, features, config.hidden_size, device=device
        ),
        "context_mask": torch.ones(sequences, rows, dtype=torch.bool, device=device),
        "anchors": torch.sort(torch.randint(0, rows, (sequences, anchors), device=device)).values,
        "labels": torch.randint(0, vocab, (sequences, anchors, BLOCK_LENGTH), device=device),
    }
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> float:
        with autocast:
            loss = diffusion_loss(
                head, head, batch, schedule=schedule, loss_weight_type="scheduler",
                time_epsilon=1e-3, mask_token_id=vocab - 1, objective="decode_all",
                position_decay=0.0, generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a host sync, as logging does

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    # training = forward + backward (about twice the forward)
    flops = 3 * sequences * head_flops(SHAPES[shape_name], rows, anchors, features, draft_vocab)
    return {
        "shape": shape_name,
        "layout": layout,
        "blocks": sequences * anchors,
        "draft_vocab": draft_vocab,
        "trainable_parameters_m": sum(p.numel() for p in parameters) / 1e6,
        "seconds_per_step": seconds,
        "examples_per_second": sequences * anchors / seconds,
        "tflops_per_second": flops / seconds / 1e12,
        "peak_memory_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--batch_sizes",
        nargs="*",
        type=int,
        default=None,
        help="blocks per step (default: 256 for 135m; 64 for 7b on CPU, 1024 on GPU)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 20 GPU, 5 CPU)"
    )
    parser.add_argument(
        "--draft_vocab",
        nargs="*",
        type=int,
        default=None,
        help="draft vocabulary sizes (default: full, 8192)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case
    args = parser.parse_args()

    import torch

    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    steps = args.steps or (20 if device == "cuda" else 5)
    if args.case:
        shape, blocks, layout, draft_vocab = args.case.split(":")
        print(json.dumps(run_case(shape, int(blocks), layout, int(draft_vocab), device, steps)))
        return

    cases = []
    for shape in args.shapes:
        vocab = SHAPES[shape]["vocab_size"]
        blocks_list = args.batch_sizes or (
            [256] if shape == "smollm2-135m" else [64 if device == "cpu" else 1024]
        )
        for blocks in blocks_list:
            for layout in ("seed", "anchored"):
                for draft_vocab in args.draft_vocab or [vocab, 8192]:
                    cases.append(f"{shape}:{blocks}:{layout}:{min(draft_vocab, vocab)}")

    print(f"machine: {machine(device)}; device {device}; {steps} timed steps after 2 warm-up")
    header = f"{'shape':<14}{'layout':>9}{'blocks':>7}{'draft V':>8}{'s/step':>9}{'blocks/s':>10}{'TFLOP/s':>9}{'peak GiB':>9}"
    print(header)
    results = []
    for case in cases:
        command = [
            sys.executable,
            __file__,
            "--device",
            device,
            "--steps",
            str(steps),
            "--case",
            case,
        ]
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode != 0:
            reason = (process.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{case}: failed: {reason}")
            continue
        result = json.loads(process.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{result['shape']:<14}{result['layout']:>9}{result['blocks']:>7}{result['draft_vocab']:>8}"
            f"{result['seconds_per_step']:>9.3f}{result['examples_per_second']:>10.1f}"
            f"{result['tflops_per_second']:>9.3f}{result['peak_memory_gib']:>9.2f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(device), "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
