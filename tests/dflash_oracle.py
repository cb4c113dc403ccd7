"""The reference DFlash code (`dflash==0.1.0`, z-lab, MIT): a peer for dmtp's head (DESIGN §5).

`dflash` pins tqdm, datasets and requests exactly, so it is never installed into the project's
environment: its wheel is fetched with `pip download --no-deps`, checked against a pinned sha256,
unpacked once into the dmtp cache and put on `sys.path`. `dflash.model` imports only torch and
transformers.

    dflash = load_dflash()                                   # the `dflash.model` module
    draft = dflash_draft_from_head(head, dflash)             # DFlashDraftModel, the head's tensors
    draft = dflash.DFlashDraftModel.from_pretrained(folder)  # or `dmtp export`'s folder of them
    run = run_peers(dflash, draft, head, base_model, prompt_ids, 64, [eos])   # dmtp and DFlash
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from dmtp.export import dflash_draft_config
from dmtp.models import cache_dir, sha256_file
from dmtp.specdec import HeadDrafter, greedy_decode, speculative_decode

DFLASH_REQUIREMENT = "dflash==0.1.0"
DFLASH_WHEEL_SHA256 = "b3fe38d9413efc30a952c8b38b34f1dcc696ba6d7b865acbf540a34cc53afaa2"


class DFlashUnavailable(RuntimeError):
    """The wheel cannot be fetched (PyPI unreachable): tests skip, the benchmark stops."""


def dflash_folder() -> Path:
    return cache_dir() / "dflash-0.1.0"


def _fetch(folder: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="dmtp-dflash-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
            "--disable-pip-version-check", "-d", tmp, DFLASH_REQUIREMENT,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as error:
            raise DFlashUnavailable(f"pip download {DFLASH_REQUIREMENT} timed out") from error
        wheels = list(Path(tmp).glob("dflash-*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DFlashUnavailable(f"cannot fetch {DFLASH_REQUIREMENT} from PyPI: {reason}")
        if sha256_file(wheels[0]) != DFLASH_WHEEL_SHA256:
            raise RuntimeError(
                f"{wheels[0].name}: sha256 mismatch (expected {DFLASH_WHEEL_SHA256}); not using it"
            )
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.extractall(unpacked)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            unpacked.rename(folder)
        except OSError:  # a concurrent run published it first
            if not (folder / "dflash" / "model.py").exists():
                raise


def load_dflash() -> ModuleType:
    """`dflash.model`, from the cached unpacked wheel (fetched on first use)."""
    folder = dflash_folder()
    if not (folder / "dflash" / "model.py").exists():
        _fetch(folder)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    module = importlib.import_module("dflash.model")
    if not torch.cuda.is_available():
        # `dflash_generate(return_stats=True)` times with `torch.cuda.synchronize()`, which fails
        # on a CPU-only torch; its clock is only for the timing stats, never for the tokens.
        module._cuda_time = time.perf_counter
    return module


def dflash_config(head: Any) -> Any:
    """The Qwen3Config a `DFlashDraftModel` of the head's shape is built from: `dmtp export`'s."""
    return dflash_draft_config(head.config)


def dflash_draft_from_head(head: Any, dflash: ModuleType | None = None) -> Any:
    """A `DFlashDraftModel` holding the head's tensors, loaded one to one (`strict=True`)."""
    dflash = dflash or load_dflash()
    parameter = next(head.parameters())
    draft = dflash.DFlashDraftModel(dflash_config(head))
    draft.load_state_dict(head.state_dict(), strict=True)
    return draft.to(device=parameter.device, dtype=parameter.dtype).eval()


