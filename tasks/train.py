"""Training task: `torchrun -m dmtp.train` as a child process, one rank per GPU this host lends.

The head's folder lives under the data root, named by what determines it (the store's identity, the
training settings, the world size, the dmtp version): a changed setting trains into a new folder and
never disturbs a finished head. A retried attempt resumes from the newest checkpoint of its own
folder (`--resume_from_checkpoint auto`), continuing the same MLflow run. SIGTERM makes the training
save a checkpoint and stop (preemption): that attempt fails as StagePreempted, and Prefect's retry
resumes from the checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task

from tasks.caching import OutputCache, digest
from tasks.launch import (
    StageFailed,
    StagePreempted,
    StageTimedOut,
    fail_once_if_requested,
    retry_unless_permanent,
    run_logger,
    run_stage,
)
from tasks.manifests import HeadManifest, StoreManifest
from tasks.tracking import flow_run_context, mlflow_environment

RETRY_DELAYS_S = [30, 300, 900]
# TrainConfig fields the task sets itself; a flow's training settings may not name them.
TASK_OWNED = (
    "train_data_dir",
    "output_dir",
    "validate_sample",
    "mlflow_tracking_uri",
    "resume_from_checkpoint",
)


def train_config(settings: dict[str, Any], **fields: Any) -> Any:
    """A `dmtp.config.TrainConfig` from flat settings (DataConfig's fields included); checked.

    Raises DmtpError naming an unknown setting or a bad value.
    """
    import dataclasses

    from dmtp.config import DataConfig, TrainConfig
    from dmtp.errors import DmtpError

    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data"}
    owned = sorted(set(settings) & set(TASK_OWNED))
    if owned:
        raise DmtpError(
            f"training setting(s) {owned} are chosen by the flow (store, head folder, tracking)"
        )
    unknown = sorted(set(settings) - data_fields - train_fields)
    if unknown:
        raise DmtpError(
            f"unknown training setting(s) {unknown}: use fields of dmtp.config.TrainConfig or "
            "DataConfig "
            "(`dmtp train --help` lists them)"
        )
    data = DataConfig(**{k: v for k, v in settings.items() if k in data_fields})
    values = {k: v for k, v in settings.items() if k in train_fields}
    return TrainConfig(data=data, **{**values, **fields})


def head_dir(
    store: StoreManifest, settings: dict[str, Any], nproc_per_node: int, data_root: str
) -> Path:
    identity = {
        "store": store.identity_sha256,
        "settings": settings,
        "nproc_per_node": nproc_per_node,
    }
    return Path(data_root) / "heads" / f"{store.model.name}-{digest(identity)[:12]}"


def _train_determinants(inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    store: StoreManifest = inputs["store"]
    return f"{store.model.name}", {
        "store": store.identity_sha256,
        "store_rows": store.rows,
        "settings": inputs["settings"],
        "nproc_per_node": inputs["nproc_per_node"],
        "data_root": inputs["data_root"],
        "mlflow_tracking_uri": inputs["mlflow_tracking_uri"],
    }


def head_problem(output_dir: Path) -> str | None:
    """Why `output_dir` does not hold a finished head (None when it does)."""
    final = output_dir / "final"
    for required in (
        final / "config.json",
        final / "model.safetensors",
        output_dir / "train_summary.json",
    ):
        if not required.exists():
            return f"{required} is missing"
    return None


def preemption_record(output_dir: Path, since: float) -> dict[str, Any] | None:
    """What the training wrote when SIGTERM stopped it after `since` (step, checkpoint), or None."""
    from dmtp.train import PREEMPTED_FILE

    try:
        record = json.loads((output_dir / PREEMPTED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("time", 0) >= since else None


def _train_check(inputs: dict[str, Any]) -> str | None:
    folder = head_dir(
        inputs["store"], inputs["settings"], inputs["nproc_per_node"], inputs["data_root"]
    )
    return head_problem(folder)


def _train_run_name() -> str:
    from prefect.runtime import task_run

    parameters = task_run.parameters
    store: StoreManifest = parameters["store"]
    return f"train head on {store.model.name} ({parameters['nproc_per_node']} proc)"


@task(
    name="train_head",
    task_run_name=_train_run_name,
    retries=2,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=OutputCache(stage="train", determinants=_train_determinants, check=_train_check),
    persist_result=True,
    result_serializer="json",
)
def train_head(
    store: StoreManifest,
    settings: dict[str, Any],
    data_root: str,
    mlflow_tracking_uri: str,
    nproc_per_node: int = 1,
    gpus: list[str] | None = None,
    stall_timeout_s: float | None = 3600.0,
    timeout_s: float | None = None,
) -> HeadManifest:
    """Train a head on the validated store with `nproc_per_node` ranks; return where it is.

    settings: TrainConfig/DataConfig fields (flat); gpus: CUDA ids for the ranks ([]/None: CPU).
    """
    logger = run_logger()
    fail_once_if_requested("train_head")
    output_dir = head_dir(store, settings, nproc_per_node, data_root)
    # The MLflow run is named after the flow run and tagged with it (not part of the cache key).
    flow_run_name, run_tags = flow_run_context()
    naming = {"run_name": flow_run_name} if flow_run_name and not settings.get("run_name") else {}
    config = train_config(
        settings,
        train_data_dir=store.store_path,
        output_dir=str(output_dir),
        validate_sample=0.0,  # validate_store has just checked this very store
        mlflow_tracking_uri=mlflow_tracking_uri,
        resume_from_checkpoint="auto",  # a retried attempt continues its own checkpoints
        **naming,
    )
    from dmtp.config import save_config

    # The child reads the resolved config whole, as this process built and checked it.
    config_path = save_config(config, output_dir / "logs" / "train-config.json")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc_per_node}", "-m", "dmtp.train", "--config", str(config_path),
    ]  # fmt: skip
    env = {
        "MLFLOW_TRACKING_URI": mlflow_tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        **mlflow_environment(run_tags),
    }
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    started = time.time()
    try:
        run = run_stage(
            f"train ({nproc_per_node} proc)",
            command,
            log_path=output_dir / "logs" / "train.log",
            env=env,
            timeout_s=timeout_s,
            stall_timeout_s=stall_timeout_s,
            activity=[output_dir],
            logger=logger,
        )
    except StageFailed as failure:
        preempted = preemption_record(output_dir, since=started)
        if preempted is None or isinstance(failure, StagePreempted | StageTimedOut):
            raise
        # torchrun exits 1 whatever code its ranks exit with: the ranks' record tells
        raise StagePreempted(
            f"train ({nproc_per_node} proc): stopped by SIGTERM at step {preempted['step']}, "
            f"saved {preempted['checkpoint']}; the retry resumes from it",
            returncode=failure.returncode,
            log_path=failure.log_path,
            tail=failure.tail,
        ) from failure
    problem = head_problem(output_dir)
    if problem:
        raise RuntimeError(f"dmtp.train exited 0 but {problem}")
    summary = json.loads((output_dir / "train_summary.json").read_text())
    metrics = {
        k: float(v) for k, v in (summary.get("metrics") or {}).items() if isinstance(v, int | float)
    }
    return HeadManifest(
        head_path=str(output_dir / "final"),
        output_dir=str(output_dir),
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_run_id=summary.get("mlflow_run_id"),
        mlflow_experiment=config.experiment_name,
        mlflow_model_id=summary.get("mlflow_model_id"),
        registered_model_name=summary.get("registered_model_name"),
        registered_model_version=summary.get("registered_model_version"),
        metrics=metrics,
        nproc_per_node=nproc_per_node,
        seconds=round(run.seconds, 3),
        log_path=str(run.log_path),
    )
