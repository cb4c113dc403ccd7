"""Export task: `dmtp export` of the trained head as a child process, into a folder beside the head.

The folder is `<head output_dir>/exports/<format>-<digest>`, named by what decides its bytes (the
head, its evaluation, which the model card quotes, the store it describes, the export settings):
a new evaluation writes a new folder instead of rewriting the card an earlier run's cache entry
points at.

A head the layout cannot express (a draft vocabulary, a context window: `dmtp.export.
dflash_problems`) is not a failure of the flow: `dmtp export` exits with `ExportRefused.exit_code`,
the task records the one-line reason in `refused.txt` and returns a manifest that says why, and the
flow goes on. That record is what a later run's cache hit checks for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from tasks.caching import OutputCache, digest
from tasks.launch import (
    StageFailed,
    dmtp_command,
    fail_once_if_requested,
    retry_unless_permanent,
    run_logger,
    run_stage,
)
from tasks.manifests import EvaluationManifest, ExportManifest, HeadManifest, StoreManifest

RETRY_DELAYS_S = [10, 60]
REFUSED_FILE = "refused.txt"
EXPORT_REFUSED_EXIT_CODE = 3  # dmtp.export.ExportRefused.exit_code (not imported: it pulls torch)
EXPORTED_FILES = ("config.json", "model.safetensors", "README.md")


def export_config(settings: dict[str, Any], **fields: Any) -> Any:
    """A `dmtp.config.ExportConfig` from flat settings (format, dtype); checked."""
    from dmtp.config import ExportConfig

    return ExportConfig(**{**settings, **fields})


def _identity(
    head: HeadManifest,
    store: StoreManifest,
    evaluation: EvaluationManifest | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    return {
        "head": head.model_dump(mode="json"),
        "store": store.identity_sha256,
        "store_rows": store.rows,
        "evaluation": evaluation.model_dump(mode="json") if evaluation else None,
        "settings": settings,
    }


def export_dir(
    head: HeadManifest,
    store: StoreManifest,
    evaluation: EvaluationManifest | None,
    settings: dict[str, Any],
) -> Path:
    name = f"{settings.get('format', 'dflash')}-{digest(_identity(head, store, evaluation, settings))[:12]}"
    return Path(head.output_dir) / "exports" / name


def _export_determinants(inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    store: StoreManifest = inputs["store"]
    return store.model.name, _identity(
        inputs["head"], store, inputs["evaluation"], inputs["settings"]
    )


def export_problem(folder: Path) -> str | None:
    """Why `folder` holds neither a finished export nor a refusal record (None when it does)."""
    if (folder / REFUSED_FILE).is_file():
        return None
    for name in EXPORTED_FILES:
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    return None


def _export_check(inputs: dict[str, Any]) -> str | None:
    return export_problem(
        export_dir(inputs["head"], inputs["store"], inputs["evaluation"], inputs["settings"])
    )


def _export_run_name() -> str:
    from prefect.runtime import task_run

    parameters = task_run.parameters
    settings = parameters["settings"]
    return f"export head of {parameters['store'].model.name} ({settings.get('format', 'dflash')})"


@task(
    name="export_head",
    task_run_name=_export_run_name,
    retries=2,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=OutputCache(
        stage="export", determinants=_export_determinants, check=_export_check
    ),
    persist_result=True,
    result_serializer="json",
)
def export_head(
    head: HeadManifest,
    store: StoreManifest,
    evaluation: EvaluationManifest | None,
    settings: dict[str, Any],
    stall_timeout_s: float | None = 3600.0,
) -> ExportManifest:
    """Write the head in a serving layout (settings: ExportConfig's format, dtype); the model card
    quotes the evaluation when there is one and describes the store."""
    logger = run_logger()
    fail_once_if_requested("export_head")
    output = export_dir(head, store, evaluation, settings)
    config = export_config(
        settings,
        head_path=head.head_path,
        output_dir=str(output),
        evaluation=evaluation.report_path if evaluation else None,
        train_data_dir=store.store_path,
        # The folder is this task's own: one there without a cache record is a stale attempt.
        overwrite=True,
    )
    from dmtp.config import save_config

    log_path = Path(head.output_dir) / "logs" / "export.log"
    config_path = save_config(config, log_path.with_name("export-config.json"))
    try:
        run = run_stage(
            f"export ({config.format})",
            dmtp_command("export", "--config", str(config_path)),
            log_path=log_path,
            stall_timeout_s=stall_timeout_s,
            logger=logger,
        )
    except StageFailed as failure:
        if failure.returncode != EXPORT_REFUSED_EXIT_CODE:
            raise
        reason = (failure.tail or ["dmtp export refused the head"])[-1]
        reason = reason.split(": error: ", 1)[-1]
        output.mkdir(parents=True, exist_ok=True)
        (output / REFUSED_FILE).write_text(reason + "\n")
        logger.warning("head not exported as %s: %s", config.format, reason)
        return ExportManifest(
            format=config.format,
            output_dir=str(output),
            exported=False,
            reason=reason,
            seconds=0.0,
            log_path=str(log_path),
        )
    problem = export_problem(output)
    if problem:
        raise RuntimeError(f"dmtp export exited 0 but {problem}")
    recorded = json.loads((output / "config.json").read_text()).get("dmtp_export", {})
    return ExportManifest(
        format=config.format,
        output_dir=str(output),
        exported=True,
        serving_caveats=list(recorded.get("serving_caveats", [])),
        seconds=round(run.seconds, 3),
        log_path=str(run.log_path),
    )
