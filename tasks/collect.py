"""Collection tasks: plan the store, then fill it one shard per task (one writer per shard).

`plan_collection` resolves the base model and the prompts to what identifies them (fingerprint,
sha256) and places the store under the data root by that identity, so a run with other settings
never touches this one's store. `collect_shard` runs `dmtp collect --shard_index k --resume` as a
child process: an interrupted shard continues from its committed rows, a finished one is skipped.
The task holds the shard's lease (`dmtp.lease`) and hands it to that child. A child stopped by
SIGTERM (a preempted host, a stage timeout) commits its finished runs of batches and exits 75
(`dmtp.errors.Preempted`), which `run_stage` raises as the retryable StagePreempted: the retry
resumes from there.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dmtp.lease import Lease, LeaseHeld, acquire, handed_down_env, shard_lease_path
from tasks.caching import OutputCache, digest
from tasks.launch import (
    dmtp_command,
    fail_once_if_requested,
    retry_unless_permanent,
    run_logger,
    run_stage,
)
from tasks.manifests import CollectionPlan, ModelRef, PromptsRef, ShardManifest

RETRY_DELAYS_S = [10, 60, 300]  # a GPU host rebooting or an OOM neighbour: give it minutes


class ShardBusy(RuntimeError):
    """Another live run is writing this shard. Retryable, unlike the `dmtp.lease.LeaseHeld` it
    wraps (a DmtpError, which `retry_unless_permanent` never retries): that run ends, or dies and
    its lease is taken over."""


@contextmanager
def shard_lease(store_path: Path, shard_index: int) -> Iterator[Lease]:
    """Hold shard `shard_index`'s lease (the one `dmtp collect` takes) or raise ShardBusy."""
    try:
        lease = acquire(
            shard_lease_path(store_path, shard_index), f"shard {shard_index} of {store_path}"
        )
    except LeaseHeld as error:
        raise ShardBusy(str(error)) from None
    try:
        yield lease
    finally:
        lease.release()


def slug(text: str) -> str:
    """A folder- and key-safe short name: 'Qwen/Qwen2.5-7B-Instruct' -> 'Qwen2.5-7B-Instruct'."""
    name = text.rstrip("/").split("/")[-1].removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:64] or "model"


def model_name(requested: str | None) -> str:
    from dmtp.models import DEFAULT_MODEL

    return DEFAULT_MODEL.name if not requested else slug(requested)


LAYOUT_FIELDS = ("chunk_rows", "rows_per_file", "compressor")


def collect_config(
    base_model_path: str | None,
    input_data_path: str | None,
    settings: dict[str, Any],
    num_shards: int,
    **fields: Any,
) -> Any:
    """A `dmtp.config.CollectConfig` (checked: raises DmtpError naming a bad value).

    settings: CollectConfig fields that shape the data, with the store layout's fields flattened in.
    """
    from dmtp.config import CollectConfig, StoreLayout

    return CollectConfig(
        base_model_path=base_model_path,
        input_data_path=input_data_path,
        num_shards=num_shards,
        layout=StoreLayout(**{k: v for k, v in settings.items() if k in LAYOUT_FIELDS}),
        **{k: v for k, v in settings.items() if k not in LAYOUT_FIELDS},
        **fields,
    )


@task(
    name="plan_collection",
    cache_policy=NO_CACHE,  # must look at the model and prompts every run (see the docstring)
    persist_result=False,
    task_run_name=lambda: f"plan {model_name(_parameter('base_model_path'))}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_permanent,
)
def plan_collection(
    base_model_path: str | None,
    input_data_path: str | None,
    settings: dict[str, Any],
    num_shards: int,
    data_root: str,
) -> CollectionPlan:
    """Identify model and prompts, check the settings, and choose the store's folder.

    Not cached: its output is what the other stages' cache keys are made of, so it must look at the
    model and the prompts every time (cheap: a config, 1 MiB of weights, one pass over the file).
    """
    import dmtp
    from dmtp.config import STORE_DIRNAME
    from dmtp.models import model_fingerprint, resolve_base_model
    from dmtp.prompts import scan_prompts

    fail_once_if_requested("plan_collection")
    config = collect_config(base_model_path, input_data_path, settings, num_shards)
    resolved = resolve_base_model(config.base_model_path)  # fetches the default model once
    model = ModelRef(
        requested=base_model_path or None,
        name=model_name(base_model_path),
        fingerprint=model_fingerprint(resolved),
    )
    info = scan_prompts(config.prompts_path)
    prompts = PromptsRef(path=str(Path(info.path).resolve()), sha256=info.sha256, count=info.count)
    placement = {
        "model": model.fingerprint,
        "prompts": prompts.sha256,
        "settings": settings,
        # Fixed-size shards (prompts_per_shard): a larger budget is more shards of the same
        # store, so the shard count must not pick the folder.
        "num_shards": None if settings.get("prompts_per_shard") else num_shards,
        "dmtp_version": dmtp.__version__,
    }
    output_dir = Path(data_root) / "stores" / f"{model.name}-{digest(placement)[:12]}"
    plan = CollectionPlan(
        model=model,
        prompts=prompts,
        settings=settings,
        num_shards=num_shards,
        output_dir=str(output_dir),
        store=str(output_dir / STORE_DIRNAME),
        dmtp_version=dmtp.__version__,
    )
    run_logger().info(
        "%s (fingerprint %s), %d prompts (sha256 %s) -> %s in %d shard(s)",
        model.name,
        model.fingerprint[:12],
        prompts.count,
        prompts.sha256[:12],
        plan.store_path,
        num_shards,
    )
    return plan


