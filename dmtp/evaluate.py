"""Evaluate a draft head by real greedy speculative decoding: τ, speedup, losslessness (DESIGN §5).

    dmtp evaluate --head_path heads/final --max_new_tokens 256 --output eval.json
    python -m dmtp.evaluate --base_model_path models/tiny --head_path heads/final --block_length 4

Every prompt is decoded side by side in one run: plain greedy decoding (the reference and the
speed baseline), speculative decoding with the head as drafter, and with prompt lookup (the
training-free baseline). The order rotates from prompt to prompt so no method always runs on a
cold or a warm machine. Each speculative output must equal the greedy output token for token;
a mismatch stops the evaluation with `LosslessnessError`.

Reported per prompt, per category and overall, for each drafter:
- τ: mean tokens committed per round, the bonus token included (1 = no gain, at most L);
- per-position acceptance: the fraction of rounds whose draft at block position i was accepted
  (with all before it; `conditional`: given those before it were);
- tokens/s of speculative and of greedy decoding, and their ratio, the speedup;
- where speculative decoding spends its time: in the drafter, in base model forwards, elsewhere.

`log_evaluation_to_mlflow` attaches the results (metrics, the JSON, a PNG plot) to a training run
or to a new run linked to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dmtp.cli import add_config_arguments, config_from_args, run_command
from dmtp.config import EvalConfig
from dmtp.errors import DmtpError, InputDataError, ModelLoadError
from dmtp.models import BaseModel
from dmtp.prompts import Prompt, iter_prompts
from dmtp.specdec import (
    Drafter,
    GreedyResult,
    HeadDrafter,
    LookupAndHeadDrafter,
    LookupThenHeadDrafter,
    PromptLookupDrafter,
    SpecResult,
    greedy_decode,
    speculative_decode,
)

SCHEMA = "dmtp.evaluation/1"
SCALAR_METRICS = (
    "tau",
    "speedup",
    "tokens_per_second",
    "greedy_tokens_per_second",
    "draft_seconds",
    "base_seconds",
)
NEAR_TIE = 0.05  # a greedy top-2 logit margin below this can flip with the verification batch shape


class LosslessnessError(DmtpError):
    """Speculative decoding's output differs from greedy decoding's: the evaluation is void."""

    exit_code = 1


# ----------------------------------------------------------------------------------------------
# inputs, all checked before any decoding


@dataclass
class EvalPrompt:
    prompt: Prompt
    ids: list[int]
    max_new_tokens: int  # the requested budget, capped so prompt + output + a block fit the context


def load_eval_prompts(
    path: Path, base: BaseModel, config: EvalConfig, block_length: int
) -> list[EvalPrompt]:
    """Encode the prompts as `dmtp collect` does (chat template); fail on one the model can't decode."""
    from dmtp.models import encode_prompt

    prompts: list[EvalPrompt] = []
    limit = base.max_positions
    for prompt in iter_prompts(path):
        if config.max_prompts is not None and len(prompts) >= config.max_prompts:
            break
        if not prompt.generates:
            kind = "a chat ending with its answer" if prompt.answered else "a plain-text document"
            raise InputDataError(
                f"{path}:{prompt.line}: {kind}; evaluation needs prompts to answer "
                "(JSONL with `prompt`, `messages` or `turns`)"
            )
        ids = encode_prompt(prompt, base.tokenizer)
        budget = config.max_new_tokens
        if limit is not None:
            # The last verification feeds up to a block past the final token.
            budget = min(budget, limit - len(ids) - block_length)
            if budget < 1:
                raise InputDataError(
                    f"{path}:{prompt.line}: prompt is {len(ids)} tokens; with a block of {block_length} "
                    f"it leaves no room in the model's context ({limit}); shorten or drop it"
                )
        prompts.append(EvalPrompt(prompt, ids, budget))
    if not prompts:
        raise InputDataError(f"{path}: no prompts in the file")
    return prompts


