"""Every stage's settings as a dataclass: the one source of truth for each default.

The CLI (`dmtp.cli`), the Prefect flows (their parameters are generated from these fields) and the
child processes the tasks start (`dmtp train --config run.json`) all take their settings from here;
tests/test_config_agreement.py checks that no default is restated anywhere else. This module
imports neither torch nor prefect, so a deployment can be built on a host without either.

Each config checks itself once, when it is constructed: `validate_fields` enforces every field's
choices (its `Literal[...]` type) and bounds (`option(..., ge=..., ...)`), then `__post_init__` the
rules between fields. The CLI, Python callers and the flows all construct these classes, so a bad
value fails the same way, with the same one-line message, wherever it comes from, before any stage
starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dmtp.errors import DmtpError

STORE_DIRNAME = "collected_data_final"  # the original scripts' folder name, kept for compatibility
PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_PROMPTS = PACKAGE_DIR / "resources" / "prompts" / "demo_train.jsonl"
DEMO_EVAL_PROMPTS = PACKAGE_DIR / "resources" / "prompts" / "demo_eval.jsonl"


def option(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    **metadata: Any,
) -> Any:
    """A dataclass field carrying its CLI help text and the bounds `validate_fields` checks.

    ge, gt, le, lt: bounds of a number (>=, >, <=, <). Choices are the field's type
    (`Literal["linear", "cosine"]`), which the CLI and the flows' forms show too. None, where a
    field's type allows it, means "unset" and passes every rule. Other metadata: `aliases` (more
    flag spellings).
    """
    rules = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    metadata = {"help": help, **{k: v for k, v in rules.items() if v is not None}, **metadata}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check(condition: bool, message: str) -> None:
    """Raise a user-facing error unless `condition` holds."""
    if not condition:
        raise DmtpError(message)


BOUNDS = (
    ("ge", ">=", operator.ge),
    ("gt", ">", operator.gt),
    ("le", "<=", operator.le),
    ("lt", "<", operator.lt),
)


@functools.cache
def field_choices(config_class: type) -> dict[str, tuple[Any, ...]]:
    """The values each `Literal[...]`-typed field of `config_class` allows, by field name."""
    choices = {}
    for name, kind in typing.get_type_hints(config_class).items():
        literals = [kind, *typing.get_args(kind)]  # `Literal[...] | None` too
        for literal in literals:
            if typing.get_origin(literal) is Literal:
                choices[name] = typing.get_args(literal)
    return choices


def validate_fields(config: Any) -> None:
    """Check every field of `config` against its rules: its choices (type) and bounds (`option`).

    Raises DmtpError on the first bad field, in one line naming the field, the value and what is
    allowed. Nested configs are not visited: each checks itself when it is constructed.
    """
    all_choices = field_choices(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if value is None:
            continue
        choices = all_choices.get(item.name)
        if choices is not None and value not in choices:
            allowed = ", ".join(map(str, choices))
            raise DmtpError(f"{item.name} must be one of {allowed}; got {value!r}")
        bounds = [(sym, item.metadata[k], holds) for k, sym, holds in BOUNDS if k in item.metadata]
        if not bounds:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DmtpError(f"{item.name} must be a number, got {value!r}")
        if not all(holds(value, bound) for _, bound, holds in bounds):
            rule = " and ".join(f"{sym} {bound}" for sym, bound, _ in bounds)
            raise DmtpError(f"{item.name} must be {rule}, got {value}")


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: Any) -> None:
    """A device one process can load a model onto: auto, cpu, cuda or cuda:N."""
    check(
        isinstance(device, str) and DEVICE_PATTERN.fullmatch(device) is not None,
        f"device must be auto, cpu, cuda or cuda:N (N a GPU index); got {device!r}",
    )


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> Path:
    """Write a resolved config as JSON, for a child process: `dmtp <command> --config PATH`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(config), indent=1) + "\n")
    return path