def _collect_determinants(inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    plan: CollectionPlan = inputs["plan"]
    k = inputs["shard_index"]
    return f"{plan.model.name}-shard{k}", {"plan": plan.identity(), "shard_index": k}


def shard_problem(plan: CollectionPlan, shard_index: int) -> str | None:
    """Why the shard on disk is not the finished output of `plan` (None when it is)."""
    from dmtp.errors import StoreError
    from dmtp.store import ARRAY_NAMES, open_store

    try:
        store = open_store(plan.store_path)
    except StoreError as error:
        return str(error)
    if store.attrs.get("base_model", {}).get("fingerprint") != plan.model.fingerprint:
        return "the store holds another base model's states"
    if store.attrs.get("prompts_sha256") != plan.prompts.sha256:
        return "the store was collected from other prompts"
    if not store.has_shard(shard_index):
        return f"shard {shard_index} is missing"
    shard = store.shard(shard_index)
    if not shard.complete:
        return f"shard {shard_index} is incomplete ({shard.n_committed} rows committed)"
    folder = store.path / "shards" / str(shard_index)
    missing = [name for name in ARRAY_NAMES if not (folder / name / "zarr.json").exists()]
    return f"shard {shard_index} lost its arrays {missing}" if missing else None


def _collect_check(inputs: dict[str, Any]) -> str | None:
    return shard_problem(inputs["plan"], inputs["shard_index"])


def _parameter(name: str) -> Any:
    from prefect.runtime import task_run

    return task_run.parameters.get(name)


def _collect_run_name() -> str:
    from prefect.runtime import task_run

    parameters = task_run.parameters
    plan: CollectionPlan = parameters["plan"]
    return f"collect {plan.model.name} shard {parameters['shard_index']}/{plan.num_shards}"


@task(
    name="collect_shard",
    task_run_name=_collect_run_name,
    retries=3,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=OutputCache(
        stage="collect", determinants=_collect_determinants, check=_collect_check
    ),
    persist_result=True,
    result_serializer="json",
)
def collect_shard(
    plan: CollectionPlan,
    shard_index: int,
    gpu: str | None = None,
    rebuild: bool = False,
    stall_timeout_s: float | None = 3600.0,
    timeout_s: float | None = None,
) -> ShardManifest:
    """Fill shard `shard_index` of the planned store with `dmtp collect ... --resume`.

    gpu: the CUDA device this shard may use (None: leave CUDA_VISIBLE_DEVICES as it is).
    rebuild: delete the shard first (its data failed validation), instead of resuming it.
    """
    from dmtp.config import save_config
    from dmtp.store import open_store

    logger = run_logger()
    fail_once_if_requested("collect_shard")
    store_path = plan.store_path
    shard_dir = store_path / "shards" / str(shard_index)
    with shard_lease(store_path, shard_index) as lease:
        if rebuild and shard_dir.exists():
            logger.warning("deleting shard %d to collect it again: %s", shard_index, shard_dir)
            shutil.rmtree(shard_dir)
        resumed_from = 0
        if (store_path / "zarr.json").exists():
            store = open_store(store_path)
            if store.has_shard(shard_index) and not store.shard(shard_index).complete:
                resumed_from = store.shard(shard_index).n_committed
                logger.info(
                    "shard %d was interrupted at %d committed rows: resuming",
                    shard_index,
                    resumed_from,
                )
        config = collect_config(
            plan.model.requested,
            plan.prompts.path,
            plan.settings,
            plan.num_shards,
            output_dir=plan.output_dir,
            shard_index=shard_index,
            resume=True,
        )
        logs, name = Path(plan.output_dir) / "logs", f"collect-shard{shard_index}"
        config_path = save_config(config, logs / f"{name}-config.json")
        run = run_stage(
            f"collect shard {shard_index}",
            dmtp_command("collect", "--config", str(config_path)),
            log_path=logs / f"{name}.log",
            # The child writes under this task's lease (it would find it held otherwise).
            env={
                **handed_down_env([lease]),
                **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}),
            },
            timeout_s=timeout_s,
            stall_timeout_s=stall_timeout_s,
            activity=[shard_dir],
            logger=logger,
        )
    problem = shard_problem(plan, shard_index)
    if problem:
        raise RuntimeError(f"dmtp collect exited 0 but {problem} ({store_path})")
    shard = open_store(store_path).shard(shard_index)
    return ShardManifest(
        store_path=str(store_path),
        shard_index=shard_index,
        rows=shard.n_committed,
        sequences=shard.n_sequences,
        resumed_from_rows=resumed_from,
        seconds=round(run.seconds, 3),
        log_path=str(run.log_path),
    )
