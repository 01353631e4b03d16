"""`joint`: expert selection and bandwidth allocation alternated until the selection is stable
(SPEC §5–6, the journal's joint design).

    keep⁰ = WDMoE-θ on the view's bandwidth B⁰ (e.g. B/U);  for i = 1, 2, …:
        B^i    = allocator(loads of keep^{i−1})                  (default `minmax`)
        keep^i = keep^{i−1} ∧ WDMoE-θ(t_u(1; B̃^i))
    stop when keep^i = keep^{i−1} (or after ``max_iter`` rounds) and return keep with its B.
Rounds only drop: a free alternation cycles (minmax gives a slow device more band, which makes it
worth re-adding, which slows everyone), while the monotone one is stable after at most T·(K−1)
drops, and its result is a fixed point: WDMoE-θ on its own allocation drops nothing more.
B̃ prices a device the allocation left without bandwidth (no work) at the equal share B/U, the
share it would get back if it rejoined, instead of ∞.
"""

from dataclasses import dataclass

import numpy as np
import torch

from wdmoe.allocation import make_allocator
from wdmoe.allocation.base import Allocator
from wdmoe.config import check_range
from wdmoe.latency.view import ExpertLatency
from wdmoe.policies.base import Stateless, mask_selection, require_latency
from wdmoe.policies.registry import POLICIES
from wdmoe.policies.wdmoe import WDMoE
from wdmoe.types import RouterOutput, Selection


def expert_tokens(route: RouterOutput, keep: torch.Tensor) -> np.ndarray:
    """n_e [E]: how many kept pairs each expert serves."""
    return np.bincount(route.candidates[keep].cpu().numpy(), minlength=route.num_experts)


def pricing_view(view: ExpertLatency) -> ExpertLatency:
    """The view with every zero-bandwidth device priced at the equal share B/U."""
    equal_hz = view.channel.equal_share_hz()
    return view.with_bandwidth(np.where(view.bandwidth_hz > 0, view.bandwidth_hz, equal_hz))


def joint_select(
    route: RouterOutput, latency: ExpertLatency, rule: WDMoE, allocator: Allocator, max_iter: int
) -> tuple[Selection, ExpertLatency]:
    """The stable (or last) selection and the view carrying its allocation."""
    keep = rule.select(route, latency).keep
    view = latency.allocate(allocator, expert_tokens(route, keep))
    for _ in range(max_iter):
        nxt = keep & rule.select(route, pricing_view(view)).keep
        if torch.equal(nxt, keep):
            break
        keep = nxt
        view = latency.allocate(allocator, expert_tokens(route, keep))
    return mask_selection(route, keep), view


@POLICIES.register("joint")
@dataclass(frozen=True)
class Joint(Stateless):
    """WDMoE-θ (θ ∈ [0, 1]) alternated with a bandwidth allocator, max_iter ≥ 1 rounds."""

    theta: float = 0.2
    k_scaled: bool = False
    allocator: str = "minmax"
    max_iter: int = 10
    name: str = "joint"

    def __post_init__(self) -> None:
        check_range("joint.theta", self.theta, 0.0, 1.0)
        check_range("joint.max_iter", self.max_iter, 1, 1000)
        make_allocator(self.allocator)  # unknown names fail here, at build time

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        view = require_latency(self.name, view)
        rule = WDMoE(self.theta, self.k_scaled)
        return joint_select(route, view, rule, make_allocator(self.allocator), self.max_iter)[0]
