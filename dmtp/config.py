"""Every stage's settings as a dataclass: the one source of truth for each default.

The CLI (`dmtp.cli`), the Prefect tasks and flows, and `prefect.yaml` all read their defaults from
here (tests/test_config_agreement.py checks it). This module imports neither torch nor prefect, so a
deployment can be built on a host without either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmtp.errors import DmtpError

STORE_DIRNAME = "collected_data_final"  # the original scripts' folder name, kept for compatibility
PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_PROMPTS = PACKAGE_DIR / "resources" / "prompts" / "demo_train.jsonl"
DEMO_EVAL_PROMPTS = PACKAGE_DIR / "resources" / "prompts" / "demo_eval.jsonl"


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field carrying its CLI help text (and optional `aliases`, `choices`)."""
    if isinstance(default, list | dict):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **metadata}
        )
    return field(default=default, metadata={"help": help, **metadata})


def check(condition: bool, message: str) -> None:
    """Raise a user-facing error unless `condition` holds."""
    if not condition:
        raise DmtpError(message)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


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

    chunk_rows: int = option(512, "rows per compressed chunk (the unit a reader decompresses)")
    rows_per_file: int = option(
        4096,
        "rows per shard file of hidden_states (a multiple of chunk_rows); also the unit a writer "
        "flushes, so a crash loses at most this many uncommitted rows",
    )
    compressor: str = option(
        "none",
        "codec for hidden states: fp16/bf16 activations compress ~1.09x with zstd, not worth its "
        "CPU time (tests/benchmarks/bench_collect.py measures it)",
        choices=["none", "zstd"],
    )

    def __post_init__(self) -> None:
        check(self.chunk_rows >= 1, f"chunk_rows must be >= 1, got {self.chunk_rows}")
        check(
            self.rows_per_file >= self.chunk_rows and self.rows_per_file % self.chunk_rows == 0,
            f"rows_per_file ({self.rows_per_file}) must be a multiple of chunk_rows ({self.chunk_rows})",
        )
        check(
            self.compressor in ("none", "zstd"),
            f"unknown compressor {self.compressor!r}: use none or zstd",
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
        None, "stop after this many samples (sample_size-token windows) have been collected"
    )
    sample_size: int = option(
        512, "tokens per sample: counts samples for --max_samples; storage is never duplicated"
    )
    stride: int = option(
        256, "step between samples, as in the original scripts (recorded, never duplicates storage)"
    )
    max_new_tokens: int = option(
        1024, "tokens to generate per prompt (capped by the model's context)"
    )
    device: str = option("auto", "cuda, cuda:N, cpu, or auto (cuda when available)")
    batch_size: int = option(
        64,
        "rows generating at once; a row whose answer has ended takes the next prompt. Large "
        "batches keep the matmuls efficient: SmolLM2-135M on 2 CPU cores made ~300 tok/s at 64 "
        "in bf16, ~75 at 8 in fp32 (DESIGN §7)",
    )
    dtype: str = option(
        "auto",
        "model dtype: auto (bfloat16 on cuda and on CPUs with native bfloat16 (avx512_bf16 or "
        "amx_bf16), where it measures ~2x faster; float32 on other CPUs), bfloat16, float16, "
        "float32",
        choices=["auto", "bfloat16", "float16", "float32"],
    )
    feature_layers: str = option(
        "auto",
        "base layers stored beside the final state for multi-layer heads (DFlash, EAGLE-3), "
        "numbered as output_hidden_states (0 = embeddings, i = output of decoder layer i-1): "
        "auto (three layers spread as DFlash picks them, e.g. 2,15,28 of 30), none, or a comma "
        "list like 2,15,28. Each adds hidden_size values per token to the store",
    )
    temperature: float = option(0.0, "sampling temperature; 0 = greedy decoding")
    seed: int = option(0, "seed for sampling (temperature > 0)")
    num_shards: int = option(1, "split the prompts into this many shards, one writer each")
    prompts_per_shard: int | None = option(
        None,
        "fixed shards: shard k holds prompts [k·N, (k+1)·N) and --num_shards says how many to "
        "collect, so a larger --num_shards adds shards to the same store (a data budget); "
        "default: the prompts are dealt round-robin over --num_shards",
    )
    shard_index: int | None = option(
        None, "collect only this shard (default: all, one after another)"
    )
    resume: bool = option(False, "continue an interrupted collection from its committed rows")
    overwrite: bool = option(False, "delete an existing store at the output path first")
    layout: StoreLayout = field(default_factory=StoreLayout, metadata={"help": "store chunking"})

    def __post_init__(self) -> None:
        if isinstance(self.layout, dict):
            self.layout = StoreLayout(**self.layout)
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.sample_size >= 1, f"sample_size must be >= 1, got {self.sample_size}")
        check(self.stride >= 1, f"stride must be >= 1, got {self.stride}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(self.max_samples is None or self.max_samples >= 1, "max_samples must be >= 1")
        check(self.num_shards >= 1, f"num_shards must be >= 1, got {self.num_shards}")
        check(
            self.prompts_per_shard is None or self.prompts_per_shard >= 1,
            f"prompts_per_shard must be >= 1, got {self.prompts_per_shard}",
        )
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
        256, "tokens to generate per prompt (capped by the model's context)"
    )
    max_prompts: int | None = option(None, "evaluate only the first N prompts")
    block_length: int | None = option(
        None, "L, tokens per drafted block (the bonus token + L-1 drafts); default: the head's own"
    )
    denoising_steps: int = option(
        1,
        "K, head forwards per draft: unmask the most confident positions in K steps "
        "(1 = all at once)",
    )
    first_position: str = option(
        "clean",
        "position 0 of the drafted block: `clean` = the base model's bonus token, known at draft "
        "time; `masked` = the fully-masked variant (the head guesses it too)",
        choices=["clean", "masked"],
    )
    prompt_lookup: bool = option(True, "also run the prompt-lookup (n-gram) baseline")
    prompt_lookup_max_ngram: int = option(3, "longest suffix n-gram prompt lookup matches")
    prompt_lookup_num_tokens: int | None = option(
        None,
        "drafts per round for prompt lookup; default block_length-1, so both verify equal blocks",
    )
    lookup_head: bool = option(
        True,
        "with a head and prompt lookup, also run both as one drafter: lookup where it matches, the head elsewhere",
    )
    device: str = option("auto", "cuda, cuda:N, cpu, or auto (cuda when available)")
    dtype: str = option(
        "auto",
        "base model dtype: auto (bfloat16 on cuda, float32 on cpu), bfloat16, float16, float32",
        choices=["auto", "bfloat16", "float16", "float32"],
    )
    warmup_tokens: int = option(
        16, "tokens decoded each way before timing starts (first calls allocate and warm caches)"
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
    experiment_name: str = option("dmtp", "MLflow experiment of a new evaluation run")

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts must be >= 1")
        check(
            self.block_length is None or self.block_length >= 2,
            "block_length must be >= 2 (the bonus token plus at least one draft), "
            f"got {self.block_length}",
        )
        check(
            self.denoising_steps >= 1, f"denoising_steps must be >= 1, got {self.denoising_steps}"
        )
        check(self.first_position in ("clean", "masked"), "first_position must be clean or masked")
        check(self.prompt_lookup_max_ngram >= 1, "prompt_lookup_max_ngram must be >= 1")
        check(
            self.prompt_lookup_num_tokens is None or self.prompt_lookup_num_tokens >= 1,
            "prompt_lookup_num_tokens must be >= 1",
        )
        check(self.warmup_tokens >= 0, f"warmup_tokens must be >= 0, got {self.warmup_tokens}")
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
    )
    seed: int = option(0, "which row blocks --sample picks")
    progress: bool = option(True, "show a progress bar (on stderr)")

    def __post_init__(self) -> None:
        check(0.0 < self.sample <= 1.0, f"sample must be in (0, 1], got {self.sample}")