def default_feature_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """The three base layers a multi-layer head conditions on by default, as DFlash picks them.

    DFlash's `build_target_layer_ids(num_target_layers, 3)` spreads three decoder layers from the
    second to the fourth-last (start 1, end num_target_layers - 3, `round(start + i * span / 2)`),
    skipping the first layers (close to the embeddings) and the last ones (already shaped for the
    next token). dmtp numbers layers as `output_hidden_states` does (0 = embeddings, i = output of
    decoder layer i - 1), so each DFlash id is shifted by one: for 30 layers, (2, 15, 28).
    Models under 6 layers give fewer than three distinct layers (clamped to [1, num_hidden_layers]).
    """
    start, end = 1, num_hidden_layers - 3
    span = end - start
    # Python's round (half to even), as DFlash's own code uses, so the ids match it exactly.
    dflash_ids = [int(round(start + i * span / 2)) for i in range(3)]
    return tuple(sorted({min(max(i + 1, 1), num_hidden_layers) for i in dflash_ids}))


@dataclass
class StoreLayout:
    """How the Zarr store is chunked and encoded (DESIGN §3)."""

    chunk_rows: int = option(
        512, "rows per compressed chunk (the unit a reader decompresses)", ge=1
    )
    rows_per_file: int = option(
        4096,
        "rows per shard file of hidden_states (a multiple of chunk_rows); also the unit a writer "
        "flushes, so a crash loses at most this many uncommitted rows",
        ge=1,
    )
    compressor: Literal["none", "zstd"] = option(
        "none",
        "codec for hidden states: fp16/bf16 activations compress ~1.09x with zstd, not worth its "
        "CPU time (tests/benchmarks/bench_collect.py measures it)",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        check(
            self.rows_per_file >= self.chunk_rows and self.rows_per_file % self.chunk_rows == 0,
            f"rows_per_file ({self.rows_per_file}) must be a multiple of chunk_rows ({self.chunk_rows})",
        )


@dataclass
class CollectConfig:
    """`dmtp collect`: run the base model over prompts and store h_l, input and output tokens."""

    base_model_path: str | None = option(
        None,
        "HF model folder, hub id or .gguf file; default: the embedded SmolLM2-135M-Instruct",
    )
    input_data_path: str | None = option(
        None,
        "JSONL with `prompt` (LongWriter), `messages` (chat; one ending with an `assistant` "
        "answer is teacher-forced) or `turns`; or plain text, one document per line "
        "(teacher-forced); or `sharegpt`: ShareGPT V3's first user turns, the training split "
        "(fetched from PyPI once, dmtp.sharegpt); or `sharegpt-answers`: those turns with "
        "ShareGPT's answers, teacher-forced. Default: the demo's prompts",
    )
    output_dir: str = option("dmtp_data", f"the store is written to <output_dir>/{STORE_DIRNAME}")
    max_samples: int | None = option(
        None, "stop after this many samples (sample_size-token windows) have been collected", ge=1
    )
    sample_size: int = option(
        512,
        "tokens per sample: counts samples for --max_samples; storage is never duplicated",
        ge=1,
    )
    stride: int = option(
        256,
        "step between samples, as in the original scripts (recorded, never duplicates storage)",
        ge=1,
    )
    max_new_tokens: int = option(
        1024, "tokens to generate per prompt (capped by the model's context)", ge=1
    )
    device: str = option("auto", "cuda, cuda:N, cpu, or auto (cuda when available)")
    batch_size: int = option(
        64,
        "rows generating at once; a row whose answer has ended takes the next prompt. Large "
        "batches keep the matmuls efficient: SmolLM2-135M on 2 CPU cores made ~300 tok/s at 64 "
        "in bf16, ~75 at 8 in fp32 (DESIGN §7)",
        ge=1,
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto",
        "model dtype: auto (bfloat16 on cuda and on CPUs with native bfloat16 (avx512_bf16 or "
        "amx_bf16), where it measures ~2x faster; float32 on other CPUs), bfloat16, float16, "
        "float32",
    )
    feature_layers: str = option(
        "auto",
        "base layers stored beside the final state for multi-layer heads (DFlash, EAGLE-3), "
        "numbered as output_hidden_states (0 = embeddings, i = output of decoder layer i-1): "
        "auto (three layers spread as DFlash picks them, e.g. 2,15,28 of 30), none, or a comma "
        "list like 2,15,28. Each adds hidden_size values per token to the store",
    )
    temperature: float = option(0.0, "sampling temperature; 0 = greedy decoding", ge=0)
    seed: int = option(0, "seed for sampling (temperature > 0)")
    num_shards: int = option(1, "split the prompts into this many shards, one writer each", ge=1)
    prompts_per_shard: int | None = option(
        None,
        "fixed shards: shard k holds prompts [k·N, (k+1)·N) and --num_shards says how many to "
        "collect, so a larger --num_shards adds shards to the same store (a data budget); "
        "default: the prompts are dealt round-robin over --num_shards",
        ge=1,
    )
    shard_index: int | None = option(
        None, "collect only this shard (default: all, one after another)", ge=0
    )
    resume: bool = option(False, "continue an interrupted collection from its committed rows")
    overwrite: bool = option(False, "delete an existing store at the output path first")
    layout: StoreLayout = field(default_factory=StoreLayout, metadata={"help": "store chunking"})

    def __post_init__(self) -> None:
        if isinstance(self.layout, dict):
            self.layout = StoreLayout(**self.layout)
        validate_fields(self)
        check_device(self.device)
        check(
            self.shard_index is None or 0 <= self.shard_index < self.num_shards,
            f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}",
        )
        check(
            not (self.resume and self.overwrite),
            "--resume and --overwrite contradict each other: pick one",
        )
        self.feature_layers = str(self.feature_layers).strip().replace(" ", "")
        check(
            self.feature_layers in ("auto", "none")
            or _parse_layer_list(self.feature_layers) is not None,
            f"feature_layers must be auto, none or a comma list of layer indices like 2,15,28; "
            f"got {self.feature_layers!r}",
        )

    def resolve_feature_layers(self, num_hidden_layers: int) -> tuple[int, ...]:
        """The layers to capture for a base model with `num_hidden_layers` decoder layers.

        Sorted, unique, in `output_hidden_states` numbering; may include `num_hidden_layers` itself
        (the final state), which the store already holds as `hidden_states`.
        """
        if self.feature_layers == "none":
            return ()
        if self.feature_layers == "auto":
            return default_feature_layers(num_hidden_layers)
        layers = _parse_layer_list(self.feature_layers) or []
        for layer in layers:
            check(
                0 <= layer <= num_hidden_layers,
                f"feature_layers: layer {layer} is out of range for a base model with "
                f"{num_hidden_layers} layers (use 0 = embeddings .. {num_hidden_layers} = final state)",
            )
        duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
        check(not duplicates, f"feature_layers: layer(s) {duplicates} listed more than once")
        return tuple(sorted(layers))

    @property
    def store_path(self) -> Path:
        return Path(self.output_dir) / STORE_DIRNAME

    @property
    def prompts_path(self) -> Path:
        """The prompts file; a built-in name (`sharegpt`) is fetched and built on first use."""
        from dmtp.sharegpt import resolve_prompt_source

        if not self.input_data_path:
            return DEMO_PROMPTS
        return resolve_prompt_source(self.input_data_path)


