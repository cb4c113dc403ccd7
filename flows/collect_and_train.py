"""The `collect-and-train` flow: collect -> validate -> train -> evaluate -> export, cached and
retryable, with the results published as Prefect artifacts.

    python -m flows.demo                                     # the whole job, embedded default
    prefect deploy --all && prefect deployment run collect-and-train/gpu   # on the gpu-pool workers

Every stage is a task that launches a dmtp entry point as a child process (DESIGN §6). A rerun with
the same inputs finds each stage's manifest under the data root and redoes nothing; a changed
training setting retrains on the cached store; a failed task is retried by Prefect, an interrupted
shard resumes from its committed rows. The flows' settings are generated from the dmtp config
classes (flows/parameters.py): their types, choices and defaults are the classes' own, so the
Prefect UI's run form offers each choice in a dropdown and shows each default.

Also here: `collect` (collect and validate only) and `train` (train and evaluate on an existing
store).

Environment (a deployment's job variables, or the shell of a local run):
    DMTP_DATA_ROOT            default data root (stores, heads, logs, cached manifests)
    MLFLOW_TRACKING_URI       default tracking store (else <data root>/mlflow.db)
    CUDA_VISIBLE_DEVICES      the GPUs a run may use
    DMTP_RETRY_DELAY_SECONDS  e.g. "1" or "5,30": replaces every task's backoff (tests, drills)
    DMTP_FAIL_ONCE            e.g. "train_head": that task fails its first attempt (retry drills)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from dmtp.config import (
    CollectConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    StoreLayout,
    TrainConfig,
)
from flows.parameters import settings, stage_settings, with_settings
from tasks.collect import collect_config, collect_shard, model_name, plan_collection
from tasks.evaluate import eval_config, evaluate_head
from tasks.export import export_head
from tasks.launch import visible_gpus
from tasks.manifests import (
    CollectionPlan,
    EvaluationManifest,
    ExportManifest,
    HeadManifest,
    ShardManifest,
    StoreManifest,
)
from tasks.publish import artifact_key_base, publish_results
from tasks.train import train_config, train_head
from tasks.validate import StoreInvalid, plan_existing_store, validate_store

DATA_ROOT_ENV = "DMTP_DATA_ROOT"
DEFAULT_DATA_ROOT = "runs"  # relative to the working directory: the checkout, for a worker
RETRY_DELAY_ENV = "DMTP_RETRY_DELAY_SECONDS"  # e.g. "1" in tests: shorter backoff, same retries


# The settings each flow exposes, by config field. A parameter of no stage (base model, prompts,
# shard count, tracking store) is the flow's own to pass on; the rest go to their stages' configs.
COLLECTION = [
    *settings(CollectConfig, "base_model_path", "input_data_path", "num_shards"),
    *settings(
        CollectConfig,
        "max_new_tokens", "batch_size", "max_samples", "sample_size", "stride", "temperature",
        "dtype", "prompts_per_shard", "feature_layers",
        stages=["collect"],
        collect_seed="seed",
    ),
    *settings(StoreLayout, "chunk_rows", "rows_per_file", "compressor", stages=["collect"]),
]  # fmt: skip
TRAINING = [
    *settings(DataConfig, "block_length", "loss_on", "train_ratio", stages=["train"]),
    *settings(
        TrainConfig,
        "num_hidden_layers", "per_device_train_batch_size", "num_train_epochs", "max_steps",
        "learning_rate", "warmup_steps", "scheduler_type", "loss_weight_type", "logging_steps",
        "save_steps", "experiment_name", "deepspeed",
        stages=["train"],
        train_seed="seed",
    ),
    *settings(TrainConfig, "mlflow_tracking_uri"),
]  # fmt: skip
EVALUATION = settings(
    EvalConfig,
    "denoising_steps",
    stages=["evaluate"],
    eval_input_data_path="input_data_path",
    eval_max_new_tokens="max_new_tokens",
    eval_max_prompts="max_prompts",
)
# One device for every stage: collection's rules admit cuda:N, training's (torchrun) do not, so
# collect-and-train checks a device against both before any task starts.
COLLECT_AND_TRAIN = [
    *COLLECTION,
    *TRAINING,
    *EVALUATION,
    *settings(CollectConfig, "device", stages=["collect", "train", "evaluate"]),
]
COLLECT = [*COLLECTION, *settings(CollectConfig, "device", stages=["collect"])]
TRAIN = [*TRAINING, *EVALUATION, *settings(TrainConfig, "device", stages=["train", "evaluate"])]


# ----------------------------------------------------------------------------------------------
# helpers shared by the flows


def resolve_data_root(data_root: str | None) -> Path:
    """The parameter, else $DMTP_DATA_ROOT (a deployment's job variable), else ./runs; absolute."""
    chosen = data_root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(chosen).expanduser().resolve()


def resolve_tracking_uri(mlflow_tracking_uri: str | None, root: Path) -> str:
    """The parameter, else $MLFLOW_TRACKING_URI, else a SQLite store in the data root."""
    from dmtp.tracking import resolve_tracking_uri as resolve

    return str(resolve(mlflow_tracking_uri, root))


def check_settings(
    *,
    collect_settings: dict[str, Any] | None = None,
    num_shards: int = 1,
    train_settings: dict[str, Any] | None = None,
    eval_settings: dict[str, Any] | None = None,
) -> None:
    """Build each stage's config from a flow's settings, as its task will later.

    A bad setting (a misspelt choice, a value out of range, a device torchrun cannot use) fails the
    flow run here with the config's own one-line DmtpError, before any task starts: not after
    hours of collection.
    """
    if collect_settings is not None:
        collect_config(None, None, collect_settings, num_shards)
    if train_settings is not None:
        train_config(train_settings)
    if eval_settings is not None:
        # The head does not exist until this run trains it: a stand-in path lets the rest be checked.
        eval_config(eval_settings, head_path="(the head this run trains)")


def configured(task: Any, root: Path, refresh_cache: bool) -> Any:
    """`task` with its manifests stored under the data root, where every worker reads them."""
    options: dict[str, Any] = {"result_storage": root / "results"}
    if refresh_cache:
        options["refresh_cache"] = True
    if os.environ.get(RETRY_DELAY_ENV):
        options["retry_delay_seconds"] = [float(s) for s in os.environ[RETRY_DELAY_ENV].split(",")]
    return task.with_options(**options)


def _cached(state: Any) -> bool:
    return state.name == "Cached"


def collect_store(
    plan: CollectionPlan,
    root: Path,
    *,
    gpus: list[str],
    max_parallel_shards: int | None,
    refresh_cache: bool,
    stall_timeout_s: float,
) -> tuple[StoreManifest, dict[str, bool], list[dict[str, Any]]]:
    """Collect every shard (waves of at most `max_parallel_shards`), then validate the store.

    When validation fails on shards that came from the cache, those shards are collected again
    from scratch, once; any other validation failure stops the flow here, before training.
    Returns the store's manifest, per stage whether it was served from the cache, and per shard
    its rows and where an interrupted attempt left it.
    """
    logger = get_run_logger()
    collect = configured(collect_shard, root, refresh_cache)
    parallel = max_parallel_shards or max(1, len(gpus))
    shards: dict[int, ShardManifest] = {}
    cached: dict[int, bool] = {}
    for start in range(0, plan.num_shards, parallel):
        wave = list(range(start, min(plan.num_shards, start + parallel)))
        futures = [
            collect.submit(
                plan,
                k,
                gpu=gpus[slot % len(gpus)] if gpus else None,
                stall_timeout_s=stall_timeout_s,
            )
            for slot, k in enumerate(wave)
        ]
        for k, future in zip(wave, futures, strict=True):
            shards[k] = future.result()
            cached[k] = _cached(future.state)
    manifests = [shards[k] for k in range(plan.num_shards)]

    validate = configured(validate_store, root, refresh_cache)
    state = validate(plan, manifests, stall_timeout_s=stall_timeout_s, return_state=True)
    if state.is_failed():
        error = state.result(raise_on_failure=False)
        repairable = [k for k in getattr(error, "bad_shards", []) if cached.get(k)]
        if not isinstance(error, StoreInvalid) or not repairable:
            raise error if isinstance(error, BaseException) else RuntimeError(state.message)
        logger.warning(
            "cached shard(s) %s fail validation (%s); collecting them again", repairable, error
        )
        rebuild = collect.with_options(refresh_cache=True)
        for k in repairable:
            shards[k] = rebuild(plan, k, gpu=gpus[0] if gpus else None, rebuild=True)
            cached[k] = False
        manifests = [shards[k] for k in range(plan.num_shards)]
        state = validate(plan, manifests, stall_timeout_s=stall_timeout_s, return_state=True)
    store: StoreManifest = state.result()  # raises StoreInvalid: the flow stops before training
    shard_facts = [
        {"shard": k, "rows": m.rows, "resumed_from_rows": m.resumed_from_rows, "cached": cached[k]}
        for k, m in sorted(shards.items())
    ]
    return store, {"collect": all(cached.values()), "validate": _cached(state)}, shard_facts


def train_and_evaluate(
    store: StoreManifest,
    root: Path,
    *,
    train_settings: dict[str, Any],
    eval_settings: dict[str, Any] | None,
    tracking_uri: str,
    gpus: list[str],
    nproc_per_node: int | None,
    refresh_cache: bool,
    stall_timeout_s: float,
) -> tuple[HeadManifest, Any, dict[str, bool]]:
    """Train a head on `store` with one rank per GPU (one on CPU), then evaluate it if asked."""
    nproc = nproc_per_node or max(1, len(gpus))
    train = configured(train_head, root, refresh_cache)
    state = train(
        store,
        train_settings,
        str(root),
        tracking_uri,
        nproc_per_node=nproc,
        gpus=gpus[:nproc] if gpus else None,
        stall_timeout_s=stall_timeout_s,
        return_state=True,
    )
    head: HeadManifest = state.result()
    cached = {"train": _cached(state)}
    evaluation = None
    if eval_settings is not None:
        evaluate = configured(evaluate_head, root, refresh_cache)
        eval_state = evaluate(
            head,
            store,
            eval_settings,
            gpu=gpus[0] if gpus else None,
            stall_timeout_s=stall_timeout_s,
            return_state=True,
        )
        evaluation = eval_state.result()
        cached["evaluate"] = _cached(eval_state)
    return head, evaluation, cached


def export_and_publish(
    store: StoreManifest,
    head: HeadManifest,
    evaluation: EvaluationManifest | None,
    root: Path,
    *,
    export: bool,
    key: str,
    refresh_cache: bool,
    stall_timeout_s: float,
) -> tuple[dict[str, Any], dict[str, bool]]:
    """Export the head in the DFlash layout (if asked) and publish this run's results as Prefect
    artifacts; returns what the summary reports of both, and whether the export was cached."""
    logger = get_run_logger()
    exported: ExportManifest | None = None
    cached: dict[str, bool] = {}
    if export:
        chosen = {s.field: s.default for s in settings(ExportConfig, "format", "dtype")}
        task = configured(export_head, root, refresh_cache)
        state = task(
            head, store, evaluation, chosen, stall_timeout_s=stall_timeout_s, return_state=True
        )
        exported = state.result()
        cached["export"] = _cached(state)
    artifacts = publish_results(key, store.model.name, head, evaluation, exported)
    facts: dict[str, Any] = {"artifacts": artifacts}
    if exported is not None:
        facts["export"] = exported.output_dir if exported.exported else None
        facts["export_refused"] = exported.reason
        facts["serving_caveats"] = exported.serving_caveats
        logger.info(
            "DFlash export: %s",
            exported.output_dir if exported.exported else f"none ({exported.reason})",
        )
    return facts, cached


def _artifact_key(flow_name: str, override: str | None) -> str:
    from prefect.runtime import deployment

    return artifact_key_base(flow_name, deployment.name, override)


def summarize(
    store: StoreManifest,
    head: HeadManifest | None,
    evaluation: Any,
    cached: dict[str, bool],
    shards: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What a flow returns and logs last: where everything is and the figures that matter."""
    summary: dict[str, Any] = {
        "model": store.model.name,
        "store": store.store_path,
        "store_rows": store.rows,
        "store_sequences": store.sequences,
        "cached": cached,
        "shards": shards or [],
    }
    if head is not None:
        summary.update(
            head=head.head_path,
            mlflow_tracking_uri=head.mlflow_tracking_uri,
            mlflow_run_id=head.mlflow_run_id,
            mlflow_experiment=head.mlflow_experiment,
            registered_model_name=head.registered_model_name,
            registered_model_version=head.registered_model_version,
            metrics=head.metrics,
        )
    if evaluation is not None:
        summary.update(
            evaluation=evaluation.report_path,
            acceptance_length=evaluation.acceptance_length,
            speedup=evaluation.speedup,
            prompt_lookup_acceptance_length=evaluation.prompt_lookup_acceptance_length,
            drafters=evaluation.summary,
        )
    return summary


def headline(summary: dict[str, Any]) -> str:
    parts = [f"{summary['model']}: store {summary['store_rows']:,} rows"]
    if summary.get("acceptance_length") is not None:
        parts.append(
            f"head τ={summary['acceptance_length']:.2f} speedup {summary['speedup']:.2f}x"
            + (
                f" (prompt lookup τ={summary['prompt_lookup_acceptance_length']:.2f})"
                if summary.get("prompt_lookup_acceptance_length") is not None
                else ""
            )
        )
    if summary.get("mlflow_run_id"):
        parts.append(f"MLflow run {summary['mlflow_run_id']} at {summary['mlflow_tracking_uri']}")
    if summary.get("registered_model_version"):
        parts.append(
            f"registered model {summary['registered_model_name']} "
            f"version {summary['registered_model_version']}"
        )
    cached = [stage for stage, hit in summary["cached"].items() if hit]
    if cached:
        parts.append(f"cached: {', '.join(cached)}")
    return "; ".join(parts)


def _run_name(flow_name: str) -> str:
    parameters = flow_run.parameters
    if "train_data_dir" in parameters:
        return f"{flow_name} on {Path(parameters['train_data_dir']).name}"
    shards = parameters.get("num_shards", 1)
    model = model_name(parameters.get("base_model_path"))
    return f"{flow_name} {model} x{shards} shard{'s' * (shards > 1)}"


# ----------------------------------------------------------------------------------------------
# flows
#
# validate_parameters=False: the stages' configs check every setting (check_settings, first thing
# in each flow), with the same one-line error as the CLI. Prefect's own check would answer a bad
# choice or bound first, with pydantic's multi-line message. A deployment's run form and
# `prefect deployment run` are checked against the parameter schema by the server, before a run
# exists.


@flow(
    name="collect-and-train",
    flow_run_name=lambda: _run_name("collect-and-train"),
    persist_result=False,  # the summary is logged and returned; nothing of it needs pickling
    validate_parameters=False,
)
@with_settings(COLLECT_AND_TRAIN)
def collect_and_train(
    data_root: str | None = None,
    train_options: dict[str, Any] | None = None,
    nproc_per_node: int | None = None,
    evaluate: bool = True,
    export: bool = True,
    artifact_key: str | None = None,
    refresh_cache: bool = False,
    max_parallel_shards: int | None = None,
    stall_timeout_minutes: float = 60.0,
    **values: Any,
) -> dict[str, Any]:
    """Collect hidden states from a base model, validate them, train a diffusion MTP head on them,
    and evaluate the head by speculative decoding.

    Args:
        data_root: where stores, heads, logs and the stages' cached manifests go (shared by every
            worker); default $DMTP_DATA_ROOT, else ./runs.
        train_options: any other TrainConfig/DataConfig field, e.g. {"kappa": 3.0, "eval_steps": 50}.
        nproc_per_node: training ranks; default one per visible GPU, one on a CPU host.
        evaluate: run speculative decoding with the head (τ, speedup) and attach it to the MLflow
            run.
        export: write the head in z-lab's DFlash layout for SGLang/vLLM, with a model card (a head
            the layout cannot express is reported, not failed).
        artifact_key: base of the Prefect artifact keys (evaluation table, MLflow link); default
            `collect-and-train-<deployment>`, `-local` outside a deployment.
        refresh_cache: redo every stage even where a cached result exists.
        max_parallel_shards: shards collected at once; default one per visible GPU (1 on CPU).
        stall_timeout_minutes: kill and retry a stage that printed nothing and wrote nothing this
            long.
    """
    logger = get_run_logger()
    collect_settings = stage_settings(COLLECT_AND_TRAIN, values, "collect")
    train_settings = {**stage_settings(COLLECT_AND_TRAIN, values, "train"), **(train_options or {})}
    eval_settings = stage_settings(COLLECT_AND_TRAIN, values, "evaluate") if evaluate else None
    num_shards = values["num_shards"]
    check_settings(
        collect_settings=collect_settings,
        num_shards=num_shards,
        train_settings=train_settings,
        eval_settings=eval_settings,
    )
    root = resolve_data_root(data_root)
    tracking_uri = resolve_tracking_uri(values["mlflow_tracking_uri"], root)
    gpus = visible_gpus()
    logger.info("data root %s, MLflow %s, GPUs %s", root, tracking_uri, gpus or "none (CPU)")
    plan = configured(plan_collection, root, refresh_cache)(
        values["base_model_path"],
        values["input_data_path"],
        collect_settings,
        num_shards,
        str(root),
    )
    stall_s = stall_timeout_minutes * 60
    store, cached, shard_facts = collect_store(
        plan,
        root,
        gpus=gpus,
        max_parallel_shards=max_parallel_shards,
        refresh_cache=refresh_cache,
        stall_timeout_s=stall_s,
    )
    head, evaluation, train_cached = train_and_evaluate(
        store,
        root,
        train_settings=train_settings,
        eval_settings=eval_settings,
        tracking_uri=tracking_uri,
        gpus=gpus,
        nproc_per_node=nproc_per_node,
        refresh_cache=refresh_cache,
        stall_timeout_s=stall_s,
    )
    facts, export_cached = export_and_publish(
        store,
        head,
        evaluation,
        root,
        export=export,
        key=_artifact_key("collect-and-train", artifact_key),
        refresh_cache=refresh_cache,
        stall_timeout_s=stall_s,
    )
    cached = {**cached, **train_cached, **export_cached}
    summary = {**summarize(store, head, evaluation, cached, shard_facts), **facts}
    logger.info(headline(summary))
    return summary


@flow(
    name="collect",
    flow_run_name=lambda: _run_name("collect"),
    persist_result=False,
    validate_parameters=False,
)
@with_settings(COLLECT)
def collect(
    data_root: str | None = None,
    refresh_cache: bool = False,
    max_parallel_shards: int | None = None,
    stall_timeout_minutes: float = 60.0,
    **values: Any,
) -> dict[str, Any]:
    """Collect and validate a store (the first half of collect-and-train); returns where it is.

    Args:
        data_root: as collect-and-train's.
        refresh_cache: redo every stage even where a cached result exists.
        max_parallel_shards: shards collected at once; default one per visible GPU (1 on CPU).
        stall_timeout_minutes: kill and retry a stage that printed nothing and wrote nothing this
            long.
    """
    logger = get_run_logger()
    collect_settings = stage_settings(COLLECT, values, "collect")
    num_shards = values["num_shards"]
    check_settings(collect_settings=collect_settings, num_shards=num_shards)
    root = resolve_data_root(data_root)
    gpus = visible_gpus()
    plan = configured(plan_collection, root, refresh_cache)(
        values["base_model_path"],
        values["input_data_path"],
        collect_settings,
        num_shards,
        str(root),
    )
    store, cached, shard_facts = collect_store(
        plan,
        root,
        gpus=gpus,
        max_parallel_shards=max_parallel_shards,
        refresh_cache=refresh_cache,
        stall_timeout_s=stall_timeout_minutes * 60,
    )
    summary = summarize(store, None, None, cached, shard_facts)
    logger.info(headline(summary))
    return summary


@flow(
    name="train",
    flow_run_name=lambda: _run_name("train"),
    persist_result=False,
    validate_parameters=False,
)
@with_settings(TRAIN)
def train(
    train_data_dir: str,
    data_root: str | None = None,
    train_options: dict[str, Any] | None = None,
    nproc_per_node: int | None = None,
    evaluate: bool = True,
    export: bool = True,
    artifact_key: str | None = None,
    refresh_cache: bool = False,
    stall_timeout_minutes: float = 60.0,
    **values: Any,
) -> dict[str, Any]:
    """Validate an existing store (`train_data_dir`), train a head on it, evaluate and export it.

    Parameters as collect-and-train's; artifact keys default to `train-<deployment>`.

    Args:
        train_data_dir: the store (or the output_dir holding it) to train on.
        data_root: as collect-and-train's.
        train_options: any other TrainConfig/DataConfig field, e.g. {"kappa": 3.0, "eval_steps": 50}.
        nproc_per_node: training ranks; default one per visible GPU, one on a CPU host.
        evaluate: run speculative decoding with the head (τ, speedup).
        export: write the head in z-lab's DFlash layout for SGLang/vLLM.
        artifact_key: base of the Prefect artifact keys; default `train-<deployment>`.
        refresh_cache: redo every stage even where a cached result exists.
        stall_timeout_minutes: kill and retry a stage that printed nothing and wrote nothing this
            long.
    """
    logger = get_run_logger()
    train_settings = {**stage_settings(TRAIN, values, "train"), **(train_options or {})}
    eval_settings = stage_settings(TRAIN, values, "evaluate") if evaluate else None
    check_settings(train_settings=train_settings, eval_settings=eval_settings)
    root = resolve_data_root(data_root)
    tracking_uri = resolve_tracking_uri(values["mlflow_tracking_uri"], root)
    gpus = visible_gpus()
    plan = configured(plan_existing_store, root, refresh_cache)(train_data_dir)
    stall_s = stall_timeout_minutes * 60
    validate = configured(validate_store, root, refresh_cache)
    state = validate(plan, [], stall_timeout_s=stall_s, return_state=True)
    store: StoreManifest = state.result()
    head, evaluation, cached = train_and_evaluate(
        store,
        root,
        train_settings=train_settings,
        eval_settings=eval_settings,
        tracking_uri=tracking_uri,
        gpus=gpus,
        nproc_per_node=nproc_per_node,
        refresh_cache=refresh_cache,
        stall_timeout_s=stall_s,
    )
    facts, export_cached = export_and_publish(
        store,
        head,
        evaluation,
        root,
        export=export,
        key=_artifact_key("train", artifact_key),
        refresh_cache=refresh_cache,
        stall_timeout_s=stall_s,
    )
    cached = {"validate": _cached(state), **cached, **export_cached}
    summary = {**summarize(store, head, evaluation, cached), **facts}
    logger.info(headline(summary))
    return summary