def clip_to_limit(acceptance_lengths: list[int], max_new_tokens: int) -> list[int]:
    """DFlash's rounds cut at `max_new_tokens` generated tokens, the prefill's token included.

    How dmtp and DFlash count: both leave the prefill's token out (`acceptance_lengths` is appended
    only in the loop; dmtp's first token is not a round), count a round as accepted drafts + 1 and
    cut a round after a stop token, so they agree at an EOS. They differ near the token limit: with
    R tokens left, `dflash_generate` drafts from a *shortened* block `[bonus, MASK × R]`
    (`verify_size = min(block_size, max_length - start)`) and caps the round at R; dmtp drafts from
    the full block of L it was trained on, keeps the first R - 1 drafts, and commits
    min(accepted + 1, R). Once R < L - 1 the two blocks differ, and so can the drafts. DFlash given
    L more tokens drafts those rounds from full blocks: its rounds, clipped here at the limit, are
    dmtp's exactly.
    """
    generated, clipped = 1, []
    for length in acceptance_lengths:
        if generated >= max_new_tokens:
            break
        clipped.append(min(length, max_new_tokens - generated))
        generated += clipped[-1]
    return clipped


@dataclass
class PeerRun:
    """One prompt decoded four ways with the same base model and head weights."""

    greedy: list[int]  # plain greedy decoding's tokens
    dmtp: Any  # dmtp's SpecResult
    dflash: Any  # dflash_generate's stats at the same token limit
    dflash_longer: Any  # dflash_generate's stats with a block more of room (see clip_to_limit)
    prompt_length: int
    max_new_tokens: int

    @property
    def dflash_tokens(self) -> list[int]:
        return self.dflash.output_ids[0, self.prompt_length :].tolist()

    @property
    def dmtp_lengths(self) -> list[int]:
        return [r.committed for r in self.dmtp.rounds]

    @property
    def dflash_lengths_aligned(self) -> list[int]:
        return clip_to_limit(self.dflash_longer.acceptance_lengths, self.max_new_tokens)


def run_peers(
    dflash: ModuleType,
    draft: Any,
    head: Any,
    model: Any,
    prompt: list[int],
    max_new_tokens: int,
    stop_token_ids: list[int],
) -> PeerRun:
    """Greedy decoding, dmtp's `speculative_decode` with `HeadDrafter` (K = 1, clean first
    position, as DFlash drafts) and `dflash_generate` (temperature 0) on one prompt."""
    block = int(head.config.block_length)
    greedy = greedy_decode(model, prompt, max_new_tokens, stop_token_ids).tokens
    drafter = HeadDrafter(head, block, int(head.config.mask_token_id), model.config.vocab_size)
    ours = speculative_decode(model, drafter, prompt, max_new_tokens, block, stop_token_ids)
    ids = torch.tensor([prompt], device=model.device)
    same, longer = (
        dflash.dflash_generate(
            draft, model, ids, limit, stop_token_ids, temperature=0.0, return_stats=True
        )
        for limit in (max_new_tokens, max_new_tokens + block)
    )
    return PeerRun(greedy, ours, same, longer, len(prompt), max_new_tokens)


def fit_head(head: Any, model: Any, sequences: list[list[int]], steps: int, seed: int = 0) -> None:
    """Fit the head to a few token sequences (prompt + the base model's greedy answer) in seconds,
    so that it drafts some stretches right and others wrong: `dmtp train` in miniature (blocks
    `[token, MASK, …]` anchored in the teacher-forced features, cross-entropy on positions
    1..L-1), 32 random anchors a step, Adam."""
    length = head.config.block_length
    generator = torch.Generator().manual_seed(seed)
    data = []
    for ids in sequences:
        ids = torch.tensor(ids, device=model.device)
        with torch.no_grad():
            states = model(ids[None], output_hidden_states=True).hidden_states
        data.append((ids, torch.cat([states[i] for i in head.config.feature_layers], dim=-1)))
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    head.train()
    for step in range(steps):
        ids, features = data[step % len(data)]
        # The block after anchor a holds positions a+1 … a+L: the bonus token, then the drafts.
        anchors = torch.randperm(len(ids) - length, generator=generator)[:32].sort().values
        anchors = anchors.to(ids.device)
        labels = ids[anchors[:, None] + 1 + torch.arange(length, device=ids.device)]
        blocks = torch.full_like(labels, head.config.mask_token_id)
        blocks[:, 0] = labels[:, 0]
        out = head(features, blocks[None], anchors=anchors[None], with_logits=True)
        loss = F.cross_entropy(out.logits[0, :, 1:].flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
