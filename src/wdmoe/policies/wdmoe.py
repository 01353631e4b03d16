"""`wdmoe` (WDMoE-θ, SPEC §5): drop candidates whose weight-to-latency share is below θ.

For token j and candidate u of its top-k (importance w_ju, per-token latency t_u of u's device):
    WLR_ju = w_ju / t_u,    s_ju = WLR_ju / Σ_{v ∈ top-k(j)} WLR_jv,
    drop u if s_ju < θ, but never the token's top-1 (candidate 0).
θ = 0 is vanilla top-k. The mean share is 1/k, so ``k_scaled`` uses θ·2/k (θ means for any k
what it means for Mixtral's k = 2).
"""

from dataclasses import dataclass

import torch

from wdmoe.config import check_range
from wdmoe.latency.view import ExpertLatency
from wdmoe.policies.base import Stateless, mask_selection, require_latency
from wdmoe.policies.registry import POLICIES
from wdmoe.types import RouterOutput, Selection


def wlr_share(importance: torch.Tensor, latency_s: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """s_ju [T, K] = (w_ju/t_ju) / Σ_{v alive} (w_jv/t_jv), 0 for dead candidates.

    importance [T, K]; latency_s [T, K] (t of each candidate's device, inf: unreachable);
    alive [T, K] bool. A token whose alive WLRs all vanish gets shares 0.
    """
    wlr = torch.where(alive, importance.double() / latency_s.double(), 0.0)
    total = wlr.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, wlr / total.clamp_min(1e-300), 0.0)


def candidate_latency_s(route: RouterOutput, latency: ExpertLatency) -> torch.Tensor:
    """t [T, K]: the per-token latency of each candidate's device (float64)."""
    per_expert_s = torch.as_tensor(latency.per_token_s(), dtype=torch.float64, device=route.candidates.device)
    return per_expert_s[route.candidates]


def threshold_keep(share: torch.Tensor, theta: float) -> torch.Tensor:
    """keep [T, K] = s ≥ θ, with every token's top-1 forced in."""
    keep = share >= theta
    keep[:, 0] = True
    return keep


def effective_theta(theta: float, k: int, k_scaled: bool) -> float:
    """θ, or θ·2/k with ``k_scaled``."""
    return theta * 2.0 / k if k_scaled else theta


@POLICIES.register("wdmoe")
@dataclass(frozen=True)
class WDMoE(Stateless):
    """WDMoE-θ; θ ∈ [0, 1]."""

    theta: float = 0.2
    k_scaled: bool = False
    name: str = "wdmoe"

    def __post_init__(self) -> None:
        check_range("wdmoe.theta", self.theta, 0.0, 1.0)

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        alive = torch.ones_like(route.candidates, dtype=torch.bool)
        t_s = candidate_latency_s(route, require_latency(self.name, view))
        theta = effective_theta(self.theta, route.top_k, self.k_scaled)
        return mask_selection(route, threshold_keep(wlr_share(route.importance, t_s, alive), theta))
