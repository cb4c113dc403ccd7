"""Train a diffusion MTP head on a store, tracked in MLflow (DESIGN §4, §6).

    dmtp train --train_data_dir dmtp_data --output_dir heads/run1 --block_length 4
    torchrun --standalone --nproc_per_node=2 -m dmtp.train --train_data_dir dmtp_data --output_dir heads/run1
    torchrun --nproc_per_node=8 -m dmtp.train ... --deepspeed deploy/deepspeed/zero2.json
    dmtp train ... --resume_from_checkpoint auto        # continue a killed run, same loss curve

What it does, in order: check the configuration against the store (shape, vocabulary, mask id) and
validate the store, all before any model is built; build or load the head; train with accelerate
(DDP on gloo or NCCL, DeepSpeed when asked); log to MLflow from rank 0 only; write checkpoints
(`<output_dir>/checkpoint-<step>/`) and the final head (`<output_dir>/final/`), which
`MTPHeadModel.from_pretrained` and `dmtp evaluate --head_path` load.

Checkpoints are safetensors + JSON, never pickle (their files: dmtp.checkpoint; MLflow:
dmtp.tracking). SIGTERM (a spot reclaim, a Kubernetes eviction; torchrun passes its own on) stops
training after the current step with a checkpoint and exit code 75 (dmtp.errors.Preempted), which
a scheduler retries with `--resume_from_checkpoint auto`. A checkpoint that hits a full disk is
removed and training stops with one line (dmtp.errors.DiskFull). Masking noise is drawn from a
generator seeded by (seed, rank, step), so a resumed run sees the same masks as an uninterrupted
one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmtp import checkpoint
from dmtp.checkpoint import FINAL_DIRNAME
from dmtp.config import TrainConfig, resolve_store_path, to_dict
from dmtp.errors import DmtpError, Preempted, StoreError
from dmtp.tracking import Tracker, flatten_params, registered_model_name

LOG_FILE = "train_log.jsonl"
# Fault injection for the resume test: SIGKILL this process right after optimizer step N
# (after any checkpoint at N is written), as an OOM killer or a lost node would.
KILL_AT_STEP_ENV = "DMTP_TEST_KILL_AT_STEP"
# The MLflow run of a training killed before its first checkpoint, continued by a resume.
RUN_ID_FILE = "mlflow_run_id"
# Written when SIGTERM stopped the run: torchrun exits 1 whatever its ranks' code, so a launcher
# reads this to tell a preemption (retry, resume) from a crash.
PREEMPTED_FILE = "preempted.json"
# validation noise: a stream no training step uses, the same at every evaluation
EVAL_NOISE_STEP = 2**62


# ----------------------------------------------------------------------------------------------
# plan: everything checked and resolved before a model is built


@dataclass
class TrainPlan:
    """The head's shape and origin, resolved from the flags, the store and the base model."""

    store_path: Path
    hidden_size: int
    vocab_size: int
    mask_token_id: int
    store_vocab_size: int
    base_model_path: str | None  # None: random initialisation
    base_model_identity: dict[str, Any] | None  # what the store records
    store_rows: int
    feature_layers: list[int]  # output_hidden_states indices the head reads
    num_target_layers: int  # the base model's decoder layers (-1 numbering resolved)
    draft_vocab: list[int] | None  # the tokens the head may draft (None: all)


def _token_counts(store: Any) -> np.ndarray:
    """How often each token id occurs as an output token `t_l` in the store."""
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    for shard in store.shards():
        tokens = np.asarray(shard.array("tokens")[: shard.n_committed], dtype=np.int64)
        if tokens.size:
            counts += np.bincount(tokens, minlength=len(counts))[: len(counts)]
            if int(tokens.max()) >= len(counts):
                raise StoreError(
                    f"{store.path}: shard {shard.index} holds token id {int(tokens.max())} >= the "
                    f"store's vocab_size {store.vocab_size}; run `dmtp validate`"
                )
    return counts


def draft_vocabulary(counts: np.ndarray, size: int, mask_token_id: int) -> list[int] | None:
    """The `size` most frequent output tokens (ids ascending), never the mask; None for 0 or all."""
    if size <= 0 or size >= len(counts):
        return None
    counts = counts.copy()
    if mask_token_id < len(counts):
        counts[mask_token_id] = -1
    # stable on ties, so the same store always gives the same vocabulary
    top = np.argsort(-counts, kind="stable")[:size]
    return sorted(int(i) for i in top)


def resolve_feature_layers(spec: str, store: Any) -> tuple[list[int], int]:
    """(feature layers, num_target_layers) for --feature_layers auto | last | 2,15,28,30."""
    final = store.num_hidden_layers
    readable = list(store.feature_layers)
    if spec == "auto":
        layers = readable
    elif spec == "last":
        layers = [readable[-1]]
    else:
        try:
            layers = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise DmtpError(
                f"--feature_layers {spec!r}: use auto, last, or layer indices like 2,15,28"
            ) from None
        missing = [i for i in layers if i not in readable and not (final is None and i == -1)]
        if not layers or missing:
            raise DmtpError(
                f"--feature_layers {spec}: layer(s) {missing or spec} not in the store {store.path}, "
                f"which holds {readable}; collect with --feature_layers to add them"
            )
    if final is None:  # a store from before feature layers: the final state only, depth unknown
        return [-1 if i == -1 else i for i in layers], -1
    return [final if i == -1 else i for i in layers], final


