"""Training checkpoints on disk: safetensors + JSON, never pickle.

    <output_dir>/checkpoint-<step>/
      model.safetensors, config.json      a loadable head (`MTPHeadModel.from_pretrained`)
      optimizer.safetensors, .json        the optimizer state: tensors + a JSON skeleton
                                          (`optimizer_rank<r>.*` per rank under DeepSpeed ZeRO)
      rng_state_<rank>.safetensors, .json torch/CUDA/NumPy/Python RNG of each rank
      trainer_state.json                  step, data position, LR-scheduler scalars, MLflow run,
                                          each other file's size and crc32c; written last: a
                                          folder without it is not a checkpoint
    <output_dir>/final/                   the final head (config.json, model.safetensors)

A checkpoint is written under a temporary name and renamed when complete, so a killed run or a
full disk leaves either a whole checkpoint or none. A file damaged later (a truncated copy, a
flipped bit) fails its recorded size or crc32c, and `--resume_from_checkpoint auto` falls back to
the newest checkpoint that passes, naming the one it skipped. crc32c, the store's checksum too, ran
at ~3 GB/s here where sha256 managed 0.6: a 3.4 GB Qwen2.5-7B-shape checkpoint costs about a
second to check. The head borrows the base model's embedding and LM head, so `model.safetensors`
and the optimizer state hold only trained tensors.

`dmtp.train.Trainer` decides when to save and keeps ranks in step; this module only reads and
writes the files.
"""

from __future__ import annotations

import errno
import importlib
import json
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmtp.errors import DiskFull, DmtpError

CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIRNAME = "final"
STATE_FILE = "trainer_state.json"
_STATE_OBJECT_MODULES = ("deepspeed.",)  # the only classes a checkpoint may name (no pickle)


# ----------------------------------------------------------------------------------------------
# nested state (optimizer, scheduler) as safetensors + JSON