def check_head_folder(path: str | Path) -> Path:
    """Fail early on a head folder with missing files (before the base model is loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"head not found: {path} (pass the folder `dmtp train` saved, e.g. <output_dir>/final)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a head folder (no config.json)")
    if not any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    ):
        raise ModelLoadError(f"{path}: the head's weights are missing (no model.safetensors)")
    return path


def check_head_matches_base(head_config: Any, base: BaseModel, where: str) -> None:
    """The head must come from this base model: same hidden size, vocabulary and fingerprint."""
    if int(head_config.hidden_size) != base.hidden_size:
        raise ModelLoadError(
            f"{where}: head hidden_size {head_config.hidden_size} != base model's {base.hidden_size}: "
            "the head was trained for another base model; pass the one it was trained on as --base_model_path"
        )
    if getattr(head_config, "owns_vocabulary", False):
        vocab_ok = int(head_config.vocab_size) in (base.vocab_size, base.vocab_size + 1)
    else:  # the head borrows this model's embedding and LM head
        vocab_ok = int(head_config.vocab_size) == base.vocab_size
    if not vocab_ok:
        raise ModelLoadError(
            f"{where}: head vocabulary ({head_config.vocab_size} tokens) does not fit the base "
            f"model's {base.vocab_size}: the head was trained for another base model"
        )
    layers = [int(i) for i in getattr(head_config, "feature_layers", None) or []]
    depth = base.model.config.get_text_config().num_hidden_layers
    outside = [i for i in layers if not -1 <= i <= depth]
    if outside:
        raise ModelLoadError(
            f"{where}: head reads feature layers {layers}, but the base model has {depth} layers "
            f"(hidden_states 0..{depth}): the head was trained for another base model"
        )
    recorded = (head_config.base_model or {}).get("fingerprint")
    if recorded and recorded != base.fingerprint:
        name = (head_config.base_model or {}).get("name_or_path", "?")
        raise ModelLoadError(
            f"{where}: head was trained for base model {name} (fingerprint {recorded}), but the base "
            f"model given has fingerprint {base.fingerprint}; pass the base model it was trained on"
        )


def load_head_drafter(config: EvalConfig, base: BaseModel) -> tuple[HeadDrafter, dict[str, Any]]:
    """Load and check the head, then wrap it as a drafter; also return what the results record."""
    from dmtp.head import MTPHeadConfig, load_head

    path = check_head_folder(config.head_path)
    try:
        head_config = MTPHeadConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{path}/config.json: cannot read the head's config: {error}"
        ) from error
    check_head_matches_base(head_config, base, str(path))
    block_length = int(head_config.block_length)
    if config.block_length is not None and config.block_length != block_length:
        raise DmtpError(
            f"--block_length {config.block_length} differs from the head's block_length {block_length} "
            f"({path}/config.json); drop the flag or pass {block_length}"
        )
    masked = block_length - 1 if config.first_position == "clean" else block_length
    if config.denoising_steps > masked:
        raise DmtpError(
            f"--denoising_steps {config.denoising_steps} exceeds the {masked} masked positions of a "
            f"block of {block_length} (first_position={config.first_position}); use 1..{masked}"
        )
    try:
        head = load_head(path)
    except (OSError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(f"{path}: cannot load the head: {first_line}") from error
    if not head.config.owns_vocabulary:
        head.attach_base(
            base.model.get_input_embeddings().weight, base.model.get_output_embeddings().weight
        )
    head.to(device=base.model.device, dtype=base.dtype).eval()
    drafter = HeadDrafter(
        head,
        block_length=block_length,
        mask_token_id=int(head_config.mask_token_id),
        base_vocab_size=base.vocab_size,
        denoising_steps=config.denoising_steps,
        first_position=config.first_position,
        packed=config.packed_linears,
    )
    info = {
        "path": str(path),
        "block_length": block_length,
        "mask_token_id": int(head_config.mask_token_id),
        "num_hidden_layers": int(head_config.num_hidden_layers),
        "feature_layers": list(head_config.feature_layers),
        "context_window": head_config.context_window,
        "parameters": sum(p.numel() for p in head.parameters()),
        "denoising_steps": config.denoising_steps,
        "first_position": config.first_position,
        "base_model": head_config.base_model,
        "mlflow_run_id": recorded_training(path).get("mlflow_run_id"),
    }
    return drafter, info


def recorded_training(path: str | Path) -> dict[str, str]:
    """The MLflow run that trained the head, and the tracking store it is in (when recorded):
    `dmtp train` writes them into a checkpoint's `trainer_state.json`, and beside the final head
    into `<output_dir>/train_summary.json`."""
    path = Path(path)
    for state in (path / "trainer_state.json", path.parent / "train_summary.json"):
        try:
            values = json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(values, dict) and values.get("mlflow_run_id"):
            return {
                k: str(values[k]) for k in ("mlflow_run_id", "mlflow_tracking_uri") if values.get(k)
            }
    return {}


# ----------------------------------------------------------------------------------------------
# decoding every prompt each way


@dataclass
class DrafterRecord:
    """One drafter on one prompt."""

    rounds: int
    committed: int  # tokens committed by rounds (the prefill's first token is not a round's)
    seconds: float
    draft_seconds: float
    base_seconds: float
    proposed: list[int]  # [L-1] rounds that proposed a draft at block position i+1
    reached: list[int]  # [L-1] ... and accepted every draft before it
    accepted: list[int]  # [L-1] ... and accepted it too

    @classmethod
    def from_result(cls, result: SpecResult, block_length: int) -> DrafterRecord:
        proposed, reached, accepted = ([0] * (block_length - 1) for _ in range(3))
        for round_ in result.rounds:
            for i in range(round_.drafted):
                proposed[i] += 1
                reached[i] += int(round_.accepted >= i)
                accepted[i] += int(round_.accepted > i)
        return cls(
            rounds=len(result.rounds),
            committed=sum(r.committed for r in result.rounds),
            seconds=result.seconds,
            draft_seconds=result.draft_seconds,
            base_seconds=result.base_seconds,
            proposed=proposed,
            reached=reached,
            accepted=accepted,
        )


@dataclass
class PromptRecord:
    index: int
    line: int
    category: str
    prompt_tokens: int
    max_new_tokens: int
    generated_tokens: int
    greedy_seconds: float
    drafters: dict[str, DrafterRecord] = field(default_factory=dict)


def check_lossless(
    greedy: GreedyResult, spec: SpecResult, drafter: str, where: str, tokenizer: Any
) -> None:
    """Raise LosslessnessError unless the speculative output is greedy's, token for token."""
    if spec.tokens == greedy.tokens:
        return
    position = next(
        (i for i, (a, b) in enumerate(zip(spec.tokens, greedy.tokens, strict=False)) if a != b),
        min(len(spec.tokens), len(greedy.tokens)),
    )
    got = spec.tokens[position] if position < len(spec.tokens) else None
    want = greedy.tokens[position] if position < len(greedy.tokens) else None

    def show(token: int | None) -> str:
        return "end of output" if token is None else f"{token} {tokenizer.decode([token])!r}"

    detail = f"speculative {show(got)} vs greedy {show(want)}"
    margin = greedy.margins[position] if position < len(greedy.margins) else None
    if margin is not None and margin < NEAR_TIE:
        cause = (
            f"greedy's top-2 logit margin there is {margin:.3g}, a numerical near-tie that verifying "
            "several tokens in one forward can flip; --dtype float32 makes it rarer"
        )
    else:
        cause = "not a near-tie: a bug in speculative decoding"
    raise LosslessnessError(
        f"{where}: {drafter} drafting broke losslessness at generated token {position}: {detail} ({cause})"
    )


