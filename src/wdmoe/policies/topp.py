"""`topp`: channel-blind dynamic top-p over the router's candidates.

Candidates sorted by importance (descending), with shares q_j = w_j / Σ_{top-k} w: keep the
shortest prefix whose cumulative share reaches p, i.e. candidate i (in that order) is kept iff
Σ_{i' < i} q_i' < p. p = 1 keeps every candidate of positive importance (top-k); p → 0 keeps
the most important one.
"""

from dataclasses import dataclass

import torch

from wdmoe.config import check_range
from wdmoe.latency.view import ExpertLatency
from wdmoe.policies.base import Stateless, mask_selection
from wdmoe.policies.registry import POLICIES
from wdmoe.types import RouterOutput, Selection


def top_p_keep(importance: torch.Tensor, p: float) -> torch.Tensor:
    """keep [T, K] of the top-p rule on importance [T, K]."""
    imp = importance.double()
    share = imp / imp.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    sorted_share, order = share.sort(dim=-1, descending=True, stable=True)
    before = sorted_share.cumsum(dim=-1) - sorted_share  # mass of the better candidates
    keep_sorted = before < p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@POLICIES.register("topp")
@dataclass(frozen=True)
class TopP(Stateless):
    """Dynamic top-p; p ∈ (0, 1]."""

    p: float = 0.9
    name: str = "topp"

    def __post_init__(self) -> None:
        check_range("topp.p", self.p, 0.0, 1.0, lo_open=True)

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        return mask_selection(route, top_p_keep(route.importance, self.p))
