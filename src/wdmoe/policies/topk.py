"""`topk`: vanilla, channel-blind — run every candidate the router picked (the Mixtral baseline)."""

from dataclasses import dataclass

import torch

from wdmoe.latency.view import ExpertLatency
from wdmoe.policies.base import Stateless, mask_selection
from wdmoe.policies.registry import POLICIES
from wdmoe.types import RouterOutput, Selection


@POLICIES.register("topk")
@dataclass(frozen=True)
class TopK(Stateless):
    """Keep the first ``k`` candidates (all of them when ``k`` is None)."""

    k: int | None = None
    name: str = "topk"

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        keep = torch.ones_like(route.candidates, dtype=torch.bool)
        if self.k is not None:
            keep[:, self.k :] = False
        if self.k is None or self.k >= route.top_k:
            return Selection(keep=keep, weights=route.weights)
        return mask_selection(route, keep)