@dataclass
class DataConfig:
    """Training examples from a store (`dmtp.data.create_dataloaders`).

    Example `(shard, row l)`: condition `h_l`, labels `tokens[l : l + block_length]` of its own
    sequence (-100 past its end).
    """

    block_length: int = option(4, "L: tokens predicted from one hidden state (label length)")
    train_ratio: float = option(
        0.9, "fraction of sequences (never positions: no leakage) for training; the rest validate"
    )
    max_samples: int | None = option(
        None,
        "use only the first sequences that hold this many samples (sample_size-token windows, "
        "counted as at collection); for quick tests",
    )
    loss_on: str = option(
        "response",
        "positions that become examples: response (tokens[l] generated), prompt, or all",
        choices=["response", "prompt", "all"],
    )
    shuffle_chunks: int = option(
        16,
        "store chunks mixed in the shuffle buffer; memory per loader worker is about "
        "shuffle_chunks x chunk_rows x hidden_size x bytes per value",
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
    )
    max_sequence_rows: int = option(
        2048, "longer sequences are cut into segments of this many rows (memory per sequence)"
    )

    def __post_init__(self) -> None:
        check(self.block_length >= 1, f"block_length must be >= 1, got {self.block_length}")
        check(
            0.0 < self.train_ratio <= 1.0, f"train_ratio must be in (0, 1], got {self.train_ratio}"
        )
        check(self.max_samples is None or self.max_samples >= 1, "max_samples must be >= 1")
        check(
            self.loss_on in ("response", "prompt", "all"),
            f"loss_on must be response, prompt or all, got {self.loss_on!r}",
        )
        check(self.shuffle_chunks >= 1, f"shuffle_chunks must be >= 1, got {self.shuffle_chunks}")
        check(self.anchors_per_sequence >= 1, "anchors_per_sequence must be >= 1")
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
    num_hidden_layers: int = option(1, "transformer layers in the head (usually 1)")
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
    )
    init_from_base: bool = option(
        False, "start the draft layers as copies of the base model's last decoder layers"
    )
    draft_vocab_size: int = option(
        0,
        "draft only the N tokens the base model outputs most often in the store (EAGLE-3's draft "
        "vocabulary): the LM head is most of a small head's cost; 0: the whole vocabulary",
    )
    hidden_size: int | None = option(
        None, "must equal the store's hidden size (default: the store's)"
    )
    vocab_size: int | None = option(
        None,
        "the base vocabulary (the head borrows the base model's embedding and LM head); "
        "accepted for the guide's commands, checked against the store",
    )
    mask_token_id: int | None = option(
        None, "a base token id used as [MASK] (default: the largest id the store never outputs)"
    )
    pad_token_id: int | None = option(
        None, "pad id recorded in the head (default: the base model's)"
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
    )
    # optimisation
    output_dir: str = option(
        "mtp_checkpoints", "checkpoints and the final head (<output_dir>/final)"
    )
    per_device_train_batch_size: int = option(32, "examples per device per step")
    per_device_eval_batch_size: int | None = option(None, "default: per_device_train_batch_size")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    dataloader_num_workers: int = option(0, "loader processes per rank")
    num_train_epochs: float = option(3.0, "passes over the training split")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides epochs)")
    learning_rate: float = option(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay (never on norms, biases, embeddings)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    warmup_steps: int = option(0, "linear warm-up steps", aliases=["warmup_step"])
    lr_scheduler_type: str = option(
        "linear", "learning-rate schedule after warm-up", choices=["linear", "cosine", "constant"]
    )
    scheduler_type: str = option(
        "linear", "noise schedule α(t) (DESIGN §4)", choices=["linear", "kappa", "cosine"]
    )
    kappa: float = option(2.0, "κ of the kappa schedule α(t) = 1 - t^κ")
    loss_weight_type: str = option(
        "scheduler", "w(t): the schedule's ELBO weight, or ones", choices=["scheduler", "ones"]
    )
    time_epsilon: float = option(1e-3, "t is drawn from U[time_epsilon, 1)")
    objective: str = option(
        "decode_all",
        "decode_all: position 0 clean and out of the loss, 1..L-1 all masked (one-step drafting, "
        "measured best: README); decode: 1..L-1 masked by the schedule (for K > 1 steps); "
        "seed: the guide's literal objective",
        choices=["decode", "decode_all", "seed"],
    )
    position_decay: float = option(
        0.0, "weight draft position k by exp(-(k-1)/γ) (DFlash); 0: equal weights"
    )
    seed: int = option(42, "seed of initialisation, shuffling and masking (every rank alike)")
    mixed_precision: str = option(
        "auto",
        "auto (bf16 on CUDA, off on CPU), no, bf16, fp16",
        choices=["auto", "no", "bf16", "fp16"],
    )
    device: str = option(
        "auto", "auto (CUDA when present), cpu, cuda", choices=["auto", "cpu", "cuda"]
    )
    deepspeed: str | None = option(
        None, "DeepSpeed JSON config (deploy/deepspeed/zero2.json, zero3.json)"
    )
    # logging, evaluation, checkpoints
    logging_steps: int = option(100, "log training metrics every N steps")
    eval_steps: int | None = option(
        None, "evaluate every N steps (default: at every save and at the end)"
    )
    max_eval_examples: int = option(
        2048, "validation examples per evaluation (the split's first N)"
    )
    save_steps: int = option(1000, "write a checkpoint every N steps")
    save_total_limit: int | None = option(3, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = option(
        None, "a checkpoint folder, or `auto` for the newest one in output_dir"
    )
    check_replicas_steps: int = option(
        0, "every N steps, check all ranks hold identical weights (all-gather a checksum); 0: never"
    )
    mlflow_tracking_uri: str | None = option(
        None,
        "MLflow tracking store or server URL; default $MLFLOW_TRACKING_URI, else "
        "sqlite:///<output_dir's parent>/mlflow.db",
    )
    experiment_name: str = option("dmtp", "MLflow experiment")
    report_to: str = option(
        "mlflow", "where metrics go: mlflow, or none", choices=["mlflow", "none"]
    )
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
        check(
            self.num_hidden_layers >= 1,
            f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}",
        )
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
        ):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.dataloader_num_workers >= 0, "dataloader_num_workers must be >= 0")
        check(
            self.num_train_epochs > 0, f"num_train_epochs must be > 0, got {self.num_train_epochs}"
        )
        check(
            self.max_steps is None or self.max_steps >= 1,
            f"max_steps must be >= 1, got {self.max_steps}",
        )
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(
            0.0 <= self.time_epsilon < 1.0,
            f"time_epsilon must be in [0, 1), got {self.time_epsilon}",
        )
        check(self.kappa > 0, f"kappa must be > 0, got {self.kappa}")
        check(
            self.draft_vocab_size >= 0,
            f"draft_vocab_size must be >= 0, got {self.draft_vocab_size}",
        )
        check(self.position_decay >= 0, f"position_decay must be >= 0, got {self.position_decay}")
        check(
            self.context_window is None or self.context_window >= 1,
            f"context_window must be >= 1, got {self.context_window}",
        )
        check(
            0.0 <= self.validate_sample <= 1.0,
            f"validate_sample must be in [0, 1], got {self.validate_sample}",
        )
        check(self.eval_steps is None or self.eval_steps >= 1, "eval_steps must be >= 1")
        check(self.max_eval_examples >= 0, "max_eval_examples must be >= 0")
        check(
            self.save_total_limit is None or self.save_total_limit >= 1,
            "save_total_limit must be >= 1",
        )
        check(self.check_replicas_steps >= 0, "check_replicas_steps must be >= 0")
        check(
            self.vocab_size is None or self.vocab_size >= 2,
            f"vocab_size must be >= 2 (tokens plus the mask), got {self.vocab_size}",
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
    )
    base_model_path: str | None = option(
        None, "read vocab_size from this model folder's config.json (no weights are loaded)"
    )
    stride: int | None = option(
        None,
        "step between windows of one sample at collection; default: found from the overlaps "
        "(windows of one sample_id must agree on their overlap, which is stored once)",
    )
    generated: str = option(
        "infer",
        "which rows are generated (the .pt format does not say): infer = the longest tail where "
        "input_ids[l+1] == tokens[l], as greedy generation makes it; all; none",
        choices=["infer", "all", "none"],
    )
    overwrite: bool = option(False, "replace an existing store at the output path")
    layout: StoreLayout = field(default_factory=StoreLayout, metadata={"help": "store chunking"})

    def __post_init__(self) -> None:
        if isinstance(self.layout, dict):
            self.layout = StoreLayout(**self.layout)
        check(self.input_dir is not None, "pass the folder of .pt files: dmtp import-pt DIR")
        check(self.vocab_size is None or self.vocab_size >= 1, "vocab_size must be >= 1")
        check(self.stride is None or self.stride >= 1, f"stride must be >= 1, got {self.stride}")
        check(
            self.generated in ("infer", "all", "none"),
            f"generated must be infer, all or none, got {self.generated!r}",
        )

    @property
    def store_path(self) -> Path:
        return Path(self.output_dir) / STORE_DIRNAME


EXPORT_FORMATS = ("dflash",)


@dataclass
class ExportConfig:
    """`dmtp export`: a trained head in a serving engine's checkpoint layout (no retraining).

    `dflash` is z-lab's DFlash draft layout, served by SGLang (`--speculative-algorithm DFLASH`) and
    vLLM (`"method": "dflash"`) and loaded by the reference `dflash.model.DFlashDraftModel`.
    """

    head_path: str | None = option(None, "trained head folder (`dmtp train`'s <output_dir>/final)")
    format: str = option("dflash", f"checkpoint layout to write: {', '.join(EXPORT_FORMATS)}")
    output_dir: str | None = option(
        None, "folder to write (config.json, model.safetensors, README.md)"
    )
    dtype: str = option(
        "auto",
        "dtype of the exported weights: auto (as the head was saved), bfloat16, float16, float32",
        choices=["auto", "bfloat16", "float16", "float32"],
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
        check(
            self.format in EXPORT_FORMATS,
            f"format {self.format!r} is not supported: use {' or '.join(EXPORT_FORMATS)}",
        )
        check(
            self.dtype in ("auto", "bfloat16", "float16", "float32"),
            f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}",
        )
