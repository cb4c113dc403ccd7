"""MLflow for dmtp (DESIGN §6): every MLflow call the library makes is here.

    uri = resolve_tracking_uri(None, data_dir="heads")  # $MLFLOW_TRACKING_URI, else sqlite:///heads/mlflow.db
    tracker = Tracker(config, enabled=rank == 0)        # dmtp.train: one run per training
    log_evaluation(uri, metrics=..., run_id=...)        # dmtp.evaluate: into the training run

A training run holds:
- the resolved settings as params, stepped metrics, system metrics;
- its input, the store, as an `mlflow.data` dataset built from the store's metadata (path, base
  model fingerprint, collection settings, row counts, the prompts' sha256); no row is read;
- its output, the final head, as an MLflow 3 logged model named `head`: the head folder's files as
  they are (safetensors + config.json, no pickle) plus the MLmodel file that MLflow needs to register
  a model. The model is registered as a version of `dmtp-<base model>` (one registered model per
  base model). Evaluation later tags that version with τ and speedup;
- tags from whoever launched it (`$DMTP_MLFLOW_RUN_TAGS`, a JSON object; the Prefect tasks put the
  flow run's id, name and deployment there, and pass the flow run's name as `run_name`);
- checkpoints only with `--mlflow_log_checkpoints`: they stay local by default.

Training never waits on the tracking server: metrics go through a `dmtp.outbox.MetricOutbox`
(a background thread, a bounded buffer, a spill file in the output_dir while the server is down).
The run's end waits at most `--mlflow_flush_timeout_s` for them, and says what is left and where.

mlflow is imported inside the functions: the flows import this module to resolve the URI, and
importing the flows must stay light (tests/test_layering.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from dmtp.config import STORE_DIRNAME, TrainConfig
from dmtp.errors import DmtpError
from dmtp.outbox import SPILL_FILE, MetricOutbox

TRACKING_DB = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"  # beside a SQLite tracking store, as `mlflow server` keeps them
RUN_TAGS_ENV = "DMTP_MLFLOW_RUN_TAGS"
HEAD_MODEL_NAME = "head"  # the logged model's name in its training run
HEAD_FLAVOR = "dmtp_head"
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(explicit: str | None, data_dir: str | Path | None) -> str | None:
    """Where runs go: `explicit`, else $MLFLOW_TRACKING_URI, else `sqlite:///<data_dir>/mlflow.db`.

    `data_dir` is the folder that holds the caller's outputs and is shared by sibling runs:
    `dmtp train` passes its output_dir's parent, the flows their data root. None (as `dmtp
    evaluate` passes for a head whose training logged nowhere): no store, MLflow off.
    """
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if data_dir is None:
        return None
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / TRACKING_DB}"


def _mlflow() -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created if missing (the same rule for training and evaluation).

    A new experiment in a SQLite store keeps its artifacts beside the database (`mlartifacts/`),
    not in whatever directory the job started in. Two runs creating it at once is fine.
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):
            db_path = Path(tracking_uri.removeprefix("sqlite:///"))
            artifact_location = (db_path.parent / ARTIFACTS_DIRNAME).resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location)
        except MlflowException:  # created meanwhile by a concurrent run
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise DmtpError(
            f"MLflow experiment {name!r} is deleted in {tracking_uri}: restore it "
            f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) or choose "
            "another --experiment_name"
        )
    return found.experiment_id


def run_tags_from_environment() -> dict[str, str]:
    """Tags the launcher asks for, from $DMTP_MLFLOW_RUN_TAGS (a JSON object; unset: none)."""
    raw = os.environ.get(RUN_TAGS_ENV, "").strip()
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DmtpError(f"${RUN_TAGS_ENV} is not valid JSON ({error}): {raw[:200]}") from None
    if not isinstance(tags, dict):
        raise DmtpError(
            f"${RUN_TAGS_ENV} must be a JSON object of tag names to values: {raw[:200]}"
        )
    return {str(k): str(v) for k, v in tags.items() if v is not None and str(v) != ""}


def registered_model_name(base_model: str | None) -> str:
    """`dmtp-<base model>`: 'Qwen/Qwen2.5-7B-Instruct' -> 'dmtp-Qwen2.5-7B-Instruct' (folder and
    .gguf names alike), so every head of one base model is a version of one registered model."""
    name = (base_model or "").rstrip("/").split("/")[-1].removesuffix(".gguf")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:64]
    return f"dmtp-{name or 'no-base-model'}"


def param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text[:PARAM_VALUE_LIMIT]


def flatten_params(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TrainConfig as params: the nested `data` settings become `data.<field>`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("data",):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----------------------------------------------------------------------------------------------
# the store as a dataset (lineage without reading data)


def store_dataset(store_path: str | Path) -> Any:
    """An `mlflow.data` dataset describing the store from its metadata alone.

    Source: the store's path. Digest: a hash of the root attrs that determine its content (base
    model fingerprint, collection settings, prompts sha256, layout) and the committed rows per
    shard, so the same data always has the same digest. Profile: the counts and the identity.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from dmtp.store import open_store

    store = open_store(store_path)
    attrs = store.attrs
    shards = [
        {
            "shard": s.index,
            "rows": s.n_committed,
            "sequences": s.n_sequences,
            "complete": s.complete,
        }
        for s in store.shards()
    ]
    base = attrs.get("base_model") or {}
    profile = {
        "rows": sum(s["rows"] for s in shards),
        "sequences": sum(s["sequences"] for s in shards),
        "shards": shards,
        "hidden_size": store.hidden_size,
        "vocab_size": store.vocab_size,
        "hidden_dtype": store.hidden_dtype,
        "feature_layers": list(store.feature_layers),
        "base_model": base.get("name_or_path"),
        "base_model_fingerprint": base.get("fingerprint"),
        "prompts_sha256": attrs.get("prompts_sha256"),
        "prompts_count": attrs.get("prompts_count"),
        "collection": attrs.get("collection"),
        "schema": attrs.get("schema"),
        "dmtp_version": attrs.get("dmtp_version"),
    }
    identity = {"attrs": attrs, "shards": shards}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(store.path).resolve()
    name = path.parent.name if path.name == STORE_DIRNAME else path.name

    class StoreDataset(MetaDataset):
        """MetaDataset with a profile (MetaDataset itself records none)."""

        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that the path is ambiguous.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path))
    return StoreDataset(source, name=name, digest=digest[:16])


# ----------------------------------------------------------------------------------------------
# the head as an MLflow model


class _HeadFlavor:
    """The least MLflow needs to log a folder as a model: its files as they are plus an MLmodel
    file naming the loader (`dmtp.head.load_head`). Nothing is pickled; no pyfunc wrapper."""

    @staticmethod
    def save_model(path: str, mlflow_model: Any, head_dir: str) -> None:
        import dmtp

        def link_or_copy(source: str, target: str) -> None:
            # A 7B-shape head is ~0.6 GB: link it into the upload folder rather than copy it.
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)

        shutil.copytree(head_dir, path, copy_function=link_or_copy)
        mlflow_model.add_flavor(
            HEAD_FLAVOR,
            loader_module="dmtp.head",
            loader="load_head",
            format="transformers save_pretrained folder (config.json, model.safetensors)",
            dmtp_version=dmtp.__version__,
        )
        mlflow_model.save(str(Path(path) / "MLmodel"))


# ----------------------------------------------------------------------------------------------
# a training run (rank 0 only)


@contextlib.contextmanager
def _fail_fast() -> Any:
    """MLflow HTTP calls without retries and with a short timeout, for a server known to be
    down: they fail at once instead of after MLflow's retry budget (minutes by default)."""
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Tracker:
    """One MLflow run per training (continued on resume); every call is a no-op off rank 0.

    Only `start` (creating or continuing the run) waits on the server. Metrics go through an
    outbox; the head and checkpoints are uploaded only while the server answers, and a failed
    upload costs a warning, not the training.
    """

    def __init__(self, config: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        self.outbox: MetricOutbox | None = None
        self.spill_path = Path(config.output_dir).resolve() / SPILL_FILE
        self.flush_timeout_s = config.mlflow_flush_timeout_s
        self._flush_deadline: float | None = None
        self.tracking_uri = resolve_tracking_uri(
            config.mlflow_tracking_uri, Path(config.output_dir).resolve().parent
        )
        if config.report_to == "none":
            self.enabled = enabled = False
            self.tracking_uri = "(MLflow off: --report_to none)"
        if not enabled:
            return
        self.mlflow = _mlflow()
        # MLflow's fluent API (runs, system metrics, models, registry) reads a process-wide URI,
        # and set_tracking_uri also exports it as $MLFLOW_TRACKING_URI. Restored by finish(), so
        # a later training or evaluation in this process resolves its own store.
        self._previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.mlflow.set_tracking_uri(self.tracking_uri)

    def start(
        self,
        config: TrainConfig,
        run_id: str | None,
        params: dict[str, Any],
        tags: dict[str, str],
        store_path: str | Path | None = None,
    ) -> None:
        """Start the run, or continue `run_id` (a checkpoint's); a new run records its params and
        its input dataset (the store at `store_path`)."""
        if not self.enabled:
            return
        mlflow = self.mlflow
        if run_id is not None:
            try:
                mlflow.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                print(
                    f"dmtp train: MLflow run {run_id} of the checkpoint is not in "
                    f"{self.tracking_uri}; logging the resumed training to a new run",
                    file=sys.stderr,
                )
                run_id = None
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=None
            if run_id
            else experiment_id(mlflow.MlflowClient(), config.experiment_name, self.tracking_uri),
            run_name=None
            if run_id
            else (config.run_name or Path(config.output_dir).resolve().name),
            log_system_metrics=True,
        )
        self.run_id = run.info.run_id
        # Also delivers what an earlier training in this output_dir left in the spill file.
        self.outbox = MetricOutbox(
            self.tracking_uri, self.spill_path, current_run_id=self.run_id, name="dmtp train"
        )
        if run_id is None:
            mlflow.log_params({k: param_value(v) for k, v in params.items()})
            if store_path is not None:
                mlflow.log_input(store_dataset(store_path), context="training")
        # The launcher's tags (e.g. the Prefect flow run) are set on resume too: the run then
        # names the flow run that continued it.
        mlflow.set_tags({**tags, **run_tags_from_environment()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` at `step` for MLflow; returns at once, whatever the server does."""
        if self.enabled and self.outbox is not None:
            self.outbox.put(self.run_id, metrics, step)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        """Upload a folder (a checkpoint) while the server answers; else it stays local."""
        if not (self.enabled and self.outbox is not None):
            return
        if self.outbox.down:
            self._warn(
                f"{folder} is not uploaded to MLflow (the server is unreachable); it stays local"
            )
            return
        try:
            self.mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
        except Exception as error:  # the server went away: the files are safe on disk
            self._warn(f"uploading {folder} to MLflow failed ({error}); it stays local")

    def flush(self) -> bool:
        """Wait for the waiting metrics to reach MLflow; True if they did. The first call starts
        the run's end: all calls together wait at most `flush_timeout_s`."""
        if self.outbox is None:
            return True
        if self._flush_deadline is None:
            self._flush_deadline = time.monotonic() + self.flush_timeout_s
        return self.outbox.flush(self._flush_deadline - time.monotonic())

    @staticmethod
    def _warn(message: str) -> None:
        print(f"dmtp train: warning: {message}", file=sys.stderr, flush=True)

    def log_head(
        self,
        head_dir: Path,
        step: int,
        registered_name: str | None,
        version_tags: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Log the final head folder as the run's model `head` and register it as a version of
        `registered_name` (None: log only). Returns what was recorded (empty when off).

        The run's metrics at `step` are linked to the model, so the validation τ shows beside it.
        A registry that refuses the version (e.g. a store without one) costs a warning, not the
        training: the head is on disk and logged either way.
        """
        if not (self.enabled and self.run_id):
            return {}
        # The model links the run's metrics at `step`: they must be in MLflow first.
        if not self.flush():
            self._warn(
                f"the head is not logged to MLflow (the server at {self.tracking_uri} is "
                f"unreachable); it is at {head_dir}"
            )
            return {}
        try:
            return self._log_head(head_dir, step, registered_name, version_tags)
        except Exception as error:  # the server went away meanwhile: the head is on disk
            self._warn(f"logging the head to MLflow failed ({error}); it is at {head_dir}")
            return {}

    def _log_head(
        self,
        head_dir: Path,
        step: int,
        registered_name: str | None,
        version_tags: dict[str, str] | None,
    ) -> dict[str, Any]:
        from mlflow.models import Model

        mlflow = self.mlflow
        info = Model.log(
            None,
            flavor=_HeadFlavor,
            name=HEAD_MODEL_NAME,
            run_id=self.run_id,
            step=step,
            tags=version_tags,
            head_dir=str(head_dir),
            flavor_name=HEAD_FLAVOR,
        )
        recorded: dict[str, Any] = {"mlflow_model_id": info.model_id}
        if not registered_name:
            return recorded
        try:
            version = mlflow.register_model(info.model_uri, registered_name, tags=version_tags)
            client = mlflow.MlflowClient()
            if not client.get_registered_model(registered_name).description:
                client.update_registered_model(
                    registered_name,
                    description=f"dmtp draft heads for speculative decoding of "
                    f"{registered_name.removeprefix('dmtp-')} (one version per training run)",
                )
        except mlflow.exceptions.MlflowException as error:
            print(
                f"dmtp train: warning: the head is logged as MLflow model {info.model_id}, but "
                f"registering it as {registered_name!r} failed: {error}",
                file=sys.stderr,
            )
            return recorded
        return {
            **recorded,
            "registered_model_name": version.name,
            "registered_model_version": str(version.version),
        }

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: wait (bounded) for the waiting metrics, then say what is left, and where."""
        if not self.enabled:
            return
        if self.run_id and self.outbox is not None:
            self.flush()  # starts the run's end, if log_head has not
            report = self.outbox.close(self._flush_deadline - time.monotonic())
            ended = False
            if report.complete:
                try:
                    self.mlflow.end_run(status=status)
                    ended = True
                except Exception:  # the server went away just now
                    pass
            if not ended:
                self.outbox.spill_end(self.run_id, status)
                self._let_go_of_run(status)
            self.outbox = None
            self._say(report, status, ended)
        elif self.run_id:
            self.mlflow.end_run(status=status)
        self.mlflow.set_tracking_uri(self._previous_uri)

    def _let_go_of_run(self, status: str) -> None:
        """This process lets go of its active run without waiting on MLflow's retries: the
        server is down (the run's end is in the spill file)."""
        from mlflow.tracking import fluent

        # Its system metrics monitor stops by itself once the server does not answer.
        fluent.run_id_to_system_metrics_monitor.pop(self.run_id, None)
        with _fail_fast(), contextlib.suppress(Exception):
            self.mlflow.end_run(status=status)  # pops the active run, then fails to reach it

    def _say(self, report: Any, status: str, ended: bool) -> None:
        if report.left or not ended:
            what = f"{report.left} metric points" + (
                "" if ended else f" and the run's end ({status})"
            )
            print(
                f"dmtp train: MLflow at {self.tracking_uri} did not take {what} within "
                f"{self.flush_timeout_s:g} s (--mlflow_flush_timeout_s); they wait in "
                f"{report.spill_path}: `python -m dmtp.outbox {report.spill_path}` delivers them "
                "once the server answers (so does the next `dmtp train` in this output_dir)",
                file=sys.stderr,
                flush=True,
            )
        elif report.down_seconds:
            print(
                f"dmtp train: MLflow at {self.tracking_uri} was unreachable for "
                f"{report.down_seconds:.0f} s; all {report.sent} metric points reached it",
                file=sys.stderr,
                flush=True,
            )


# ----------------------------------------------------------------------------------------------
# evaluation: into the training run (or a new run linked to it), and onto the registered version


def model_versions_of_run(client: Any, run_id: str) -> list[Any]:
    """The registered versions of the models a training run logged."""
    return list(client.search_model_versions(f"run_id = '{run_id}'"))


def _evaluation_experiment(
    client: Any, tracking_uri: str, experiment: str | None, linked_run_id: str | None
) -> str:
    """`experiment`, else the linked training run's (when this store holds it), else `dmtp`."""
    from mlflow.exceptions import MlflowException

    if experiment is None and linked_run_id:
        try:
            return client.get_run(linked_run_id).info.experiment_id
        except MlflowException:  # the run is in another store: fall back to the default
            pass
    return experiment_id(client, experiment or "dmtp", tracking_uri)


def log_evaluation(
    tracking_uri: str,
    *,
    metrics: dict[str, float],
    params: dict[str, Any],
    files: list[Path],
    summary: str,
    version_tags: dict[str, str],
    run_id: str | None = None,
    experiment: str | None = None,
    linked_run_id: str | None = None,
) -> str:
    """Attach an evaluation to MLflow; returns the run id it went into.

    With `run_id`, into that run (the head's training run, finished or not); its params are left
    alone (they may hold these names with other values). Otherwise into a new run tagged
    `dmtp.evaluates_run` = `linked_run_id`, with `params` as `eval.<name>`, in `experiment`
    (created by the same rule as training's); by default in the linked run's experiment, beside
    the training it evaluates, else in `dmtp`. `files` go under the artifact folder `evaluation/`; `summary`
    into the tag `dmtp.evaluation`. The training run's registered model versions get
    `version_tags` (τ, speedup) and `summary` as their description, and its logged model the
    metrics. Uses MlflowClient, so no active run is started or ended behind the caller's back.
    """
    _mlflow()
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    created = run_id is None
    if created:
        tags = {
            "mlflow.runName": "evaluate",
            "dmtp.stage": "evaluate",
            **run_tags_from_environment(),
        }
        if linked_run_id:
            tags["dmtp.evaluates_run"] = linked_run_id
        run_id = client.create_run(
            _evaluation_experiment(client, tracking_uri, experiment, linked_run_id), tags=tags
        ).info.run_id
    trained_by = run_id if not created else linked_run_id
    versions = model_versions_of_run(client, trained_by) if trained_by else []
    model_ids = {
        v.source.removeprefix("models:/") for v in versions if v.source.startswith("models:/")
    }
    # Metrics that name the head's logged model show on it too: the Logged Models page compares
    # heads by them. (One metric names one model; a run logs one head.)
    model_id = model_ids.pop() if len(model_ids) == 1 else None
    timestamp = int(time.time() * 1000)
    batch = [Metric(key, value, timestamp, 0, model_id=model_id) for key, value in metrics.items()]
    eval_params = [Param(f"eval.{k}", str(v)[:500]) for k, v in params.items()] if created else []
    client.log_batch(run_id, metrics=batch, params=eval_params)
    for path in files:
        client.log_artifact(run_id, str(path), "evaluation")
    client.set_tag(run_id, "dmtp.evaluation", summary)
    if created:
        client.set_terminated(run_id)
    for version in versions:
        for key, value in {**version_tags, "evaluation_run_id": run_id}.items():
            client.set_model_version_tag(version.name, version.version, key, value)
        client.update_model_version(version.name, version.version, description=summary)
    return run_id
