"""Evaluation task: `dmtp evaluate` with the trained head as drafter; results join its MLflow
run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task

from tasks.caching import OutputCache, digest, source_digest
from tasks.launch import (
    dmtp_command,
    fail_once_if_requested,
    retry_unless_permanent,
    run_logger,
    run_stage,
)
from tasks.manifests import EvaluationManifest, HeadManifest, StoreManifest
from tasks.tracking import flow_run_context, mlflow_environment

RETRY_DELAYS_S = [10, 60, 300]
# The code that decides an evaluation's figures: a change to it re-measures instead of serving
# figures measured by older code from the cache.
DECODING_MODULES = ("evaluate", "specdec", "kernels", "head", "models")


def eval_config(settings: dict[str, Any], **fields: Any) -> Any:
    """A `dmtp.config.EvalConfig` from flat settings; checked (raises DmtpError)."""
    from dmtp.config import EvalConfig

    return EvalConfig(**{**settings, **fields})


def _prompts_sha256(settings: dict[str, Any]) -> str:
    from dmtp.config import DEMO_EVAL_PROMPTS

    path = Path(settings.get("input_data_path") or DEMO_EVAL_PROMPTS)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def report_path(head: HeadManifest, settings: dict[str, Any]) -> Path:
    return Path(head.output_dir) / "evaluation" / f"{digest(settings)[:12]}.json"


def _evaluate_determinants(inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    head: HeadManifest = inputs["head"]
    store: StoreManifest = inputs["store"]
    return f"{store.model.name}", {
        "head": head.head_path,
        "mlflow_run_id": head.mlflow_run_id,
        "base_model": store.model.fingerprint,
        "settings": inputs["settings"],
        "prompts_sha256": _prompts_sha256(inputs["settings"]),
        "decoding_code": source_digest(*DECODING_MODULES),
    }


def _evaluate_check(inputs: dict[str, Any]) -> str | None:
    path = report_path(inputs["head"], inputs["settings"])
    return None if path.is_file() else f"{path} is missing"


@task(
    name="evaluate_head",
    task_run_name=lambda: f"evaluate head on {_parameter('store').model.name}",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=OutputCache(
        stage="evaluate", determinants=_evaluate_determinants, check=_evaluate_check
    ),
    persist_result=True,
    result_serializer="json",
)
def evaluate_head(
    head: HeadManifest,
    store: StoreManifest,
    settings: dict[str, Any],
    gpu: str | None = None,
    stall_timeout_s: float | None = 3600.0,
    timeout_s: float | None = None,
) -> EvaluationManifest:
    """Speculative decoding with the head against the store's base model: τ, speedup, lossless.

    settings: EvalConfig fields (max_new_tokens, input_data_path, denoising_steps, ...).
    """
    logger = run_logger()
    fail_once_if_requested("evaluate_head")
    output = report_path(head, settings)
    config = eval_config(
        settings,
        base_model_path=store.model.requested,
        head_path=head.head_path,
        output=str(output),
        mlflow_tracking_uri=head.mlflow_tracking_uri,
        mlflow_run_id=head.mlflow_run_id,
    )
    from dmtp.config import save_config

    config_path = save_config(config, Path(head.output_dir) / "logs" / "evaluate-config.json")
    env = mlflow_environment(flow_run_context()[1])  # tags of a new evaluation run, if one is made
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    run = run_stage(
        "evaluate",
        dmtp_command("evaluate", "--config", str(config_path)),
        log_path=Path(head.output_dir) / "logs" / "evaluate.log",
        env=env or None,
        timeout_s=timeout_s,
        stall_timeout_s=stall_timeout_s,
        logger=logger,
    )
    result = json.loads(output.read_text())
    drafters = result.get("drafters", {})
    head_figures = drafters.get("head", {}).get("overall", {})
    lookup_figures = drafters.get("prompt_lookup", {}).get("overall", {})
    return EvaluationManifest(
        report_path=str(output),
        head_path=head.head_path,
        acceptance_length=head_figures.get("tau"),
        speedup=head_figures.get("speedup"),
        prompt_lookup_acceptance_length=lookup_figures.get("tau"),
        summary={
            name: {k: figures["overall"].get(k) for k in ("tau", "speedup", "tokens_per_second")}
            for name, figures in drafters.items()
        },
        seconds=round(run.seconds, 3),
        log_path=str(run.log_path),
    )


def _parameter(name: str) -> Any:
    from prefect.runtime import task_run

    return task_run.parameters[name]