def drafter_block_length(drafter: Drafter, default: int) -> int:
    return getattr(drafter, "block_length", None) or default


def decode_prompts(
    base: BaseModel,
    drafters: dict[str, Drafter],
    prompts: Sequence[EvalPrompt],
    block_length: int,
    warmup_tokens: int = 16,
    source: str = "prompts",
    progress: bool = True,
) -> list[PromptRecord]:
    """Decode every prompt greedily and with each drafter, check losslessness, record the rounds.

    A drafter's own `block_length` (a head's, or prompt lookup's num_tokens + 1) overrides
    `block_length`.
    """
    from dmtp.models import eos_token_ids

    model, eos = base.model, eos_token_ids(base)
    lengths = {name: drafter_block_length(d, block_length) for name, d in drafters.items()}
    # First calls allocate buffers and pick kernels: keep them out of the timing.
    if warmup_tokens > 0:
        first = prompts[0].ids
        greedy_decode(model, first, warmup_tokens, eos)
        for drafter in drafters.values():
            speculative_decode(
                model,
                drafter,
                first,
                warmup_tokens,
                drafter_block_length(drafter, block_length),
                eos,
            )

    methods = ["greedy", *drafters]
    records = []
    bar = tqdm(prompts, desc="evaluate", unit="prompt", disable=not progress, file=sys.stderr)
    for number, item in enumerate(bar):
        outputs: dict[str, Any] = {}
        shift = number % len(methods)
        for method in methods[shift:] + methods[:shift]:
            if method == "greedy":
                outputs[method] = greedy_decode(model, item.ids, item.max_new_tokens, eos)
            else:
                outputs[method] = speculative_decode(
                    model, drafters[method], item.ids, item.max_new_tokens, lengths[method], eos
                )
        greedy: GreedyResult = outputs["greedy"]
        where = f"{source}:{item.prompt.line}"
        record = PromptRecord(
            index=item.prompt.index,
            line=item.prompt.line,
            category=item.prompt.category or "uncategorized",
            prompt_tokens=len(item.ids),
            max_new_tokens=item.max_new_tokens,
            generated_tokens=len(greedy.tokens),
            greedy_seconds=greedy.seconds,
        )
        for name in drafters:
            check_lossless(greedy, outputs[name], name, where, base.tokenizer)
            record.drafters[name] = DrafterRecord.from_result(outputs[name], lengths[name])
        records.append(record)
        if progress:
            bar.set_postfix({f"tau_{n}": f"{_tau(records, n):.2f}" for n in drafters})
    return records


