"""What tasks hand each other: small, JSON-serialisable manifests (paths, counts, hashes).

Never tensors: a manifest is what Prefect persists as a task's cached result (as JSON, under the
data root, where every worker reads it), so it must stay small and must not need torch to load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    """A base model as the user named it, and what identifies its weights."""

    requested: str | None  # what the user passed; None = the embedded default
    name: str  # short, for run names and folder names
    fingerprint: str  # dmtp.models.model_fingerprint: config + weight names, sizes, first MiB


class PromptsRef(BaseModel):
    path: str
    sha256: str
    count: int


class CollectionPlan(BaseModel):
    """Everything that decides a store's content, and where the store lives."""

    model: ModelRef
    prompts: PromptsRef
    settings: dict[str, Any]  # the `dmtp collect` flags that shape the data (CollectConfig fields)
    num_shards: int
    output_dir: str  # `dmtp collect --output_dir`; also holds the logs, leases, validation report
    store: str  # the store itself: <output_dir>/collected_data_final for a store dmtp collects
    dmtp_version: str

    @property
    def store_path(self) -> Path:
        return Path(self.store)

    def identity(self) -> dict[str, Any]:
        """What the cache keys build on. The same on every worker: paths are under the shared data
        root, and the model enters by fingerprint, not by its (per-host) cache folder."""
        return {
            "base_model": {
                "requested": self.model.requested,
                "fingerprint": self.model.fingerprint,
            },
            "prompts_sha256": self.prompts.sha256,
            "settings": self.settings,
            "num_shards": self.num_shards,
            "output_dir": self.output_dir,
            "store": self.store,
            "dmtp_version": self.dmtp_version,
        }


class ShardManifest(BaseModel):
    store_path: str
    shard_index: int
    rows: int
    sequences: int
    resumed_from_rows: int = 0  # committed rows found from an interrupted earlier attempt
    seconds: float
    log_path: str


class StoreManifest(BaseModel):
    """A validated store."""

    store_path: str
    identity_sha256: str  # of CollectionPlan.identity(): what the training key builds on
    model: ModelRef
    rows: int
    sequences: int
    bytes_on_disk: int
    report_path: str
    shard_rows: list[int]


class HeadManifest(BaseModel):
    head_path: str  # the final head folder (save_pretrained output)
    output_dir: str  # checkpoints and the final head
    mlflow_tracking_uri: str
    mlflow_run_id: str | None
    mlflow_experiment: str
    # the head as an MLflow model of the run, and its version in the model registry (None: not
    # logged or not registered)
    mlflow_model_id: str | None = None
    registered_model_name: str | None = None
    registered_model_version: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # final values of the run's metrics
    nproc_per_node: int
    seconds: float
    log_path: str


class EvaluationManifest(BaseModel):
    report_path: str
    head_path: str
    acceptance_length: float | None  # τ, counting the bonus token (DESIGN §5)
    speedup: float | None
    prompt_lookup_acceptance_length: float | None = None
    summary: dict[str, Any] = Field(default_factory=dict)
    seconds: float
    log_path: str


class ExportManifest(BaseModel):
    """A head in a serving layout (`dmtp export`), or why it has none."""

    format: str  # "dflash"
    output_dir: str  # the exported folder; for a refused head, the folder holding refused.txt
    exported: bool
    reason: str | None = None  # why the head cannot be expressed in `format` (exported is False)
    serving_caveats: list[str] = Field(default_factory=list)  # dmtp.export.serving_caveats
    seconds: float
    log_path: str
