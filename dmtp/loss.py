"""The masked-diffusion (MDLM "SUBS") objective of the MTP head (DESIGN §4), as free functions.

- `sample_masking`: t ~ U[ε, 1) per example; mask each of the L positions w.p. 1 − α(t).
- `noised_input_ids`: x_t = labels, with masked positions replaced by the mask token.
- `masked_diffusion_loss`: Σ w(t)·CE(logits, labels) over masked positions / #label positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmtp.errors import DmtpError
from dmtp.schedules import NoiseSchedule

IGNORE_INDEX = -100  # labels past a sequence's end
LOSS_WEIGHT_TYPES = ("scheduler", "ones")


def sample_masking(
    labels: torch.Tensor,
    schedule: NoiseSchedule,
    time_epsilon: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `t: [B]` uniform in [ε, 1) and `masked: [B, L]` (bool), each position masked w.p. 1 − α(t).

    `labels: [B, L]`. Random numbers come from `generator` (on the CPU) so a run can be replayed
    exactly from a seed and a step number, whatever the device.
    """
    if not 0.0 <= time_epsilon < 1.0:
        raise DmtpError(f"time_epsilon must be in [0, 1), got {time_epsilon}")
    batch_size, block_length = labels.shape
    t = time_epsilon + (1.0 - time_epsilon) * torch.rand(batch_size, generator=generator)
    draws = torch.rand(batch_size, block_length, generator=generator)
    masked = draws < schedule.mask_probability(t)[:, None]
    return t.to(labels.device), masked.to(labels.device)


def loss_weights(schedule: NoiseSchedule, t: torch.Tensor, loss_weight_type: str) -> torch.Tensor:
    """`w(t): [B]` from the schedule (`scheduler`) or all ones (`ones`)."""
    if loss_weight_type == "scheduler":
        return schedule.weight(t)
    if loss_weight_type == "ones":
        return torch.ones_like(t)
    raise DmtpError(
        f"unknown loss_weight_type {loss_weight_type!r}: use one of {LOSS_WEIGHT_TYPES}"
    )


def noised_input_ids(
    labels: torch.Tensor, masked: torch.Tensor, mask_token_id: int
) -> torch.Tensor:
    """`x_t: [B, L]`: labels where clean, `mask_token_id` where masked or past the sequence end."""
    hidden = masked | (labels == IGNORE_INDEX)
    return torch.where(hidden, torch.full_like(labels, mask_token_id), labels)


def masked_diffusion_loss(
    logits: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted CE on masked positions / number of label positions. logits [B, L, V], labels/masked [B, L], weights [B] -> scalar."""
    valid = labels != IGNORE_INDEX
    token_loss = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    counted = (masked & valid).to(token_loss.dtype)
    total = (token_loss * counted * weights.to(token_loss.dtype)[:, None]).sum()
    return total / valid.sum().clamp(min=1)