# ----------------------------------------------------------------------------------------------
# aggregation


def _tau(records: Sequence[PromptRecord], name: str) -> float:
    rounds = sum(r.drafters[name].rounds for r in records)
    return sum(r.drafters[name].committed for r in records) / rounds if rounds else 1.0


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def summarize(records: Sequence[PromptRecord], name: str) -> dict[str, Any]:
    """One drafter's figures over `records`: τ, acceptance by position, speed, time split."""
    drafts = [r.drafters[name] for r in records]
    tokens = sum(r.generated_tokens for r in records)
    greedy_seconds = sum(r.greedy_seconds for r in records)
    seconds = sum(d.seconds for d in drafts)
    width = len(drafts[0].proposed) if drafts else 0
    proposed = [sum(d.proposed[i] for d in drafts) for i in range(width)]
    reached = [sum(d.reached[i] for d in drafts) for i in range(width)]
    accepted = [sum(d.accepted[i] for d in drafts) for i in range(width)]
    return {
        "prompts": len(records),
        "generated_tokens": tokens,
        "rounds": sum(d.rounds for d in drafts),
        "tau": _tau(records, name),
        # Block position i+1 (position 0 is the bonus token, always right).
        "acceptance_by_position": [_ratio(a, p) for a, p in zip(accepted, proposed, strict=True)],
        "conditional_acceptance_by_position": [
            _ratio(a, r) for a, r in zip(accepted, reached, strict=True)
        ],
        "drafts_proposed": sum(proposed),
        "drafts_accepted": sum(accepted),
        "seconds": seconds,
        "greedy_seconds": greedy_seconds,
        "tokens_per_second": _ratio(tokens, seconds),
        "greedy_tokens_per_second": _ratio(tokens, greedy_seconds),
        "speedup": _ratio(greedy_seconds, seconds),  # same tokens both ways (checked lossless)
        "draft_seconds": sum(d.draft_seconds for d in drafts),
        "base_seconds": sum(d.base_seconds for d in drafts),
        "other_seconds": seconds - sum(d.draft_seconds + d.base_seconds for d in drafts),
    }


