"""Prefect tasks: one dmtp entry point each, with retries, cache keys and timeouts.

    plan_collection -> collect_shard (one per shard) -> validate_store -> train_head
      -> evaluate_head

GPU and distributed work runs in child processes (`dmtp collect`, `torchrun -m dmtp.train`, ...)
that a timeout can kill; tasks hand each other small manifests (tasks.manifests), never tensors.
Heavy imports (torch, transformers, zarr) happen inside task bodies, so importing this package -
and deploying a flow - needs neither. Dependency direction: flows -> tasks -> dmtp.
"""

from tasks.collect import collect_shard, plan_collection
from tasks.validate import StoreInvalid, validate_store

__all__ = ["StoreInvalid", "collect_shard", "plan_collection", "validate_store"]
