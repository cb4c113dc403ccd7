"""Validation task: `dmtp validate` on the collected store; a failure stops the flow before
training.

Cached while the store is untouched: the key includes a digest of every file's path, size and
mtime, so any write to the store (a resumed shard, a repaired chunk, a flipped byte written by
anything) makes the next run validate again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.caching import OutputCache, digest, tree_listing_digest
from tasks.collect import model_name, slug
from tasks.launch import (
    StageFailed,
    dmtp_command,
    fail_once_if_requested,
    retry_unless_permanent,
    run_logger,
    run_stage,
)
from tasks.manifests import CollectionPlan, ModelRef, PromptsRef, ShardManifest, StoreManifest


class StoreInvalid(RuntimeError):
    """The store failed validation. Permanent: the same bytes fail the same way on a retry."""

    permanent = True

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report

    @property
    def bad_shards(self) -> list[int]:
        """Shards with at least one error (a store-level error names no shard)."""
        return sorted(
            {e["shard"] for e in self.report.get("errors", []) if e.get("shard") is not None}
        )


def _report_path(plan: CollectionPlan) -> Path:
    return Path(plan.output_dir) / "validation.json"


def _validate_determinants(inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    plan: CollectionPlan = inputs["plan"]
    store = plan.store_path
    listing = tree_listing_digest(store) if store.exists() else "absent"
    return f"{plan.model.name}", {
        "plan": plan.identity(),
        "listing": listing,
        "sample": inputs["sample"],
    }


def _validate_check(inputs: dict[str, Any]) -> str | None:
    path = _report_path(inputs["plan"])
    try:
        report = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return f"its report {path} is gone or unreadable"
    return None if report.get("ok") else f"its report {path} records errors"


@task(
    name="validate_store",
    task_run_name=lambda: f"validate {_plan().model.name} store",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_permanent,
    cache_policy=OutputCache(
        stage="validate", determinants=_validate_determinants, check=_validate_check
    ),
    persist_result=True,
    result_serializer="json",
)
def validate_store(
    plan: CollectionPlan,
    shards: list[ShardManifest],
    sample: float | None = None,
    stall_timeout_s: float | None = 3600.0,
) -> StoreManifest:
    """Run `dmtp validate` over the whole store; raise StoreInvalid (no retry) when it fails.

    shards: the collect tasks' manifests; passing them makes validation wait for every shard.
    sample: fraction of row blocks to decode (default: ValidateConfig's, all of them).
    """
    from dmtp.config import ValidateConfig, save_config

    logger = run_logger()
    fail_once_if_requested("validate_store")
    report_path = _report_path(plan)
    report_path.unlink(missing_ok=True)
    sampled = {} if sample is None else {"sample": sample}
    config = ValidateConfig(
        data_dir=str(plan.store_path), report=str(report_path), progress=False, **sampled
    )
    logs = Path(plan.output_dir) / "logs"
    config_path = save_config(config, logs / "validate-config.json")
    try:
        run_stage(
            "validate store",
            dmtp_command("validate", "--config", str(config_path)),
            log_path=logs / "validate.log",
            stall_timeout_s=stall_timeout_s,
            logger=logger,
        )
    except StageFailed as failure:
        if failure.returncode != 1 or not report_path.exists():
            raise  # could not validate at all (no store, crash): not a verdict on the data
        report = json.loads(report_path.read_text())
        errors = report.get("errors", [])
        first = "; ".join(error["message"] for error in errors[:3])
        raise StoreInvalid(
            f"{plan.store_path} failed validation with {len(errors)} error(s) "
            f"(report: {report_path}): {first}",
            report,
        ) from None
    report = json.loads(report_path.read_text())
    manifest = StoreManifest(
        store_path=str(plan.store_path),
        identity_sha256=digest(plan.identity()),
        model=plan.model,
        rows=report["rows"],
        sequences=report["sequences"],
        bytes_on_disk=report["bytes_on_disk"],
        report_path=str(report_path),
        shard_rows=[shard["rows"] for shard in sorted(report["shards"], key=lambda s: s["index"])],
    )
    logger.info(
        "store OK: %s rows in %s sequences, %.1f MB (%s)",
        f"{manifest.rows:,}",
        f"{manifest.sequences:,}",
        manifest.bytes_on_disk / 1e6,
        plan.store_path,
    )
    return manifest


def _plan() -> CollectionPlan:
    from prefect.runtime import task_run

    return task_run.parameters["plan"]


@task(
    name="plan_existing_store",
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="describe store {train_data_dir}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_permanent,
)
def plan_existing_store(train_data_dir: str) -> CollectionPlan:
    """A plan for a store collected elsewhere (its own attrs say how), so it can be validated
    and trained on like one this flow collected."""
    from dmtp.config import STORE_DIRNAME
    from dmtp.models import DEFAULT_MODEL
    from dmtp.store import open_store

    store = open_store(Path(train_data_dir).expanduser().resolve())
    attrs = store.attrs
    base = attrs.get("base_model") or {}
    recorded = base.get("name_or_path")
    requested = None if recorded in (None, DEFAULT_MODEL.name) else recorded
    # A store that names no base model (synthetic, imported) is called after its folder.
    folder = store.path.parent if store.path.name == STORE_DIRNAME else store.path
    name = model_name(requested) if recorded else slug(folder.name)
    return CollectionPlan(
        model=ModelRef(
            requested=requested,
            name=name,
            fingerprint=base.get("fingerprint", "unknown"),
        ),
        prompts=PromptsRef(
            path="",
            sha256=attrs.get("prompts_sha256", "unknown"),
            count=attrs.get("prompts_count", 0),
        ),
        settings={"collection": attrs.get("collection", {}), "layout": attrs.get("layout", {})},
        num_shards=store.num_shards,
        output_dir=str(store.path.parent),
        store=str(store.path),
        dmtp_version=str(attrs.get("dmtp_version", "unknown")),
    )