def _parse_layer_list(text: str) -> list[int] | None:
    """'2,15,28' -> [2, 15, 28]; None when it is not a comma list of integers."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        return None
    return layers or None


def resolve_store_path(data_dir: str | Path) -> Path:
    """Accept either `<output_dir>` or `<output_dir>/collected_data_final`, as users pass both."""
    path = Path(data_dir)
    if (path / STORE_DIRNAME / "zarr.json").exists():
        return path / STORE_DIRNAME
    return path


@dataclass
class EvalConfig:
    """`dmtp evaluate`: greedy speculative decoding with a head as drafter (DESIGN §5).

    Every prompt is decoded three ways, side by side in one run: plain greedy (the reference and the
    speed baseline), with the head drafting, and with prompt-lookup drafting (the training-free
    baseline). Speculative output must equal greedy output token for token.
    """

    base_model_path: str | None = option(
        None, "HF model folder, hub id or .gguf file; default: the embedded SmolLM2-135M-Instruct"
    )
    head_path: str | None = option(
        None, "trained head folder (save_pretrained output); without it only prompt lookup runs"
    )
    input_data_path: str | None = option(
        None,
        "held-out prompts: JSONL with `prompt` (LongWriter), `messages` or `turns` (MT-Bench / "
        "Spec-Bench: the first turn), optional `category`; or `sharegpt-heldout`: the ShareGPT "
        "conversations `sharegpt` training never sees. Default: the demo's held-out prompts",
    )
    output: str | None = option(None, "write the results as JSON to this file")
    max_new_tokens: int = option(
        256, "tokens to generate per prompt (capped by the model's context)", ge=1
    )
    max_prompts: int | None = option(None, "evaluate only the first N prompts", ge=1)
    block_length: int | None = option(
        None,
        "L, tokens per drafted block (the bonus token + L-1 drafts); default: the head's own",
        ge=2,
    )
    denoising_steps: int = option(
        1,
        "K, head forwards per draft: unmask the most confident positions in K steps "
        "(1 = all at once)",
        ge=1,
    )
    first_position: Literal["clean", "masked"] = option(
        "clean",
        "position 0 of the drafted block: `clean` = the base model's bonus token, known at draft "
        "time; `masked` = the fully-masked variant (the head guesses it too)",
    )
    prompt_lookup: bool = option(True, "also run the prompt-lookup (n-gram) baseline")
    prompt_lookup_max_ngram: int = option(3, "longest suffix n-gram prompt lookup matches", ge=1)
    prompt_lookup_num_tokens: int | None = option(
        7,
        "most tokens prompt lookup drafts a round, alone and beside the head (which drafts "
        "block_length-1); none: block_length-1. Lookup's matches run on (given 3 right, the 4th is "
        "right 9 times in 10), and with packed linears 8 tokens verify at ~1.2x one token's cost",
        ge=1,
    )
    lookup_head: bool = option(
        True,
        "with a head and prompt lookup, also run both as one drafter: lookup where it matches, the head elsewhere",
    )
    lookup_and_head: bool = option(
        True,
        "with a head and prompt lookup, also verify both drafts together as a token tree each "
        "round, keeping the branch the base model accepts furthest",
    )
    head_alternatives: int = option(
        0,
        "in lookup_and_head's tree, the head's next-best first tokens added as branches, each "
        "followed by the head's later drafts. 1 measured τ 2.31 -> 2.47 but 1.74x -> 1.67x on a "
        "2-core CPU, where 10 verified tokens cost more than 7; for hosts where they do not",
        ge=0,
    )
    device: str = option("auto", "cuda, cuda:N, cpu, or auto (cuda when available)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto",
        "base model dtype: auto (bfloat16 on cuda, float32 on cpu), bfloat16, float16, float32",
    )
    packed_linears: bool = option(
        True,
        "on a CPU, run the base model's and the head's linear layers with weights prepacked for "
        "oneDNN, so verifying a few tokens costs about what one does (dmtp/kernels.py); the same "
        "math, still lossless",
    )
    warmup_tokens: int = option(
        16,
        "tokens decoded each way before timing starts (first calls allocate and warm caches)",
        ge=0,
    )
    mlflow_tracking_uri: str | None = option(
        None,
        "log results to this MLflow tracking store or server (e.g. sqlite:///mlflow.db); default "
        "the store the head's training logged to, else $MLFLOW_TRACKING_URI; none of them: no "
        "logging",
    )
    mlflow_run_id: str | None = option(
        None, "log into this run (e.g. the head's training run); unset: a new run, linked by tag"
    )
    experiment_name: str | None = option(
        None,
        "MLflow experiment of a new evaluation run (default: its training run's, else dmtp)",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        check_device(self.device)
        check(
            self.head_path is not None or self.prompt_lookup,
            "nothing to evaluate: pass --head_path, or leave the prompt-lookup baseline on",
        )
        check(
            self.head_path is not None or self.block_length is not None,
            "without --head_path, pass --block_length for the prompt-lookup baseline",
        )

    @property
    def prompts_path(self) -> Path:
        """The prompts file; `sharegpt-heldout` is fetched and built on first use."""
        from dmtp.sharegpt import resolve_prompt_source

        if not self.input_data_path:
            return DEMO_EVAL_PROMPTS
        return resolve_prompt_source(self.input_data_path, evaluation=True)


@dataclass
class ValidateConfig:
    """`dmtp validate`: check a store's metadata, chunks and values before training on it."""

    data_dir: str = option(
        "dmtp_data",
        f"the store, or the output_dir holding {STORE_DIRNAME}",
        aliases=["train_data_dir", "store"],
    )
    report: str | None = option(None, "also write the report as JSON to this file")
    sample: float = option(
        1.0,
        "fraction of row blocks to decode and check, for a quick look at a huge store; metadata, "
        "chunk listings and shard indexes are always checked in full",
        gt=0,
        le=1,
    )
    seed: int = option(0, "which row blocks --sample picks")
    progress: bool = option(True, "show a progress bar (on stderr)")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class DataConfig:
    """Training examples from a store (`dmtp.data.create_dataloaders`).

    Example `(shard, row l)`: condition `h_l`, labels `tokens[l : l + block_length]` of its own
    sequence (-100 past its end).
    """

    block_length: int = option(4, "L: tokens predicted from one hidden state (label length)", ge=1)
    train_ratio: float = option(
        0.9,
        "fraction of sequences (never positions: no leakage) for training; the rest validate",
        gt=0,
        le=1,
    )
    max_samples: int | None = option(
        None,
        "use only the first sequences that hold this many samples (sample_size-token windows, "
        "counted as at collection); for quick tests",
        ge=1,
    )
    loss_on: Literal["response", "prompt", "all"] = option(
        "response",
        "positions that become examples: response (tokens[l] generated), prompt, or all",
    )
    shuffle_chunks: int = option(
        16,
        "store chunks mixed in the shuffle buffer; memory per loader worker is about "
        "shuffle_chunks x chunk_rows x hidden_size x bytes per value",
        ge=1,
    )
    split_seed: int = option(
        0, "seed of the train/validation split (kept apart from the training seed)"
    )
    allow_incomplete: bool = option(
        False, "train on the committed rows of a store whose collection has not finished"
    )
    anchors_per_sequence: int = option(
        64,
        "blocks drawn from each sequence per pass: one forward computes a sequence's context once "
        "for all its blocks (DESIGN §4)",
        ge=1,
    )
    max_sequence_rows: int = option(
        2048,
        "longer sequences are cut into segments of this many rows (memory per sequence)",
        # more than block_length (checked below), itself >= 1
        ge=2,
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        check(
            self.max_sequence_rows > self.block_length,
            f"max_sequence_rows must exceed block_length, got {self.max_sequence_rows}",
        )


@dataclass
class TrainConfig:
    """`dmtp train` / `torchrun -m dmtp.train`: fit a diffusion MTP head on a store (DESIGN §4).

    Flags and defaults follow the original guide (`train_mtp_head.py`) and, where it is silent,
    transformers' Trainer. Data flags (block_length, train_ratio, max_samples, ...) are DataConfig's.
    """

    # model
    model_name_or_path: str | None = option(
        None, "start from an earlier head folder (its shape wins); default: a new head"
    )
    base_model_path: str | None = option(
        None,
        "base model whose layer type, embedding and LM head a new head takes; default: the "
        "store's recorded base model, or random initialisation when the store names none",
    )
    num_hidden_layers: int = option(1, "transformer layers in the head (usually 1)", ge=1)
    feature_layers: str = option(
        "auto",
        "base layers the head conditions on, as output_hidden_states indices (0 = embeddings), "
        "e.g. 2,15,28,30; auto: every layer the store holds; last: the final state only (the seed)",
    )
    context_window: int | None = option(
        None,
        "context rows up to the anchor a block attends to; default all earlier positions (DFlash). "
        "On a CPU data budget 1 measured best (README, 'Draft quality'); 1 with --feature_layers "
        "last is the guide's head",
        ge=1,
    )
    init_from_base: bool = option(
        False, "start the draft layers as copies of the base model's last decoder layers"
    )
    draft_vocab_size: int = option(
        0,
        "draft only the N tokens the base model outputs most often in the store (EAGLE-3's draft "
        "vocabulary): the LM head is most of a small head's cost; 0: the whole vocabulary",
        ge=0,
    )
    hidden_size: int | None = option(
        None, "must equal the store's hidden size (default: the store's)", ge=1
    )
    # >= 2: the base tokens plus one to serve as the mask
    vocab_size: int | None = option(
        None,
        "the base vocabulary (the head borrows the base model's embedding and LM head); "
        "accepted for the guide's commands, checked against the store",
        ge=2,
    )
    mask_token_id: int | None = option(
        None,
        "a base token id used as [MASK] (default: the largest id the store never outputs)",
        ge=0,
    )
    pad_token_id: int | None = option(
        None, "pad id recorded in the head (default: the base model's)", ge=0
    )
    # data
    train_data_dir: str = option(
        "dmtp_data", f"the store, or the output_dir holding {STORE_DIRNAME}", aliases=["data_dir"]
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training examples"})
    validate_sample: float = option(
        1.0,
        "fraction of the store's row blocks `dmtp validate` decodes before training; 0 skips it "
        "(when a flow has just validated the store)",
        ge=0,
        le=1,
    )
    # optimisation
    output_dir: str = option(
        "mtp_checkpoints", "checkpoints and the final head (<output_dir>/final)"
    )
    per_device_train_batch_size: int = option(32, "examples per device per step", ge=1)
    per_device_eval_batch_size: int | None = option(
        None, "default: per_device_train_batch_size", ge=1
    )
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", ge=1)
    dataloader_num_workers: int = option(0, "loader processes per rank", ge=0)
    num_train_epochs: float = option(3.0, "passes over the training split", gt=0)
    max_steps: int | None = option(
        None, "stop after this many optimizer steps (overrides epochs)", ge=1
    )
    learning_rate: float = option(5e-5, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = option(
        0.0, "AdamW weight decay (never on norms, biases, embeddings)", ge=0
    )
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", ge=0)
    warmup_steps: int = option(0, "linear warm-up steps", ge=0, aliases=["warmup_step"])
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = option(
        "linear", "learning-rate schedule after warm-up"
    )
    scheduler_type: Literal["linear", "kappa", "cosine"] = option(
        "linear", "noise schedule α(t) (DESIGN §4)"
    )
    kappa: float = option(2.0, "κ of the kappa schedule α(t) = 1 - t^κ", gt=0)
    loss_weight_type: Literal["scheduler", "ones"] = option(
        "scheduler", "w(t): the schedule's ELBO weight, or ones"
    )
    time_epsilon: float = option(1e-3, "t is drawn from U[time_epsilon, 1)", ge=0, lt=1)
    objective: Literal["decode", "decode_all", "seed"] = option(
        "decode_all",
        "decode_all: position 0 clean and out of the loss, 1..L-1 all masked (one-step drafting, "
        "measured best: README); decode: 1..L-1 masked by the schedule (for K > 1 steps); "
        "seed: the guide's literal objective",
    )
    position_decay: float = option(
        0.0, "weight draft position k by exp(-(k-1)/γ) (DFlash); 0: equal weights", ge=0
    )
    distill_weight: float = option(
        0.0,
        "weight of the base model's own distribution (soft targets from the stored final states, "
        "over the draft vocabulary) against its greedy token in the loss; 0: the token alone",
        ge=0,
        le=1,
    )
    seed: int = option(42, "seed of initialisation, shuffling and masking (every rank alike)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto",
        "auto (bf16 on CUDA, off on CPU), no, bf16, fp16",
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto (CUDA when present), cpu, cuda")
    deepspeed: str | None = option(
        None, "DeepSpeed JSON config (deploy/deepspeed/zero2.json, zero3.json)"
    )
    # logging, evaluation, checkpoints
    logging_steps: int = option(100, "log training metrics every N steps", ge=1)
    eval_steps: int | None = option(
        None, "evaluate every N steps (default: at every save and at the end)", ge=1
    )
    max_eval_examples: int = option(
        2048, "validation examples per evaluation (the split's first N)", ge=0
    )
    save_steps: int = option(1000, "write a checkpoint every N steps", ge=1)
    save_total_limit: int | None = option(3, "keep only the newest N checkpoints", ge=1)
    resume_from_checkpoint: str | None = option(
        None, "a checkpoint folder, or `auto` for the newest one in output_dir"
    )
    check_replicas_steps: int = option(
        0,
        "every N steps, check all ranks hold identical weights (all-gather a checksum); 0: never",
        ge=0,
    )
    mlflow_tracking_uri: str | None = option(
        None,
        "MLflow tracking store or server URL; default $MLFLOW_TRACKING_URI, else "
        "sqlite:///<output_dir's parent>/mlflow.db",
    )
    experiment_name: str = option("dmtp", "MLflow experiment")
    report_to: Literal["mlflow", "none"] = option("mlflow", "where metrics go: mlflow, or none")
    run_name: str | None = option(None, "MLflow run name (default: output_dir's name)")
    mlflow_log_checkpoints: bool = option(
        False,
        "also upload each checkpoint into the run's artifacts (default: checkpoints stay local; "
        "only the final head is uploaded)",
    )
    mlflow_registered_model: str | None = option(
        None,
        "register the final head in the MLflow model registry under this name (default "
        "dmtp-<base model name>, one version per training; `none`: log it without registering)",
    )
    mlflow_flush_timeout_s: float = option(
        60.0,
        "at the end of training, wait at most this long for metrics the MLflow server has not "
        "taken yet (it was down or slow); what is left stays in <output_dir>/"
        "mlflow_undelivered.jsonl for `python -m dmtp.outbox` or the next run to deliver",
        ge=0,
    )
    test_mode: bool = option(
        False, "smoke run: at most 20 steps on at most 64 samples, logging every step"
    )

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if self.test_mode:
            self.max_steps = min(self.max_steps or 20, 20)
            self.logging_steps = 1
            self.eval_steps = min(self.eval_steps or 10, 10)
            self.max_eval_examples = min(self.max_eval_examples, 256)
            self.data.max_samples = min(self.data.max_samples or 64, 64)
        # torchrun starts one rank per GPU and each takes its own (LOCAL_RANK among the ones
        # CUDA_VISIBLE_DEVICES lists): a fixed cuda:N would put every rank on the same GPU.
        check(
            not (isinstance(self.device, str) and self.device.startswith("cuda:")),
            f"device {self.device!r}: training runs one torchrun rank per GPU, so it takes auto, "
            "cpu or cuda; choose the GPUs with CUDA_VISIBLE_DEVICES (e.g. "
            f"CUDA_VISIBLE_DEVICES={str(self.device).partition(':')[2]} and device cuda)",
        )
        validate_fields(self)
        check(
            self.feature_layers in ("auto", "last")
            or _parse_layer_list(str(self.feature_layers).replace(" ", "")) is not None,
            f"--feature_layers {self.feature_layers!r}: use auto, last, or layer indices like "
            "2,15,28",
        )

    @property
    def block_length(self) -> int:
        return self.data.block_length


@dataclass
class ImportPtConfig:
    """`dmtp import-pt`: convert the original scripts' `.pt` files into a store (streaming)."""

    input_dir: str | None = option(
        None,
        "folder with hidden_states.pt [N, S, H], tokens.pt, input_ids.pt [N, S] and sample_ids.pt "
        f"[N] (or the output_dir holding {STORE_DIRNAME}/ with them); also accepted positionally",
    )
    output_dir: str = option("dmtp_data", f"the store is written to <output_dir>/{STORE_DIRNAME}")
    vocab_size: int | None = option(
        None,
        "the base model's vocabulary size (the .pt files do not record it; the head's mask token "
        "defaults to this id); or pass --base_model_path",
        ge=1,
    )
    base_model_path: str | None = option(
        None, "read vocab_size from this model folder's config.json (no weights are loaded)"
    )
    stride: int | None = option(
        None,
        "step between windows of one sample at collection; default: found from the overlaps "
        "(windows of one sample_id must agree on their overlap, which is stored once)",
        ge=1,
    )
    generated: Literal["infer", "all", "none"] = option(
        "infer",
        "which rows are generated (the .pt format does not say): infer = the longest tail where "
        "input_ids[l+1] == tokens[l], as greedy generation makes it; all; none",
    )
    overwrite: bool = option(False, "replace an existing store at the output path")
    layout: StoreLayout = field(default_factory=StoreLayout, metadata={"help": "store chunking"})

    def __post_init__(self) -> None:
        if isinstance(self.layout, dict):
            self.layout = StoreLayout(**self.layout)
        check(self.input_dir is not None, "pass the folder of .pt files: dmtp import-pt DIR")
        validate_fields(self)

    @property
    def store_path(self) -> Path:
        return Path(self.output_dir) / STORE_DIRNAME


ExportFormat = Literal["dflash"]
EXPORT_FORMATS = typing.get_args(ExportFormat)


@dataclass
class ExportConfig:
    """`dmtp export`: a trained head in a serving engine's checkpoint layout (no retraining).

    `dflash` is z-lab's DFlash draft layout, served by SGLang (`--speculative-algorithm DFLASH`) and
    vLLM (`"method": "dflash"`) and loaded by the reference `dflash.model.DFlashDraftModel`.
    """

    head_path: str | None = option(None, "trained head folder (`dmtp train`'s <output_dir>/final)")
    format: ExportFormat = option(
        "dflash",
        f"checkpoint layout to write: {', '.join(EXPORT_FORMATS)}",
    )
    output_dir: str | None = option(
        None, "folder to write (config.json, model.safetensors, README.md)"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto",
        "dtype of the exported weights: auto (as the head was saved), bfloat16, float16, float32",
    )
    evaluation: str | None = option(
        None,
        "a `dmtp evaluate --output` JSON of this head: its τ, acceptance and speedup go into the "
        "model card",
    )
    train_data_dir: str | None = option(
        None,
        f"the store the head was trained on (or the output_dir holding {STORE_DIRNAME}): its "
        "prompts and size go into the model card",
    )
    overwrite: bool = option(False, "replace an existing export in output_dir")

    def __post_init__(self) -> None:
        check(self.head_path is not None, "pass the head to export: --head_path <output_dir>/final")
        check(self.output_dir is not None, "pass where to write the export: --output_dir DIR")
        validate_fields(self)
