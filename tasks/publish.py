"""Results in the Prefect UI: a table artifact of the evaluation, a link artifact to the MLflow run.

Both keys are stable per deployment (`collect-and-train-gpu-evaluation`,
`collect-and-train-gpu-mlflow-run`), so the Artifacts page shows every run of a deployment as the
history of one key. A run outside a deployment (`make demo`, a test) uses `<flow>-local`, or the
flow's `artifact_key` parameter. Prefect allows lowercase letters, digits and dashes in a key.

The task runs on every flow run, never from a cache: an artifact belongs to the run that made it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.launch import run_logger
from tasks.manifests import EvaluationManifest, ExportManifest, HeadManifest

MLFLOW_UI_PORT = 5000  # `mlflow ui`'s default, and deploy/up.sh's server
DRAFTER_LABELS = {"head": "head", "prompt_lookup": "prompt lookup"}


def artifact_key_base(
    flow_name: str, deployment_name: str | None, override: str | None = None
) -> str:
    """The base of a run's artifact keys: `override`, else `<flow>-<deployment>` (`-local` when the
    run has no deployment), in Prefect's alphabet (lowercase letters, digits, dashes)."""
    text = override or f"{flow_name}-{deployment_name or 'local'}"
    key = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")
    if not key:
        raise ValueError(f"artifact key {text!r} has no letters or digits")
    return key


def evaluation_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method (each drafter, then plain greedy decoding): τ, acceptance by block
    position, tokens/s and speedup, from a `dmtp evaluate` result."""
    drafters = report["drafters"]
    width = max(len(f["overall"]["acceptance_by_position"]) for f in drafters.values())

    def rounded(value: Any, digits: int = 3) -> Any:
        return None if value is None else round(float(value), digits)

    rows = []
    for name, figures in drafters.items():
        overall = figures["overall"]
        rates = overall["acceptance_by_position"]
        rows.append(
            {
                "method": DRAFTER_LABELS.get(name, name),
                "tau": rounded(overall["tau"]),
                **{
                    f"acceptance_pos{i + 1}": rounded(rates[i]) if i < len(rates) else None
                    for i in range(width)
                },
                "tokens_per_s": rounded(overall["tokens_per_second"], 2),
                "speedup": rounded(overall["speedup"]),
            }
        )
    first = next(iter(drafters.values()))["overall"]
    rows.append(
        {
            "method": "greedy",
            "tau": 1.0,
            **{f"acceptance_pos{i + 1}": None for i in range(width)},
            "tokens_per_s": rounded(first["greedy_tokens_per_second"], 2),
            "speedup": 1.0,
        }
    )
    return rows


def mlflow_run_link(tracking_uri: str, run_id: str) -> tuple[str, str]:
    """(the run's page in the MLflow UI, a note on how to reach it).

    A tracking server (http/https) serves its own UI at the same address. A SQLite or file store
    has no server: the link is where `mlflow ui` on this store opens the run, and the note says
    the command that starts it.
    """
    import mlflow

    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    page = f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
    command = mlflow_ui_command(tracking_uri)
    if command is None:
        return f"{tracking_uri.rstrip('/')}/{page}", f"MLflow tracking server {tracking_uri}"
    return (
        f"http://127.0.0.1:{MLFLOW_UI_PORT}/{page}",
        f"the tracking store {tracking_uri} has no server: run `{command}` on the host that holds "
        "it, then open the link",
    )


def mlflow_ui_command(tracking_uri: str) -> str | None:
    """The command that serves a local tracking store's UI; None for a tracking server."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port {MLFLOW_UI_PORT}"


def _description(
    model: str,
    head: HeadManifest,
    evaluation: EvaluationManifest | None,
    report: dict[str, Any] | None,
    export: ExportManifest | None,
) -> str:
    lines = [f"**{model}** head `{head.head_path}`"]
    if report is not None and evaluation is not None:
        settings = report.get("settings", {})
        overall = report["drafters"]["head"]["overall"]
        machine = report.get("machine", {})
        device = machine.get("gpu") or machine.get("device", "?")
        lines.append(
            f"`dmtp evaluate` on {overall['prompts']} prompts of "
            f"`{settings.get('input_data_path', '?')}` ({overall['generated_tokens']:,} tokens, "
            f"batch 1, {device}), lossless against greedy decoding; τ counts the bonus token. "
            f"Report: `{evaluation.report_path}`"
        )
    if export is not None:
        lines.append(
            f"DFlash export: `{export.output_dir}`"
            if export.exported
            else f"Not exported as {export.format}: {export.reason}"
        )
    if head.mlflow_run_id:
        lines.append(f"MLflow run `{head.mlflow_run_id}` in `{head.mlflow_tracking_uri}`")
    return "\n\n".join(lines)


@task(
    name="publish_results",
    task_run_name="publish results to the Prefect UI",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[5, 30],
)
def publish_results(
    key: str,
    model: str,
    head: HeadManifest,
    evaluation: EvaluationManifest | None,
    export: ExportManifest | None = None,
) -> dict[str, str]:
    """Create this run's artifacts; returns their keys by kind (`table`, `link`)."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    logger = run_logger()
    report = json.loads(Path(evaluation.report_path).read_text()) if evaluation else None
    description = _description(model, head, evaluation, report, export)
    keys: dict[str, str] = {}
    if report is not None:
        keys["table"] = f"{key}-evaluation"
        create_table_artifact(evaluation_table(report), key=keys["table"], description=description)
    if head.mlflow_run_id:
        url, note = mlflow_run_link(head.mlflow_tracking_uri, head.mlflow_run_id)
        keys["link"] = f"{key}-mlflow-run"
        create_link_artifact(
            url,
            link_text=f"MLflow run {head.mlflow_run_id}",
            key=keys["link"],
            description=f"{description}\n\nLink: {note}.",
        )
    logger.info("Prefect artifacts: %s", ", ".join(keys.values()) or "none (nothing to publish)")
    return keys
