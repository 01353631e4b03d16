"""`wdmoe-j`: the journal's iterative-θ variant (SPEC §5; our reconstruction of its Algorithm 1,
whose text is not available offline — the roles of α, Δθ and γ below are our reading).

Per token j and surviving candidate u (importance w_ju, per-token device latency t_u):
    alignment a_ju = w_ju^α · t_u^−(1−α)       α ∈ [0, 1]: 1 channel-blind, 0 latency only,
                                                ½ ranks like WLR = w/t
    share     s_ju = a_ju / Σ_{v alive} a_jv
    M(keep)   = mean over kept pairs of WLR_ju = w_ju / t_u          (the layer's mean WLR)
Start from top-k with θ = 0. While M(keep) < γ·M(top-k) and θ < 1: raise θ by Δθ, then every
token prunes its lowest-weight surviving candidate (never its top-1) if that candidate's share is
below θ; shares are recomputed over the survivors. At most ⌈1/Δθ⌉ rounds; γ ≤ 1 is top-k.
"""

from dataclasses import dataclass

import numpy as np
import torch

from wdmoe.config import check_range
from wdmoe.latency.view import ExpertLatency
from wdmoe.policies.base import Stateless, mask_selection, require_latency
from wdmoe.policies.registry import POLICIES
from wdmoe.policies.wdmoe import candidate_latency_s
from wdmoe.types import RouterOutput, Selection


def mean_wlr(importance: torch.Tensor, latency_s: torch.Tensor, keep: torch.Tensor) -> float:
    """M = mean of w/t over the kept pairs [T, K]."""
    return float((importance.double() / latency_s)[keep].mean())


def prune_round(
    importance: torch.Tensor, latency_s: torch.Tensor, keep: torch.Tensor, alpha: float, theta: float
) -> torch.Tensor:
    """One round: each token drops its lowest-weight non-top-1 survivor if its share < θ."""
    w = importance.double()
    align = torch.where(keep, w.pow(alpha) * latency_s.pow(alpha - 1.0), 0.0)
    share = align / align.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    prunable = keep.clone()
    prunable[:, 0] = False
    weight = torch.where(prunable, w, torch.inf)
    k = weight.shape[-1]
    # lowest weight, ties to the later (lower-ranked) slot
    victim = (k - 1) - weight.flip(-1).argmin(dim=-1)
    hit = prunable.any(dim=-1) & (share.gather(-1, victim[:, None])[:, 0] < theta)
    out = keep.clone()
    out[hit, victim[hit]] = False
    return out


def iterative_keep(
    importance: torch.Tensor, latency_s: torch.Tensor, alpha: float, step: float, gamma: float
) -> torch.Tensor:
    """keep [T, K] of the iterative-θ rule (see the module docstring)."""
    keep = torch.ones_like(importance, dtype=torch.bool)
    target = gamma * mean_wlr(importance, latency_s, keep)
    theta = 0.0
    for _ in range(int(np.ceil(1.0 / step))):
        if mean_wlr(importance, latency_s, keep) >= target:
            break
        theta = min(theta + step, 1.0)
        keep = prune_round(importance, latency_s, keep, alpha, theta)
    return keep


@POLICIES.register("wdmoe-j")
@dataclass(frozen=True)
class WDMoEJournal(Stateless):
    """Iterative θ: alpha ∈ [0, 1], delta_theta ∈ (0, 1], gamma > 0."""

    alpha: float = 0.5
    delta_theta: float = 0.05
    gamma: float = 1.2
    name: str = "wdmoe-j"

    def __post_init__(self) -> None:
        check_range("wdmoe-j.alpha", self.alpha, 0.0, 1.0)
        check_range("wdmoe-j.delta_theta", self.delta_theta, 0.0, 1.0, lo_open=True)
        check_range("wdmoe-j.gamma", self.gamma, 0.0, np.inf, lo_open=True)

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        t_s = candidate_latency_s(route, require_latency(self.name, view))
        return mask_selection(
            route, iterative_keep(route.importance, t_s, self.alpha, self.delta_theta, self.gamma)
        )
