"""What a stage's child process is told about the Prefect run it belongs to, for MLflow.

dmtp never imports prefect: the task reads the flow run here and hands it down as the MLflow run
name (`run_name`) and as tags in `$DMTP_MLFLOW_RUN_TAGS` (read by `dmtp.tracking`), so an MLflow
run links back to the flow run, its deployment and its page in the Prefect UI.
"""

from __future__ import annotations

import json


def flow_run_context() -> tuple[str | None, dict[str, str]]:
    """(the flow run's name, MLflow tags naming it); (None, {}) outside a flow run."""
    from prefect.runtime import deployment, flow_run

    run_id = flow_run.id
    if not run_id:
        return None, {}
    name = flow_run.name
    tags = {"prefect.flow_run_id": str(run_id), "prefect.flow_run_name": str(name or "")}
    if flow_run.flow_name:
        tags["prefect.flow_name"] = str(flow_run.flow_name)
    if deployment.id:
        tags["prefect.deployment_id"] = str(deployment.id)
        tags["prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    ui_url = flow_run.ui_url
    if ui_url and ui_url.startswith("http"):  # an ephemeral API has no UI
        tags["prefect.flow_run_url"] = ui_url
    return name, tags


def mlflow_environment(tags: dict[str, str]) -> dict[str, str]:
    """Environment variables that carry `tags` to dmtp.tracking in the child process."""
    from dmtp.tracking import RUN_TAGS_ENV

    return {RUN_TAGS_ENV: json.dumps(tags)} if tags else {}