def machine_info(device: Any) -> dict[str, Any]:
    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def build_result(
    records: Sequence[PromptRecord],
    drafter_names: Sequence[str],
    *,
    base: BaseModel,
    head: dict[str, Any] | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The evaluation as one JSON-ready dict (schema `dmtp.evaluation/1`)."""
    categories = sorted({r.category for r in records})
    return {
        "schema": SCHEMA,
        "base_model": {k: v for k, v in base.identity.items() if k != "resolved_path"},
        "head": head,
        "settings": settings,
        "machine": machine_info(base.model.device),
        "lossless": True,  # checked on every prompt: a mismatch raises before results exist
        "drafters": {
            name: {
                "overall": summarize(records, name),
                "by_category": {
                    c: summarize([r for r in records if r.category == c], name) for c in categories
                },
            }
            for name in drafter_names
        },
        "prompts": [asdict(r) for r in records],
    }


def headline(result: dict[str, Any]) -> str:
    """One line: τ and speedup for each drafter."""
    parts = []
    for name, figures in result["drafters"].items():
        overall = figures["overall"]
        parts.append(
            f"{name} τ={overall['tau']:.2f} speedup {overall['speedup']:.2f}x "
            f"({overall['tokens_per_second']:.1f} vs greedy {overall['greedy_tokens_per_second']:.1f} tok/s)"
        )
    count = len(result["prompts"])
    return "; ".join(parts) + f"; lossless on {count}/{count} prompts"


# ----------------------------------------------------------------------------------------------
# plot and MLflow


def plot_evaluation(result: dict[str, Any], path: str | Path) -> Path:
    """PNG: acceptance by block position (left) and τ per prompt category (right), per drafter."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, no display needed.
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    names = list(result["drafters"])
    for name in names:
        rates = result["drafters"][name]["overall"]["acceptance_by_position"]
        positions = [i + 1 for i, rate in enumerate(rates) if rate is not None]
        left.plot(positions, [r for r in rates if r is not None], marker="o", label=name)
    longest = max(len(result["drafters"][n]["overall"]["acceptance_by_position"]) for n in names)
    left.set_xticks(range(1, longest + 1))
    left.set(xlabel="block position (0 = bonus token)", ylabel="acceptance rate", ylim=(0, 1.02))
    left.set_title("drafts accepted, by position")
    left.legend()

    categories = sorted({p["category"] for p in result["prompts"]})
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        by_category = result["drafters"][name]["by_category"]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(categories))]
        right.bar(xs, [by_category[c]["tau"] for c in categories], width=width, label=name)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    right.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    right.set(ylabel="τ (tokens per round)")
    right.set_title("acceptance length τ by category")
    right.legend()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def _flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, figures in result["drafters"].items():
        overall = figures["overall"]
        for key in SCALAR_METRICS:
            if overall[key] is not None:
                metrics[f"eval/{name}/{key}"] = float(overall[key])
        for i, rate in enumerate(overall["acceptance_by_position"]):
            if rate is not None:
                metrics[f"eval/{name}/acceptance_pos{i + 1}"] = float(rate)
        for category, summary in figures["by_category"].items():
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in category)
            metrics[f"eval/{name}/tau_{safe}"] = float(summary["tau"])
    return metrics


def version_tags(result: dict[str, Any]) -> dict[str, str]:
    """What the head's registered model version shows: its τ and speedup, beside prompt lookup's."""
    tags = {"eval_prompts": str(result["settings"].get("input_data_path", ""))}
    for name, prefix in (("head", ""), ("prompt_lookup", "prompt_lookup_")):
        overall = result["drafters"].get(name, {}).get("overall", {})
        for key in ("tau", "speedup"):
            if overall.get(key) is not None:
                tags[f"{prefix}{key}"] = f"{overall[key]:.4f}"
    tags["lossless"] = str(result["lossless"]).lower()
    return tags


def log_evaluation_to_mlflow(
    result: dict[str, Any],
    tracking_uri: str,
    run_id: str | None = None,
    experiment: str | None = None,
    linked_run_id: str | None = None,
) -> str:
    """Attach an evaluation to MLflow: metrics, `evaluation/evaluation.json`, `evaluation/evaluation.png`.

    With `run_id`, into that run (e.g. the head's training run, finished or not). Otherwise into a
    new run of `experiment` (default: the linked run's), tagged `dmtp.evaluates_run` =
    `linked_run_id` when given. The
    training run's registered head version gets τ and speedup as tags (dmtp.tracking.log_evaluation).
    Returns the run id.
    """
    from dmtp.tracking import log_evaluation

    with tempfile.TemporaryDirectory(prefix="dmtp-eval-") as tmp:
        json_path = Path(tmp) / "evaluation.json"
        json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        png_path = plot_evaluation(result, Path(tmp) / "evaluation.png")
        return log_evaluation(
            tracking_uri,
            metrics=_flat_metrics(result),
            params=result["settings"],
            files=[json_path, png_path],
            summary=headline(result),
            version_tags=version_tags(result),
            run_id=run_id,
            experiment=experiment,
            linked_run_id=linked_run_id,
        )