def plan_training(config: TrainConfig) -> TrainPlan:
    """Check the flags against the store and return the resolved head shape; raises DmtpError."""
    from dmtp.store import open_store

    store_path = resolve_store_path(config.train_data_dir)
    if not store_path.exists():
        raise StoreError(
            f"--train_data_dir {config.train_data_dir}: no such store; run `dmtp collect --output_dir "
            f"{config.train_data_dir}` first or point --train_data_dir at an existing store"
        )
    store = open_store(store_path, require_complete=not config.data.allow_incomplete)
    if config.hidden_size is not None and config.hidden_size != store.hidden_size:
        raise DmtpError(
            f"--hidden_size {config.hidden_size} != the store's hidden size {store.hidden_size} "
            f"({store_path}): drop --hidden_size or use a store collected from a model of that size"
        )
    feature_layers, num_target_layers = resolve_feature_layers(config.feature_layers, store)
    counts = _token_counts(store)
    if config.vocab_size is not None and config.vocab_size < store.vocab_size:
        raise DmtpError(
            f"--vocab_size {config.vocab_size} is smaller than the store's vocabulary "
            f"{store.vocab_size} ({store_path}): drop the flag (the head uses the base model's)"
        )
    identity = store.attrs.get("base_model")
    base_model_path = config.base_model_path
    if base_model_path is not None and base_model_path.lower() == "none":
        base_model_path = None
    elif base_model_path is None and identity:
        from dmtp.models import DEFAULT_MODEL, HUB_ID

        recorded = identity.get("name_or_path")
        base_model_path = None if recorded == DEFAULT_MODEL.name else recorded
        if (
            base_model_path is not None
            and not Path(base_model_path).expanduser().exists()
            and (base_model_path.startswith((".", "/", "~")) or not HUB_ID.match(base_model_path))
        ):
            raise DmtpError(
                f"the store was collected from base model {recorded!r}, which is not found here: pass "
                "--base_model_path <its folder> (or --base_model_path none for a randomly initialised head)"
            )
        if base_model_path is None:
            base_model_path = ""  # the embedded default model (resolve_base_model fetches it)
    vocab_size = store.vocab_size
    if base_model_path is None:
        # A head of its own vocabulary adds a row for the mask, as the guide's head did.
        vocab_size = max(config.vocab_size or 0, store.vocab_size + 1)
        mask_token_id = store.vocab_size if config.mask_token_id is None else config.mask_token_id
    elif config.mask_token_id is None:
        # A token the base model never output here: it will not be confused with a real bonus.
        unused = np.flatnonzero(counts == 0)
        mask_token_id = int(unused[-1]) if len(unused) else store.vocab_size - 1
    else:
        mask_token_id = config.mask_token_id
    if not 0 <= mask_token_id < vocab_size:
        raise DmtpError(
            f"--mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size}): the mask "
            "is one of the base model's token ids (its embedding row is the mask vector)"
        )
    return TrainPlan(
        store_path=store.path,
        hidden_size=store.hidden_size,
        vocab_size=vocab_size,
        mask_token_id=mask_token_id,
        store_vocab_size=store.vocab_size,
        base_model_path=base_model_path,
        base_model_identity=identity,
        store_rows=store.n_rows,
        feature_layers=feature_layers,
        num_target_layers=num_target_layers,
        draft_vocab=draft_vocabulary(counts, config.draft_vocab_size, mask_token_id),
    )


def validate_before_training(config: TrainConfig, plan: TrainPlan) -> None:
    """Run `dmtp validate` on the store (unless validate_sample is 0); stop on any error."""
    if config.validate_sample == 0:
        return
    from dmtp.validate import validate_store

    report = validate_store(plan.store_path, sample=config.validate_sample, seed=config.seed)
    errors = report.errors
    if config.data.allow_incomplete:  # the user asked to train on committed rows only
        errors = [e for e in errors if e.check != "incomplete"]
    if errors:
        first = errors[0]
        raise StoreError(
            f"{plan.store_path} fails validation ({len(errors)} errors, first: {first}); "
            f"run `dmtp validate --data_dir {plan.store_path}` for the full report and re-collect the damaged shards"
        )


# ----------------------------------------------------------------------------------------------
# the head


def load_plan_base(plan: TrainPlan, layers: Sequence[int] = ()) -> Any:
    """The base model's parts the head borrows (embedding, LM head, layer shape), checked against
    the store's fingerprint."""
    from dmtp.head import load_base_model_parts

    if plan.base_model_path is None:
        return None  # a head of its own vocabulary (the guide's §3.2)
    base = load_base_model_parts(plan.base_model_path or None, layers=layers)
    recorded = (plan.base_model_identity or {}).get("fingerprint")
    if recorded and recorded != base.identity["fingerprint"]:
        raise DmtpError(
            f"the store was collected from base model {plan.base_model_identity.get('name_or_path')!r} "
            f"(fingerprint {recorded}), but --base_model_path {plan.base_model_path or '(default)'} "
            f"has fingerprint {base.identity['fingerprint']}: train with the model that made the hidden states"
        )
    if plan.base_model_identity and plan.base_model_identity.get("hidden_state"):
        base.identity["hidden_state"] = plan.base_model_identity["hidden_state"]
    return base


