"""`priced`: keep a candidate only if its importance pays for its device's time at one fixed price
(beyond the paper: the Lagrangian form of WDMoE's trade-off, without its per-token normalisation).

For token j and candidate u of its top-k (importance w_ju, per-token latency t_u of u's device on
the BS's estimate at the equal split, in ms):
    keep (j, u)  iff  w_ju ≥ λ · t_u,       never dropping the token's top-1 (candidate 0),
λ ≥ 0 in importance per ms (``price_per_ms``; 0 is vanilla top-k).

Why this and not a share. With min-max bandwidth every busy device finishes together, and a
layer's wait is T_l ≈ Σ_u n_u·a_u / B (a_u: one token's airtime per Hz of device u, the dominant
part of t_u), so each kept pair costs the layer about a_u / B ∝ t_u, whoever else runs. Minimising
Σ_requests Σ_l T_l plus λ⁻¹ × the importance dropped is then separable per pair, and its optimum
is the rule above with one λ for every token, layer and moment. WDMoE-θ instead compares w_ju/t_u
with the same token's other candidates (s_ju = (w_ju/t_u) / Σ_v w_jv/t_v < θ): a uniformly slow
cell drops as little as a fast one, and a token whose candidates are all cheap still drops its
weakest. ``priced`` spends its drops where the band is dear.

``max_drop`` (optional, ≥ 0) caps how many candidates one token may lose (its lowest-ratio
w/t first): accuracy falls in steps as a token loses experts (SPEC §8), so a cap spreads the loss.
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


def priced_keep(importance: torch.Tensor, latency_s: torch.Tensor, price_per_ms: float) -> torch.Tensor:
    """keep [T, K] = w ≥ λ·t (t in ms; ∞ for an unreachable device), top-1 forced in."""
    keep = importance.double() >= price_per_ms * (latency_s.double() * 1e3)
    keep[:, 0] = True
    return keep


def cap_drops(
    keep: torch.Tensor, importance: torch.Tensor, latency_s: torch.Tensor, max_drop: int
) -> torch.Tensor:
    """keep [T, K] with at most ``max_drop`` candidates dropped per token: the dropped candidates
    with the lowest w/t stay dropped, the others come back. Unreachable ones (t = ∞) stay dropped."""
    ratio = torch.where(keep, torch.inf, importance.double() / latency_s.double())
    rank = ratio.argsort(dim=-1, stable=True).argsort(dim=-1)  # 0: the worst dropped candidate
    return keep | ((rank >= max_drop) & torch.isfinite(latency_s))


@POLICIES.register("priced")
@dataclass(frozen=True)
class Priced(Stateless):
    """Keep a candidate iff its importance ≥ price_per_ms (≥ 0) × its device's per-token ms;
    max_drop (None or ≥ 0): at most that many dropped per token."""

    price_per_ms: float = 0.05
    max_drop: int | None = None
    name: str = "priced"

    def __post_init__(self) -> None:
        check_range("priced.price_per_ms", self.price_per_ms, 0.0, np.inf)
        if self.max_drop is not None:
            check_range("priced.max_drop", self.max_drop, 0, 1_000_000)

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        t_s = candidate_latency_s(route, require_latency(self.name, view))
        keep = priced_keep(route.importance, t_s, self.price_per_ms)
        if self.max_drop is not None:
            keep = cap_drops(keep, route.importance, t_s, self.max_drop)
        return mask_selection(route, keep)
