"""Training-step throughput and peak memory of the MTP head, to size GPUs before a run.

    .venv/bin/python tests/benchmarks/bench_train.py                       # both shapes, this device
    .venv/bin/python tests/benchmarks/bench_train.py --shapes qwen2.5-7b --batch_sizes 4 16 64
    python3 tests/benchmarks/bench_train.py --device cuda --trainable      # also unfrozen emb/LM head

One training step is what `dmtp train` does per micro-batch: random masking at t ~ U[ε, 1), the
head's forward over [h_l, block], the masked-diffusion loss, backward, gradient clipping and an
AdamW step (bf16 autocast on CUDA, fp32 on CPU, as `--mixed_precision auto` picks). Inputs are
random tensors of the right shapes, so the figures exclude data loading
(tests/benchmarks/bench_loader.py measures that). Shapes (1 decoder layer, L = 4):

    smollm2-135m   the default base model: Llama layer, hidden 576, vocab 49 152
    qwen2.5-7b     the flagship: Qwen2 layer, hidden 3584, vocab 152 064

By default the embedding and LM head copied from the base model are frozen (`dmtp train`'s
default); `--trainable` also measures them trained. Each (shape, batch, frozen) case runs in a
fresh process so its peak memory (CUDA: max allocated; CPU: peak RSS) is its own.
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


def run_case(shape_name: str, batch_size: int, frozen: bool, device: str, steps: int) -> dict:
    """Time `steps` training steps after 2 warm-up steps; returns the figures as a dict."""
    import torch

    from dmtp.head import MTPHeadConfig, MTPHeadModel
    from dmtp.loss import loss_weights, masked_diffusion_loss, noised_input_ids, sample_masking
    from dmtp.schedules import get_schedule

    shape = dict(SHAPES[shape_name])
    vocab = shape.pop("vocab_size")
    config = MTPHeadConfig(
        hidden_size=shape["hidden_size"],
        vocab_size=vocab + 1,
        mask_token_id=vocab,
        block_length=BLOCK_LENGTH,
        num_hidden_layers=1,
        decoder_config=shape,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 7B-shape vocabulary is 1.1 G weights
        head = MTPHeadModel(config)
    head.freeze_base_weights(embeddings=frozen, lm_head=frozen)
    head.train()
    parameters = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=device == "cuda")
    schedule = get_schedule("linear")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch_size, config.hidden_size, device=device)
    labels = torch.randint(0, vocab, (batch_size, BLOCK_LENGTH), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> float:
        t, masked = sample_masking(labels, schedule, 1e-3, generator)
        with autocast:
            logits = head(
                in_hidden_states=hidden, input_ids=noised_input_ids(labels, masked, vocab)
            ).logits
        loss = masked_diffusion_loss(logits, labels, masked, loss_weights(schedule, t, "scheduler"))
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
    return {
        "shape": shape_name,
        "batch_size": batch_size,
        "frozen_embedding_and_lm_head": frozen,
        "trainable_parameters_m": sum(p.numel() for p in parameters) / 1e6,
        "total_parameters_m": sum(p.numel() for p in head.parameters()) / 1e6,
        "seconds_per_step": seconds,
        "examples_per_second": batch_size / seconds,
        "peak_memory_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--batch_sizes", nargs="*", type=int, default=None, help="default: 32 (135m), 4 (7b) on CPU"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 20 GPU, 5 CPU)"
    )
    parser.add_argument(
        "--trainable", action="store_true", help="also with embedding/LM head trained"
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
        shape, batch, frozen = args.case.split(":")
        print(json.dumps(run_case(shape, int(batch), frozen == "1", device, steps)))
        return

    cases = []
    for shape in args.shapes:
        batches = args.batch_sizes or (
            [32] if shape == "smollm2-135m" else [4] if device == "cpu" else [4, 32]
        )
        if device == "cuda" and not args.batch_sizes:
            batches = [32, 256] if shape == "smollm2-135m" else [4, 32, 256]
        for batch in batches:
            for frozen in [True, False] if args.trainable else [True]:
                cases.append(f"{shape}:{batch}:{int(frozen)}")

    print(f"machine: {machine(device)}; device {device}; {steps} timed steps after 2 warm-up")
    header = f"{'shape':<14}{'batch':>6}{'emb/LM head':>13}{'trainable M':>13}{'s/step':>10}{'examples/s':>12}{'peak GiB':>10}"
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
            f"{result['shape']:<14}{result['batch_size']:>6}"
            f"{'frozen' if result['frozen_embedding_and_lm_head'] else 'trained':>13}"
            f"{result['trainable_parameters_m']:>13.1f}{result['seconds_per_step']:>10.4f}"
            f"{result['examples_per_second']:>12.1f}{result['peak_memory_gib']:>10.2f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(device), "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
