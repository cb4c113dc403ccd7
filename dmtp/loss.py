"""The masked-diffusion objective of the draft head (DESIGN §4), as free functions.

Objectives (`--objective`):
- `decode` (default): train as the head decodes. Position 0 is the known bonus token: always
  clean, never in the loss. Each of positions 1..L-1 is masked with probability 1 − α(t),
  t ~ U[ε, 1), and a masked position costs w(t)·CE. `t → 1` is the all-masked block that one-step
  drafting sees; smaller t shows the head blocks with some later tokens known (K > 1 steps).
- `decode_all`: position 0 clean, every position 1..L-1 masked, w ≡ 1: exactly the one-step
  drafting input, the DFlash recipe.
- `seed`: the guide's literal objective: every position maskable, position 0 in the loss,
  Σ w(t)·CE / #label positions.

Guard against w(t) blow-up (decode): w(t) = 1/t reaches 1/ε = 1000 near t = ε, where one example
would carry most of a batch's gradient; so w is capped at `LOSS_WEIGHT_CAP` and the loss is the
weighted *mean* over the counted positions (divided by Σ w, not by the batch size).

`position_decay γ > 0` weights block position k ≥ 1 by exp(−(k − 1)/γ) (DFlash): an early draft
position decides whether the later ones count at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmtp.errors import DmtpError
from dmtp.schedules import NoiseSchedule

IGNORE_INDEX = -100  # labels past a sequence's end or past a disagreement with the greedy chain
LOSS_WEIGHT_TYPES = ("scheduler", "ones")
OBJECTIVES = ("decode", "decode_all", "seed")
LOSS_WEIGHT_CAP = 10.0  # w(t) of the linear schedule at t = 0.1; below that t weighs the same


def sample_masking(
    labels: torch.Tensor,
    schedule: NoiseSchedule,
    time_epsilon: float,
    generator: torch.Generator | None = None,
    objective: str = "seed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `t: [N]` in [ε, 1) and `masked: [N, L]` (bool) for blocks `labels: [N, L]`.

    Random numbers come from `generator` (on the CPU) so a run can be replayed exactly from a seed
    and a step number, whatever the device. Under `decode*` position 0 is never masked.
    """
    if objective not in OBJECTIVES:
        raise DmtpError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if not 0.0 <= time_epsilon < 1.0:
        raise DmtpError(f"time_epsilon must be in [0, 1), got {time_epsilon}")
    n, length = labels.shape
    t = time_epsilon + (1.0 - time_epsilon) * torch.rand(n, generator=generator)
    draws = torch.rand(n, length, generator=generator)
    if objective == "decode_all":
        t = torch.ones(n)
        masked = torch.ones(n, length, dtype=torch.bool)
    else:
        masked = draws < schedule.mask_probability(t)[:, None]
    if objective != "seed":
        masked[:, 0] = False
    return t.to(labels.device), masked.to(labels.device)


def loss_weights(
    schedule: NoiseSchedule, t: torch.Tensor, loss_weight_type: str, objective: str = "seed"
) -> torch.Tensor:
    """`w(t): [N]` from the schedule (`scheduler`) or all ones (`ones`); capped unless `seed`."""
    if loss_weight_type not in LOSS_WEIGHT_TYPES:
        raise DmtpError(
            f"unknown loss_weight_type {loss_weight_type!r}: use one of {LOSS_WEIGHT_TYPES}"
        )
    if loss_weight_type == "ones" or objective == "decode_all":
        return torch.ones_like(t)
    weights = schedule.weight(t)
    return weights if objective == "seed" else weights.clamp(max=LOSS_WEIGHT_CAP)


def position_weights(
    block_length: int, decay: float, device: torch.device | None = None
) -> torch.Tensor:
    """`[L]`: exp(−(k − 1)/γ) at draft position k ≥ 1 (1 at position 0); all ones when γ = 0."""
    k = torch.arange(block_length, dtype=torch.float32, device=device)
    if decay <= 0:
        return torch.ones(block_length, device=device)
    return torch.exp(-(k - 1).clamp(min=0) / decay)


def noised_input_ids(
    labels: torch.Tensor, masked: torch.Tensor, mask_token_id: int
) -> torch.Tensor:
    """`x_t: [..., L]`: labels where clean, `mask_token_id` where masked or past the sequence end."""
    hidden = masked | (labels == IGNORE_INDEX)
    return torch.where(hidden, torch.full_like(labels, mask_token_id), labels)


def block_loss(
    head: torch.nn.Module,
    states: torch.Tensor,
    labels: torch.Tensor,
    masked: torch.Tensor,
    weights: torch.Tensor,
    *,
    objective: str,
    position_decay: float = 0.0,
    teacher_states: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> torch.Tensor:
    """The objective's loss (scalar). states [N, L, H] from the head, labels/masked [N, L], weights [N].

    Logits are computed only at the positions in the loss (never position 0 under `decode*`): the
    base LM head is most of a small head's FLOPs.

    With `teacher_states` [N, L, H] (the base model's final state at each label's row) and
    `distill_weight` α > 0, a position costs (1 − α)·CE(token) + α·CE(p_base, q_head): the base
    model's whole distribution over the draft vocabulary says more per stored token than its argmax.
    """
    labels = head.to_draft_labels(labels)  # tokens outside the draft vocabulary drop out
    valid = labels != IGNORE_INDEX
    counted = masked & valid
    per_position = position_weights(labels.shape[1], position_decay, labels.device)
    token_weight = weights.to(torch.float32)[:, None] * per_position[None, :]
    rows = counted.nonzero(as_tuple=True)
    if rows[0].numel() == 0:
        return states.sum() * 0.0  # nothing masked in this batch: a zero that keeps the graph
    logits = head.draft_logits(states[rows])
    token_loss = F.cross_entropy(logits.float(), labels[rows], reduction="none")
    if teacher_states is not None and distill_weight > 0:
        with torch.no_grad():
            teacher = head.draft_logits(teacher_states[rows].to(states.dtype)).float()
        soft = -(teacher.softmax(-1) * logits.float().log_softmax(-1)).sum(-1)
        token_loss = (1.0 - distill_weight) * token_loss + distill_weight * soft
    weighted = (token_loss * token_weight[rows]).sum()
    if objective == "seed":
        return weighted / valid.sum().clamp(min=1)
    return weighted / token_weight[rows].sum().clamp(min=torch.finfo(torch.float32).tiny)
