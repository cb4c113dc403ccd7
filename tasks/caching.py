"""Cache keys from what determines each output, and cache hits that check their output still exists.

Prefect's default cache policy keys on the task's inputs *and the run id*, so it never hits across
runs. Each dmtp stage instead keys on exactly what decides its output: the base model's
fingerprint, the prompts' sha256, the stage's parameters and the dmtp version (a new release may
write different bytes). The cached result is the stage's manifest, a JSON record under the data
root that every worker can read.

A record only says what *was* produced. Before a hit is served, `OutputCache` checks the output
itself (the shard is complete, the head folder holds its weights); when it has vanished or fails the
check, the record is dropped and the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.logging import get_logger

import dmtp

logger = get_logger("dmtp.cache")

# (task inputs) -> (a readable label for the key, the values that determine the output)
Determinants = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
OutputCheck = Callable[[dict[str, Any]], str | None]  # None when fine, else why not


def digest(value: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys) of `value`."""
    text = json.dumps(value, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # pydantic manifests
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot hash a {type(value).__name__} into a cache key")


@dataclass
class OutputCache(CachePolicy):
    """Key = stage + dmtp version + determinants; a hit whose output fails `check` recomputes.

    The task must run with `result_storage` set to a folder (a `Path`): the record of key K is the
    file `<folder>/K`, which this policy removes when the output behind it is gone.
    """

    stage: str = ""
    determinants: Determinants | None = None
    check: OutputCheck | None = None

    def compute_key(
        self,
        task_ctx: Any,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        if self.determinants is None:
            return None
        label, values = self.determinants(inputs)
        key = f"{self.stage}-{label}-{digest({'dmtp_version': dmtp.__version__, **values})[:32]}"
        storage = getattr(getattr(task_ctx, "task", None), "result_storage", None)
        if isinstance(storage, Path) and self.check is not None:
            record = storage / key
            if record.exists():
                problem = self.check(inputs)
                if problem:
                    logger.warning(
                        "%s: cached result %s is stale (%s); recomputing", self.stage, key, problem
                    )
                    record.unlink(missing_ok=True)
        return key


def source_digest(*modules: str) -> str:
    """sha256 over the source of dmtp modules (e.g. "specdec"): a stage whose figures are measured
    by this code (the evaluation's τ and speedup) measures again when it changes, which the dmtp
    version alone does not say between releases."""
    package = Path(dmtp.__file__).parent
    return digest(
        {
            name: hashlib.sha256((package / f"{name}.py").read_bytes()).hexdigest()
            for name in modules
        }
    )


def tree_listing_digest(root: Path) -> str:
    """sha256 over every file's relative path, size and mtime under `root`: changes on any write.

    Cheap (metadata only): a validation result is reused exactly while the store is untouched.
    """
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return digest(entries)