# ----------------------------------------------------------------------------------------------
# the stage


def load_decoding_base(config: EvalConfig) -> BaseModel:
    """The base model as `dmtp evaluate` decodes with it: on a CPU with `packed_linears`, its linear
    layers prepacked (dmtp/kernels.py), so greedy and every drafter run on the same layers."""
    from dmtp.kernels import pack_linears
    from dmtp.models import load_base_model

    base = load_base_model(config.base_model_path, config.device, config.dtype)
    if config.packed_linears:
        pack_linears(base.model)
    return base


def prompt_lookup_drafter(config: EvalConfig) -> PromptLookupDrafter:
    return PromptLookupDrafter(
        max_ngram=config.prompt_lookup_max_ngram, num_tokens=config.prompt_lookup_num_tokens
    )


def evaluate(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole evaluation of `config`; every input is checked before any decoding."""
    from dmtp.prompts import scan_prompts
    from dmtp.tracking import resolve_tracking_uri

    prompts_path = config.prompts_path
    scan_prompts(prompts_path)  # a malformed line fails now, not after the model has loaded
    trained = {}
    if config.head_path is not None:
        check_head_folder(config.head_path)
        trained = recorded_training(config.head_path)
    # Results join the head's training run where it was logged; no store known: no logging.
    tracking_uri = resolve_tracking_uri(
        config.mlflow_tracking_uri or trained.get("mlflow_tracking_uri"), data_dir=None
    )
    if config.mlflow_run_id and not tracking_uri:
        raise DmtpError("--mlflow_run_id needs --mlflow_tracking_uri (or $MLFLOW_TRACKING_URI)")
    base = load_decoding_base(config)

    drafters: dict[str, Drafter] = {}
    head_info = None
    block_length = config.block_length
    if config.head_path is not None:
        drafters["head"], head_info = load_head_drafter(config, base)
        block_length = head_info["block_length"]
    assert block_length is not None  # EvalConfig requires it without a head
    # One lookup drafter serves all three (it keeps no state); one head drafter both combinations:
    # prompts are decoded one drafter at a time, each from start().
    lookup = prompt_lookup_drafter(config)
    if config.prompt_lookup:
        drafters["prompt_lookup"] = lookup
    if config.lookup_head and {"head", "prompt_lookup"} <= set(drafters):
        drafters["lookup_head"] = LookupThenHeadDrafter(lookup, drafters["head"])
    if config.lookup_and_head and {"head", "prompt_lookup"} <= set(drafters):
        drafters["lookup_and_head"] = LookupAndHeadDrafter(
            lookup, drafters["head"], config.head_alternatives
        )
    longest = max(drafter_block_length(d, block_length) for d in drafters.values())
    prompts = load_eval_prompts(prompts_path, base, config, longest)
    records = decode_prompts(
        base, drafters, prompts, block_length, config.warmup_tokens, str(prompts_path), progress
    )
    settings = {
        **asdict(config),
        "block_length": block_length,
        "input_data_path": str(prompts_path),
    }
    result = build_result(records, list(drafters), base=base, head=head_info, settings=settings)
    if tracking_uri:
        linked = head_info.get("mlflow_run_id") if head_info else None
        result["mlflow_run_id"] = log_evaluation_to_mlflow(
            result, tracking_uri, config.mlflow_run_id, config.experiment_name, linked
        )
    if config.output:
        output = Path(config.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(EvalConfig, args)
    result = evaluate(config)
    where = f" -> {config.output}" if config.output else ""
    if "mlflow_run_id" in result:
        where += f" (MLflow run {result['mlflow_run_id']})"
    print(f"dmtp evaluate: {headline(result)}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("evaluate", sys.argv[1:]))