def build_or_load_head(config: TrainConfig, plan: TrainPlan) -> Any:
    """A new head, or the one at --model_name_or_path, with the base model's embedding and LM head attached."""
    from dmtp.head import base_layers_for_init, build_head, load_head

    if config.model_name_or_path:
        head = load_head(config.model_name_or_path)
        where = f"--model_name_or_path {config.model_name_or_path}"
        if head.config.hidden_size != plan.hidden_size:
            raise DmtpError(
                f"{where}: head hidden size {head.config.hidden_size} != the store's {plan.hidden_size}"
            )
        if head.config.block_length != config.block_length:
            raise DmtpError(
                f"{where}: the head was trained with block_length {head.config.block_length}; "
                f"pass --block_length {head.config.block_length}"
            )
        if list(head.config.feature_layers) != plan.feature_layers:
            raise DmtpError(
                f"{where}: the head reads feature layers {head.config.feature_layers}, this run "
                f"{plan.feature_layers}; pass --feature_layers {','.join(map(str, head.config.feature_layers))}"
            )
        if not head.config.owns_vocabulary:
            base = load_plan_base(plan)
            if base is None:
                raise DmtpError(
                    f"{where}: the head borrows a base model's vocabulary; pass --base_model_path"
                )
            head.attach_base(base.embeddings, base.lm_head)
        return head
    layers = (
        base_layers_for_init(plan.num_target_layers, config.num_hidden_layers)
        if config.init_from_base
        else []
    )
    base = load_plan_base(plan, layers)
    if base is None and config.init_from_base:
        raise DmtpError(
            "--init_from_base needs a base model: the store names none, pass --base_model_path"
        )
    if config.init_from_base and not layers:
        # a store from before feature layers does not record the base depth: the base model does
        layers = base_layers_for_init(base.num_hidden_layers, config.num_hidden_layers)
        base = load_plan_base(plan, layers)
    return build_head(
        hidden_size=plan.hidden_size,
        vocab_size=plan.vocab_size,
        mask_token_id=plan.mask_token_id,
        block_length=config.block_length,
        feature_layers=plan.feature_layers,
        num_target_layers=base.num_hidden_layers if base else plan.num_target_layers,
        context_window=config.context_window,
        num_hidden_layers=config.num_hidden_layers,
        pad_token_id=config.pad_token_id,
        base=base,
        init_from_base=config.init_from_base,
        draft_vocab=plan.draft_vocab,
        seed=config.seed,
    )


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on norms or biases."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2
        (no_decay if exempt else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------------------------
# one training step and evaluation (free functions: the tests and the benchmark call them too)


def noise_generator(seed: int, rank: int, step: int, micro_step: int = 0) -> torch.Generator:
    """A CPU generator for the masking noise of one micro-batch: a function of its position in the run."""
    state = np.random.SeedSequence([seed, rank, step, micro_step]).generate_state(
        2, dtype=np.uint64
    )
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def diffusion_loss(
    model: Any,
    head: Any,
    batch: dict[str, torch.Tensor],
    *,
    schedule: Any,
    loss_weight_type: str,
    time_epsilon: float,
    mask_token_id: int,
    objective: str,
    position_decay: float,
    generator: torch.Generator,
    distill_weight: float = 0.0,
) -> torch.Tensor:
    """Mask the batch's blocks at random times and return the objective's loss (scalar).

    `model` is what the accelerator wrapped (its forward syncs gradients), `head` the bare head
    (its LM head is the base model's, with no parameter to sync). Batch: see dmtp.blocks.
    """
    from dmtp.loss import block_loss, loss_weights, noised_input_ids, sample_masking

    labels = batch["labels"]  # [B, A, L]
    flat = labels.flatten(0, 1)
    t, masked = sample_masking(flat, schedule, time_epsilon, generator, objective)
    output = model(
        in_hidden_states=batch["context_features"],
        input_ids=noised_input_ids(flat, masked, mask_token_id).view_as(labels),
        anchors=batch["anchors"],
        context_mask=batch["context_mask"],
        with_logits=False,
    )
    weights = loss_weights(schedule, t, loss_weight_type, objective)
    return block_loss(
        head,
        output.hidden_states.flatten(0, 1),
        flat,
        masked,
        weights,
        objective=objective,
        position_decay=position_decay,
        teacher_states=batch["label_states"].flatten(0, 1) if "label_states" in batch else None,
        distill_weight=distill_weight,
    )


def count_blocks(batch: dict[str, torch.Tensor]) -> int:
    """Blocks (training examples) in a batch: anchors that are not padding."""
    return int((batch["anchors"] >= 0).sum())


@torch.no_grad()
def draft_counts(
    model: Any, head: Any, batch: dict[str, torch.Tensor], mask_token_id: int
) -> dict[str, torch.Tensor]:
    """Greedy one-step drafts as at inference (DESIGN §5): position 0 clean, the rest masked.

    Returns counts to be summed over batches and ranks: `correct [L]`, `valid [L]` per position,
    and `tau_sum`, `tau_count` over full blocks, where a block's τ is 1 + the number of leading
    correct drafts at positions 1..L-1 (the bonus token counts, as in EAGLE / Spec-Bench).
    """
    from dmtp.blocks import one_step_drafts

    predicted = one_step_drafts(model, head, batch, mask_token_id).flatten(0, 1)
    labels = batch["labels"].flatten(0, 1)
    real = labels[:, 0] != -100
    labels, predicted = labels[real], predicted[real]
    valid = labels != -100
    correct = torch.cat([valid[:, :1], (predicted == labels[:, 1:]) & valid[:, 1:]], dim=1)
    full = valid.all(dim=1)
    leading = torch.cumprod(correct[:, 1:].long(), dim=1).sum(dim=1)
    return {
        "correct": correct.sum(dim=0).double(),
        "valid": valid.sum(dim=0).double(),
        "tau_sum": (1 + leading)[full].sum().double().reshape(1),
        "tau_count": full.sum().double().reshape(1),
    }


def summarize_draft_counts(
    counts: dict[str, torch.Tensor], prefix: str = "val/"
) -> dict[str, float]:
    """Per-position draft accuracy (positions 1..L-1, the drafted ones) and simulated τ."""
    metrics: dict[str, float] = {}
    correct, valid = counts["correct"].tolist(), counts["valid"].tolist()
    for position in range(1, len(correct)):
        if valid[position]:
            metrics[f"{prefix}accuracy_pos{position}"] = correct[position] / valid[position]
    drafted_valid = sum(valid[1:])
    if drafted_valid:
        metrics[f"{prefix}draft_accuracy"] = sum(correct[1:]) / drafted_valid
    if counts["tau_count"].item():
        metrics[f"{prefix}tau"] = counts["tau_sum"].item() / counts["tau_count"].item()
    return metrics


# ----------------------------------------------------------------------------------------------
# the trainer


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The --deepspeed JSON with batch size, accumulation and clipping filled from our flags.

    Filled here, not left to "auto", so the file and the command line cannot disagree.
    """
    path = Path(config.deepspeed or "")
    if not path.is_file():
        raise DmtpError(
            f"--deepspeed {path}: no such file (see deploy/deepspeed/zero2.json, zero3.json)"
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DmtpError(f"--deepspeed {path}: not valid JSON ({error})") from error
    stage = values.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise DmtpError(f"--deepspeed {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    values["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    values["gradient_accumulation_steps"] = config.gradient_accumulation_steps
    values["gradient_clipping"] = config.max_grad_norm
    values.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    return values


def make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise DmtpError(
            "--device cuda: CUDA is not available on this machine (use --device cpu or auto)"
        )
    precision = config.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    plugin = None
    if config.deepspeed:
        values = deepspeed_config(config)
        if importlib.util.find_spec("deepspeed") is None:
            raise DmtpError("--deepspeed needs the deepspeed package: pip install deepspeed")
        plugin = DeepSpeedPlugin(hf_ds_config=values)
    return Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
    )


def make_dataloaders(
    config: TrainConfig, plan: TrainPlan, rank: int, world_size: int
) -> tuple[Any, Any]:
    """(train, validation) loaders of this rank's share of the store: anchored blocks of whole
    sequences (dmtp.blocks); `per_device_train_batch_size` counts blocks."""
    from torch.utils.data import DataLoader

    from dmtp.blocks import AnchoredBlocks
    from dmtp.data import TRAIN, VAL, StoreIndex
    from dmtp.store import open_store

    data = config.data
    index = StoreIndex(
        open_store(plan.store_path, require_complete=not data.allow_incomplete),
        loss_on=data.loss_on,
        train_ratio=data.train_ratio,
        split_seed=data.split_seed,
        max_samples=data.max_samples,
    )

    def loader(split: int, batch_size: int, shuffle: bool) -> DataLoader:
        blocks = AnchoredBlocks(
            index,
            split=split,
            feature_layers=plan.feature_layers,
            block_length=config.block_length,
            sequences_per_batch=max(1, batch_size // data.anchors_per_sequence),
            anchors_per_sequence=min(data.anchors_per_sequence, batch_size),
            max_sequence_rows=data.max_sequence_rows,
            seed=config.seed,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            require_draft_label=config.objective != "seed",
            teacher_states=config.distill_weight > 0,
        )
        # The dataset yields whole batches; one worker prefetches the next while this one trains.
        workers = min(config.dataloader_num_workers, 1)
        return DataLoader(
            blocks,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_ignore_sigterm if workers else None,
        )

    train_batch = config.per_device_train_batch_size
    val_batch = config.per_device_eval_batch_size or train_batch
    return loader(TRAIN, train_batch, True), loader(VAL, val_batch, False)


def _ignore_sigterm(worker_id: int) -> None:
    # A SIGTERM sent to the whole process tree would kill the loader first, and torch raises its
    # death in the trainer wherever it is, checkpoint writing included; the trainer decides when
    # to stop, and the loader goes when it does.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def stop_on_sigterm(trainer: Trainer) -> Iterator[None]:
    """While training, SIGTERM asks `trainer` to stop after its current step (checkpoint, exit
    75) instead of killing it mid-step with nothing saved."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only
        return

    def request_stop(signum: int, frame: Any) -> None:
        trainer.stop_signal = signum

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class TrainResult:
    final_dir: Path
    run_id: str | None
    tracking_uri: str
    steps: int
    losses: dict[int, float]  # step -> mean loss over ranks (every step)
    metrics: dict[str, float]  # the last evaluation


class Trainer:
    """setup -> fit (train_step, evaluate, save_checkpoint) -> save_final. One instance per rank."""

    def __init__(self, config: TrainConfig, plan: TrainPlan, accelerator: Any):
        from dmtp.schedules import get_schedule

        self.config = config
        self.plan = plan
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.output_dir = Path(config.output_dir)
        self.schedule = get_schedule(config.scheduler_type, config.kappa)
        self.tracker = Tracker(config, enabled=self.is_main)
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.losses: dict[int, float] = {}
        self.last_eval: dict[str, float] = {}
        self.stop_signal: int | None = None  # set by SIGTERM (stop_on_sigterm)
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote

    # -- setup ---------------------------------------------------------------------------------

    def setup(self, resume_from: Path | None) -> None:
        from transformers import get_scheduler

        config = self.config
        model = build_or_load_head(config, self.plan)
        self.head = model  # the bare head: its LM head is borrowed, never wrapped or synced
        self.mask_token_id = model.config.mask_token_id
        state: dict[str, Any] | None = None
        if resume_from is not None:
            state = checkpoint.read_state(resume_from)
            checkpoint.load_model_weights(model, resume_from)
        self.train_dl, self.val_dl = make_dataloaders(config, self.plan, self.rank, self.world_size)
        micro_per_epoch = len(self.train_dl)
        if micro_per_epoch == 0:
            raise DmtpError(
                f"the training split of {self.plan.store_path} has no batch for rank {self.rank}: "
                "use more data, a smaller --per_device_train_batch_size, or fewer processes"
            )
        self.steps_per_epoch = max(1, micro_per_epoch // config.gradient_accumulation_steps)
        self.total_steps = config.max_steps or math.ceil(
            config.num_train_epochs * self.steps_per_epoch
        )
        # foreach=False: the same per-tensor update on CPU and CUDA, without foreach's peak memory
        optimizer = torch.optim.AdamW(
            parameter_groups(model, config.weight_decay), lr=config.learning_rate, foreach=False
        )
        self.lr_scheduler = get_scheduler(
            {"constant": "constant_with_warmup"}.get(
                config.lr_scheduler_type, config.lr_scheduler_type
            ),
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self.parameter_counts = (
            sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad),
        )  # counted before prepare: ZeRO-3 leaves empty placeholders in the module
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if state is not None:
            self._load_training_state(resume_from, state)
        run_id = state.get("mlflow_run_id") if state else self._unfinished_run_id()
        self.tracker.start(
            config, run_id, self._params(), self._tags(resume_from), self.plan.store_path
        )
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.tracker.run_id:
                (self.output_dir / RUN_ID_FILE).write_text(self.tracker.run_id)
            (self.output_dir / PREEMPTED_FILE).unlink(missing_ok=True)
            total, trainable = self.parameter_counts
            where = (
                f"resuming from {resume_from} at step {self.step}" if resume_from else "starting"
            )
            print(
                f"dmtp train: {where}; {self.world_size} process(es) on {self.accelerator.device} "
                f"({self.accelerator.distributed_type.name}, {self.accelerator.mixed_precision}), "
                f"head {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable), "
                f"{self.total_steps} steps ({self.steps_per_epoch} per epoch); MLflow "
                f"{self.tracker.tracking_uri} run {self.tracker.run_id}",
                file=sys.stderr,
                flush=True,
            )

    def _unfinished_run_id(self) -> str | None:
        """The MLflow run of a training killed before it wrote a checkpoint, when resuming: one
        run per training, whenever it was killed."""
        path = self.output_dir / RUN_ID_FILE
        if self.config.resume_from_checkpoint and self.is_main and path.is_file():
            return path.read_text().strip() or None
        return None

    def _params(self) -> dict[str, Any]:
        resolved = {
            **flatten_params(to_dict(self.config)),
            "resolved.hidden_size": self.plan.hidden_size,
            "resolved.vocab_size": self.plan.vocab_size,
            "resolved.mask_token_id": self.plan.mask_token_id,
            "resolved.base_model_path": self.plan.base_model_path,
            "resolved.store_path": str(self.plan.store_path),
            "resolved.store_rows": self.plan.store_rows,
            "resolved.world_size": self.world_size,
            "resolved.total_steps": self.total_steps,
            "resolved.steps_per_epoch": self.steps_per_epoch,
            "resolved.global_batch_size": self.config.per_device_train_batch_size
            * self.world_size
            * self.config.gradient_accumulation_steps,
            "resolved.parameters": self.parameter_counts[0],
            "resolved.trainable_parameters": self.parameter_counts[1],
            "resolved.mixed_precision": str(self.accelerator.mixed_precision),
            "resolved.distributed_type": str(self.accelerator.distributed_type),
        }
        return resolved

    def _tags(self, resume_from: Path | None) -> dict[str, str]:
        import dmtp

        identity = self.plan.base_model_identity or {}
        tags = {
            "dmtp.version": getattr(dmtp, "__version__", "unknown"),
            "dmtp.stage": "train",
            "dmtp.store": str(self.plan.store_path),
            "dmtp.base_model": str(identity.get("name_or_path", "")),
            "dmtp.base_model_fingerprint": str(identity.get("fingerprint", "")),
        }
        if resume_from is not None:
            tags[f"dmtp.resumed_at_step_{self.step}"] = str(resume_from)
        return tags

    def _registered_model(self) -> str | None:
        """--mlflow_registered_model, else `dmtp-<base model>`; `none`: do not register."""
        chosen = self.config.mlflow_registered_model
        if chosen is not None:
            return None if chosen.lower() == "none" else chosen
        identity = self.plan.base_model_identity or {}
        return registered_model_name(identity.get("name_or_path") or self.plan.base_model_path)

    def _model_tags(self) -> dict[str, str]:
        """What a registered head version says about itself (evaluation adds τ and speedup)."""
        identity = self.plan.base_model_identity or {}
        tags = {
            "base_model": str(identity.get("name_or_path") or self.plan.base_model_path or ""),
            "base_model_fingerprint": str(identity.get("fingerprint", "")),
            "block_length": str(self.config.block_length),
            "feature_layers": ",".join(map(str, self.plan.feature_layers)),
            "store": str(self.plan.store_path),
            "steps": str(self.step),
        }
        if "val/tau" in self.last_eval:
            tags["val_tau"] = f"{self.last_eval['val/tau']:.4f}"
        return tags

    # -- the loop ------------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from the current data position onwards, epoch after epoch.

        On resume the epoch's first `batches_in_epoch` batches are read and dropped: the order is a
        function of (seed, epoch), so what follows is exactly what the killed run would have seen.
        """
        while True:
            for owner in (self.train_dl, getattr(self.train_dl, "dataset", None)):
                if hasattr(owner, "set_epoch"):
                    owner.set_epoch(self.epoch)
                    break
            skip = self.batches_in_epoch
            for index, batch in enumerate(self.train_dl):
                if index < skip:
                    continue
                self.batches_in_epoch = index + 1
                yield batch
            self.epoch += 1
            self.batches_in_epoch = 0

    def _to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {
            k: v.to(self.accelerator.device)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches -> (mean loss over ranks, grad norm)."""
        config, accelerator = self.config, self.accelerator
        self.model.train()
        total = torch.zeros((), device=accelerator.device)
        for micro, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            with accelerator.accumulate(self.model):
                loss = self._loss(batch, noise_generator(config.seed, self.rank, self.step, micro))
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    parameters = [p for p in self.model.parameters() if p.requires_grad]
                    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(parameters, max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        self.lr_scheduler.step()
        self.step += 1
        mean_loss = accelerator.reduce(total / len(micro_batches), reduction="mean").item()
        if grad_norm is None and getattr(self.model, "get_global_grad_norm", None):  # DeepSpeed
            grad_norm = self.model.get_global_grad_norm()
        return mean_loss, float(grad_norm) if grad_norm is not None else float("nan")

    def _loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        config = self.config
        return diffusion_loss(
            self.model,
            self.head,
            batch,
            schedule=self.schedule,
            loss_weight_type=config.loss_weight_type,
            time_epsilon=config.time_epsilon,
            mask_token_id=self.mask_token_id,
            objective=config.objective,
            position_decay=config.position_decay,
            generator=generator,
            distill_weight=config.distill_weight,
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (fixed noise) and greedy draft metrics on up to max_eval_examples examples."""
        config = self.config
        self.model.eval()
        per_rank = math.ceil(config.max_eval_examples / self.world_size)
        batch_size = config.per_device_eval_batch_size or config.per_device_train_batch_size
        n_batches = min(len(self.val_dl), math.ceil(per_rank / batch_size)) if per_rank else 0
        if self.world_size > 1 and torch.distributed.is_initialized():
            # The same number of forwards on every rank: ZeRO-3 gathers parameters collectively.
            agreed = torch.tensor([n_batches], device=self.accelerator.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            n_batches = int(agreed.item())
        sums = {
            "loss_sum": torch.zeros(1, dtype=torch.float64),
            "loss_count": torch.zeros(1, dtype=torch.float64),
        }
        counts: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(self.val_dl):
            if index >= n_batches:
                break
            batch = self._to_device(batch)
            blocks = count_blocks(batch)
            loss = self._loss(
                batch, noise_generator(config.seed, self.rank, EVAL_NOISE_STEP, index)
            )
            sums["loss_sum"] += loss.double().cpu() * blocks
            sums["loss_count"] += blocks
            for key, value in draft_counts(
                self.model, self.head, batch, self.mask_token_id
            ).items():
                counts[key] = counts.get(key, 0) + value.cpu()
        if not counts:  # this rank had no validation data: contribute zeros of the right shape
            length = self.config.block_length
            counts = {
                "correct": torch.zeros(length, dtype=torch.float64),
                "valid": torch.zeros(length, dtype=torch.float64),
                "tau_sum": torch.zeros(1, dtype=torch.float64),
                "tau_count": torch.zeros(1, dtype=torch.float64),
            }
        totals = {
            k: self.accelerator.reduce(v.to(self.accelerator.device), "sum").cpu()
            for k, v in {**sums, **counts}.items()
        }
        metrics = summarize_draft_counts(totals)
        if totals["loss_count"].item():
            metrics["val/loss"] = totals["loss_sum"].item() / totals["loss_count"].item()
        self.last_eval = metrics
        return metrics

    def check_replicas(self) -> None:
        """All-gather a weight checksum; every rank must hold the same trainable weights."""
        model = self.accelerator.unwrap_model(self.model)
        flat = torch.cat(
            [p.detach().double().flatten() for p in model.parameters() if p.requires_grad]
        )
        weights = (
            torch.arange(1, flat.numel() + 1, dtype=torch.float64) % 1013 + 1
        )  # order-sensitive
        fingerprint = torch.stack(
            [flat.sum(), (flat.cpu() * weights).sum().to(flat.device)]
        ).reshape(1, 2)
        gathered = self.accelerator.gather(fingerprint.to(self.accelerator.device)).cpu()
        if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
            raise DmtpError(f"step {self.step}: ranks hold different weights: {gathered.tolist()}")
        if self.is_main:
            print(
                f"dmtp train: step {self.step}: weights identical on {self.world_size} ranks "
                f"(checksum {gathered[0, 1].item():.17g})",
                file=sys.stderr,
                flush=True,
            )

    def fit(self) -> TrainResult:
        config = self.config
        batches = self._batches()
        # Throughput counts data + step time only, not evaluation or checkpoint writing.
        window_seconds, window_examples, window_losses = 0.0, 0, []
        progress = None
        if self.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step")
        while self.step < self.total_steps:
            started = time.perf_counter()
            micro = [next(batches) for _ in range(config.gradient_accumulation_steps)]
            loss, grad_norm = self.train_step(micro)  # ends in a host sync (the loss value)
            window_seconds += time.perf_counter() - started
            self.losses[self.step] = loss
            window_losses.append(loss)
            # ranks hold equal shares (even_ranks), so this rank's count x world size is the total
            window_examples += sum(count_blocks(b) for b in micro) * self.world_size
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
            if config.check_replicas_steps and self.step % config.check_replicas_steps == 0:
                self.check_replicas()
            if self.step % config.logging_steps == 0 or self.step == self.total_steps:
                metrics = {
                    "train/loss": sum(window_losses) / len(window_losses),
                    "train/learning_rate": self.lr_scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm,
                    "train/examples_per_second": window_examples / window_seconds,
                    "train/epoch": self.epoch + self.batches_in_epoch / max(1, len(self.train_dl)),
                }
                self._log(metrics)
                window_seconds, window_examples, window_losses = 0.0, 0, []
            is_save = self.step % config.save_steps == 0 and self.step < self.total_steps
            eval_every = config.eval_steps
            if (
                (eval_every and self.step % eval_every == 0)
                or (not eval_every and is_save)
                or self.step == self.total_steps
            ):
                self._log(self.evaluate())
            if is_save:
                self.save_checkpoint()
            if self._stop_requested():
                if self.saved_step != self.step:
                    self.save_checkpoint()
                saved = self.output_dir / f"{checkpoint.CHECKPOINT_PREFIX}{self.step}"
                if self.is_main:
                    record = {"step": self.step, "checkpoint": str(saved), "time": time.time()}
                    (self.output_dir / PREEMPTED_FILE).write_text(json.dumps(record))
                raise Preempted(
                    f"SIGTERM at step {self.step}/{self.total_steps}: saved {saved}; rerun "
                    "with --resume_from_checkpoint auto to go on from there"
                )
            if os.environ.get(KILL_AT_STEP_ENV) == str(self.step):
                os.kill(os.getpid(), signal.SIGKILL)
        if progress is not None:
            progress.close()
        final_dir = self.save_final()
        return TrainResult(
            final_dir,
            self.tracker.run_id,
            self.tracker.tracking_uri,
            self.step,
            self.losses,
            self.last_eval,
        )

    def _stop_requested(self) -> bool:
        """Whether SIGTERM reached any rank. It reaches ranks at different moments, and all must
        save the same step, so they agree every step (one tiny all-reduce under DDP)."""
        if self.world_size == 1:
            return self.stop_signal is not None
        flag = torch.tensor(
            [0.0 if self.stop_signal is None else 1.0], device=self.accelerator.device
        )
        return self.accelerator.reduce(flag, "sum").item() > 0

    def _log(self, metrics: dict[str, float]) -> None:
        if not self.is_main or not metrics:
            return
        self.tracker.log_metrics(metrics, self.step)
        with open(self.output_dir / LOG_FILE, "a") as handle:
            handle.write(json.dumps({"step": self.step, **metrics}) + "\n")
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(
            f"dmtp train: step {self.step}/{self.total_steps} {text}", file=sys.stderr, flush=True
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def _save_model(self, folder: Path) -> None:
        """Write a loadable head folder (safetensors) from rank 0; gathers ZeRO-3 shards on all ranks."""
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.is_main:
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)

    def save_checkpoint(self) -> Path:
        """`<output_dir>/checkpoint-<step>/`, written under a temporary name and renamed when
        complete. A full disk removes the partial folder and raises DiskFull (on the rank that hit
        it; torchrun then stops the others)."""
        tmp, final = checkpoint.staging_dir(self.output_dir, self.step)
        previous = checkpoint.list_checkpoints(self.output_dir) if self.is_main else []
        try:
            self._write_checkpoint(tmp, final)
        except Exception as error:
            if not checkpoint.is_disk_full(error):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            # the last checkpoint's size, else fp32 weights + two AdamW moments
            needed = (
                checkpoint.checkpoint_bytes(previous[-1])
                if previous
                else 12 * self.parameter_counts[1]
            )
            raise checkpoint.disk_full(final, needed, error) from error
        self.saved_step = self.step
        return final

    def _write_checkpoint(self, tmp: Path, final: Path) -> None:
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._save_model(tmp)
        deepspeed = self.accelerator.distributed_type.name == "DEEPSPEED"
        if self.is_main or deepspeed:
            checkpoint.save_state_dict(
                self.optimizer.state_dict(), checkpoint.optimizer_path(tmp, self.rank, deepspeed)
            )
        checkpoint.save_rng_state(tmp, self.rank)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch,
                "total_steps": self.total_steps,
                "world_size": self.world_size,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "mlflow_run_id": self.tracker.run_id,
                "mlflow_tracking_uri": self.tracker.tracking_uri,
                "losses": {str(k): v for k, v in sorted(self.losses.items())},
                "config": to_dict(self.config),
            }
            checkpoint.commit_checkpoint(tmp, final, state)
            checkpoint.prune_checkpoints(self.output_dir, self.config.save_total_limit)
            if self.config.mlflow_log_checkpoints:
                self.tracker.log_artifacts(final, f"checkpoints/{final.name}")
        self.accelerator.wait_for_everyone()

    def _load_training_state(self, folder: Path, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise DmtpError(
                f"{folder} was written by {state['world_size']} processes, this run has {self.world_size}: "
                "resume with the same --nproc_per_node so the data order and loss curve continue"
            )
        deepspeed = self.accelerator.distributed_type.name == "DEEPSPEED"
        optimizer_state = checkpoint.load_state_dict(
            checkpoint.optimizer_path(folder, self.rank, deepspeed)
        )
        if deepspeed:
            # ZeRO wants the list of all ranks' states but reads only its own (non-elastic), and
            # should rebuild its fp32 master weights from the saved fp32 partition, not from the
            # 16-bit model weights.
            self.optimizer.optimizer.load_state_dict(
                [optimizer_state] * self.world_size, load_from_fp32_weights=True
            )
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.losses = {int(k): v for k, v in state.get("losses", {}).items()}
        checkpoint.load_rng_state(folder, self.rank)

    def save_final(self) -> Path:
        final_dir = self.output_dir / FINAL_DIRNAME
        if self.is_main:
            shutil.rmtree(final_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            self._save_model(final_dir)
        except Exception as error:
            if not checkpoint.is_disk_full(error):
                raise
            # no half-written head that looks finished (the checkpoints stay: resume from them)
            shutil.rmtree(final_dir, ignore_errors=True)
            raise checkpoint.disk_full(final_dir, 4 * self.parameter_counts[1], error) from error
        if self.is_main:
            # Only the final head is uploaded (checkpoints with --mlflow_log_checkpoints).
            model = self.tracker.log_head(
                final_dir, self.step, self._registered_model(), self._model_tags()
            )
            summary = {
                "step": self.step,
                "mlflow_run_id": self.tracker.run_id,
                "mlflow_tracking_uri": self.tracker.tracking_uri if self.tracker.run_id else None,
                **model,
                "metrics": self.last_eval,
            }
            (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
            self.tracker.finish()
        self.accelerator.wait_for_everyone()
        return final_dir


# ----------------------------------------------------------------------------------------------
# entry points


def _agree_on_validation(config: TrainConfig, plan: TrainPlan, accelerator: Any) -> None:
    """Rank 0 validates the store; every rank stops if it failed (nobody hangs in a collective)."""
    message = ""
    if accelerator.is_main_process:
        try:
            validate_before_training(config, plan)
        except DmtpError as error:
            message = str(error)
    failed = torch.tensor([1.0 if message else 0.0], device=accelerator.device)
    failed = accelerator.reduce(failed, "sum") if accelerator.num_processes > 1 else failed
    if message:
        raise StoreError(message)
    if failed.item():
        raise StoreError(f"{plan.store_path} fails validation (see rank 0's message)")


def train(config: TrainConfig) -> TrainResult:
    """Check, train and save; returns where the head is and the MLflow run."""
    from accelerate.utils import set_seed
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-file save/load bars would drown the log
    plan = plan_training(config)  # cheap checks on every rank, before any process group exists
    resume_from = checkpoint.resolve_resume_path(config.resume_from_checkpoint, config.output_dir)
    accelerator = make_accelerator(config)
    try:
        _agree_on_validation(config, plan, accelerator)
        set_seed(config.seed)
        trainer = Trainer(config, plan, accelerator)
        try:
            with stop_on_sigterm(trainer):
                trainer.setup(resume_from)
                result = trainer.fit()
        except BaseException as error:
            # also hands back MLflow's global URI; a preempted run is continued by its resume
            trainer.tracker.finish(status="KILLED" if isinstance(error, Preempted) else "FAILED")
            raise
    finally:
        accelerator.end_training()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dmtp.cli import add_config_arguments

    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from dmtp.cli import config_from_args

    config = config_from_args(TrainConfig, args)
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = train(config)
    except Preempted:
        if rank == 0:
            raise  # one line, from rank 0
        return Preempted.exit_code
    if rank == 0:
        print(f"head: {result.final_dir}")
        print(f"mlflow run: {result.run_id} ({result.tracking_uri})")
        print(f"browse: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    from dmtp.cli import run_command

    with contextlib.suppress(BrokenPipeError):
        sys.exit(run_command("train", sys.argv[1:]))