def _flatten_state(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested dict/list state -> a JSON skeleton; tensors go to `tensors` under their dotted path."""
    if isinstance(value, torch.Tensor):
        key = prefix.rstrip(".")
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str | int) for k in value):
            raise DmtpError(f"cannot checkpoint state with key types {[type(k) for k in value]}")
        return {
            "__dict__": [[k, _flatten_state(v, f"{prefix}{k}.", tensors)] for k, v in value.items()]
        }
    if isinstance(value, list | tuple):
        # betas=(0.9, 0.999) stay tuples
        kind = "__list__" if isinstance(value, list) else "__tuple__"
        return {kind: [_flatten_state(v, f"{prefix}{i}.", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if type(value).__module__.startswith(_STATE_OBJECT_MODULES) and hasattr(value, "__dict__"):
        # DeepSpeed's ZeRO optimizer state holds its loss scaler as an object: keep its fields.
        cls = type(value)
        return {
            "__object__": f"{cls.__module__}:{cls.__qualname__}",
            "__state__": _flatten_state(vars(value), prefix, tensors),
        }
    raise DmtpError(
        f"cannot checkpoint a {type(value).__name__} at {prefix.rstrip('.')} without pickle"
    )


def _unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: _unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [_unflatten_state(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(_unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__object__" in skeleton:
            module_name, qualname = skeleton["__object__"].split(":")
            if not module_name.startswith(_STATE_OBJECT_MODULES):
                raise DmtpError(f"refusing to rebuild a {skeleton['__object__']} from a checkpoint")
            cls = importlib.import_module(module_name)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            value = cls.__new__(cls)
            value.__dict__.update(_unflatten_state(skeleton["__state__"], tensors))
            return value
    return skeleton


def save_state_dict(state: dict[str, Any], path: Path) -> None:
    """Any nested optimizer/scheduler state as `<path>.safetensors` (tensors) + `<path>.json` (the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten_state(state, "", tensors)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(skeleton))


def load_state_dict(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(path.with_suffix(".safetensors")))
    return _unflatten_state(json.loads(path.with_suffix(".json").read_text()), tensors)


def optimizer_path(folder: Path, rank: int, deepspeed: bool) -> Path:
    """Under DDP every rank holds the same optimizer state (rank 0 saves it); under ZeRO each
    rank holds its partition and saves its own."""
    return folder / (f"optimizer_rank{rank}" if deepspeed else "optimizer")


# ----------------------------------------------------------------------------------------------
# random number generators, per rank


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    numpy_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    python_state = random.getstate()
    scalars = {
        "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }
    return tensors, scalars


def _set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    name, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state(
        (name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    version, internal, gauss = scalars["python"]
    random.setstate((version, tuple(internal), gauss))


def save_rng_state(folder: Path, rank: int) -> None:
    """This process's RNG states as `rng_state_<rank>.safetensors` + `.json`."""
    from safetensors.torch import save_file

    tensors, scalars = _rng_state()
    save_file(tensors, str(folder / f"rng_state_{rank}.safetensors"))
    (folder / f"rng_state_{rank}.json").write_text(json.dumps(scalars))


def load_rng_state(folder: Path, rank: int) -> None:
    """Restore this process's RNG states, when the checkpoint holds them."""
    from safetensors.torch import load_file

    path = folder / f"rng_state_{rank}.safetensors"
    if path.exists():
        _set_rng_state(load_file(str(path)), json.loads(path.with_suffix(".json").read_text()))


# ----------------------------------------------------------------------------------------------
# the model's weights


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load `folder/model.safetensors` into `model`; refuse a checkpoint of another head shape."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DmtpError(
            f"{folder}: the checkpoint does not fit this head (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); resume with the flags of the original run"
        )


# ----------------------------------------------------------------------------------------------
# checkpoint folders: write, commit, find, rotate


def staging_dir(output_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary folder to write into, the checkpoint's final name) for `step`."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    return output_dir / f".{final.name}.tmp", final


def file_crc32c(path: Path) -> str:
    import crc32c

    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            value = crc32c.crc32c(chunk, value)
    return f"{value:08x}"


def commit_checkpoint(tmp: Path, final: Path, state: dict[str, Any]) -> Path:
    """Record every file's size and crc32c in the state file, write it last and rename the
    finished folder into place."""
    files = {
        path.name: {"bytes": path.stat().st_size, "crc32c": file_crc32c(path)}
        for path in sorted(tmp.iterdir())
        if path.is_file()
    }
    (tmp / STATE_FILE).write_text(json.dumps({**state, "files": files}, indent=1, default=str))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None: an unreadable state file, or a file missing,
    of another size or another crc32c than the commit recorded. A checkpoint from before checksums
    is checked by opening its safetensors files."""
    from safetensors import SafetensorError, safe_open

    try:
        files = read_state(folder).get("files")
    except (OSError, ValueError) as error:
        return f"{STATE_FILE} is unreadable ({error})"
    if files is None:
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except (OSError, SafetensorError) as error:
                return f"{path.name} does not open ({error})"
        return None
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != recorded["bytes"]:
            return f"{name} has {size} bytes, {recorded['bytes']} were written (truncated?)"
        if file_crc32c(path) != recorded["crc32c"]:
            return f"{name} does not match its crc32c (damaged after it was written)"
    return None


def checkpoint_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT, raised as an OSError by Python or as a SafetensorError by safetensors."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return type(error).__name__ == "SafetensorError" and any(
        f"(os error {code})" in text for code in (errno.ENOSPC, errno.EDQUOT)
    )


def disk_full(final: Path, needed_bytes: int, error: BaseException) -> DiskFull:
    """The one-line error for a checkpoint that did not fit: where, how much it needs, how much is free."""
    free = shutil.disk_usage(final.parent).free
    return DiskFull(
        f"no space left on the device of {final.parent} for {final.name} ({error}): a checkpoint "
        f"needs about {needed_bytes / 1e6:.1f} MB, {free / 1e6:.1f} MB are free; nothing was "
        "committed. Free space (or lower --save_total_limit) and rerun with "
        "--resume_from_checkpoint auto"
    )


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints (a state file is written last), oldest first."""
    found = [
        p
        for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir()
        and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
        and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (None or 0: keep all)."""
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _warn(message: str) -> None:
    print(f"dmtp train: warning: {message}", file=sys.stderr, flush=True)


def resolve_resume_path(
    resume_from_checkpoint: str | None,
    output_dir: str | Path,
    warn: Callable[[str], None] | None = _warn,
) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: a folder, or `auto` for the newest one in
    `output_dir` that passes its checksums (None when there is none yet: start fresh). A damaged
    newer checkpoint is skipped with a warning naming it and the one used instead."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "auto":
        skipped: list[str] = []
        for candidate in reversed(list_checkpoints(Path(output_dir))):
            problem = checkpoint_problem(candidate)
            if problem is None:
                if skipped and warn:
                    warn(f"skipping {'; '.join(skipped)}; resuming from {candidate} instead")
                return candidate
            skipped.append(f"{candidate} ({problem})")
        if skipped and warn:
            warn(f"skipping {'; '.join(skipped)}; no loadable checkpoint left: starting at step 0")
        return None
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).exists():
        raise DmtpError(
            f"--resume_from_checkpoint {path}: not a finished checkpoint (no {STATE_FILE}); "
            f"pass a {CHECKPOINT_PREFIX}<step> folder of --output_dir, or `auto`"
        )
    problem = checkpoint_problem(path)
    if problem:
        raise DmtpError(
            f"--resume_from_checkpoint {path}: {problem}; pass an older {CHECKPOINT_PREFIX}<step> "
            "folder, or `auto` to take the newest one that loads"
        )
    return path
