"""Noise schedules of the masked-diffusion objective (DESIGN §4), chosen by name from a registry.

A schedule gives the probability `α(t)` that a token is still clean at time `t ∈ [0, 1]` (so each
position is masked with probability `1 − α(t)`), and the MDLM loss weight

    w(t) = −α'(t) / (1 − α(t))

which makes the weighted cross-entropy on masked positions an upper bound on the negative
log-likelihood (Sahoo et al. 2024, eq. 10). `--loss_weight_type ones` replaces `w` by 1.

    linear   α(t) = 1 − t          w(t) = 1/t
    kappa    α(t) = 1 − t^κ        w(t) = κ/t                        (polynomial; κ = --kappa)
    cosine   α(t) = cos(πt/2)      w(t) = (π/2)·sin(πt/2)/(1 − cos(πt/2))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from dmtp.errors import DmtpError


class NoiseSchedule(ABC):
    """`α(t)` and `w(t)` for `t: [B]` in (0, 1)."""

    name: ClassVar[str]

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a position is unmasked at time `t`; `α(0) = 1`, `α(1) = 0`."""

    @abstractmethod
    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """`−α'(t) / (1 − α(t))`, in closed form (finite for t > 0)."""

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(NoiseSchedule):
    """α(t) = 1 − t, w(t) = 1/t (MDLM's log-linear schedule, expressed in α)."""

    name = "linear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t


class KappaSchedule(NoiseSchedule):
    """α(t) = 1 − t^κ, w(t) = κ/t. κ > 1 keeps more tokens clean early on."""

    name = "kappa"

    def __init__(self, kappa: float = 2.0):
        if not kappa > 0:
            raise DmtpError(f"kappa must be > 0, got {kappa}")
        self.kappa = float(kappa)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t.pow(self.kappa)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return self.kappa / t

    def __repr__(self) -> str:
        return f"KappaSchedule(kappa={self.kappa})"


class CosineSchedule(NoiseSchedule):
    """α(t) = cos(πt/2), w(t) = (π/2)·sin(πt/2) / (1 − cos(πt/2))."""

    name = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        half_angle = 0.5 * math.pi * t
        # 1 − cos(x) = 2·sin²(x/2): exact for small t, where 1 − cos cancels catastrophically.
        return 0.5 * math.pi * torch.sin(half_angle) / (2.0 * torch.sin(0.5 * half_angle).pow(2))


SCHEDULES: dict[str, type[NoiseSchedule]] = {
    cls.name: cls for cls in (LinearSchedule, KappaSchedule, CosineSchedule)
}


def get_schedule(name: str, kappa: float = 2.0) -> NoiseSchedule:
    """The schedule registered as `name` (`kappa` is used by the kappa schedule only)."""
    if name not in SCHEDULES:
        raise DmtpError(f"unknown scheduler_type {name!r}: use one of {', '.join(SCHEDULES)}")
    return KappaSchedule(kappa) if name == "kappa" else SCHEDULES[name]()
