"""`capacity`: capacity-aware token dropping / re-routing, channel-blind — He et al., "Capacity-Aware
Inference: Mitigating the Straggler Effect in Mixture of Experts", arXiv 2503.05066.

The paper bounds every expert's load so that no overloaded expert becomes the layer's straggler
(it reports 1.85× at +0.2% on Mixtral and a 30% MoE-layer speed-up at −0.9% on OLMoE). Per MoE layer
and batch of T tokens, each token routed to its first k candidates (``k``; all K by default):

    C = ⌈γ · T · k / E⌉                         tokens per expert (γ: the capacity factor)

- drop (Capacity-Aware Token Drop, score-based — the paper's best criterion): an expert with more
  than C tokens keeps its C highest-scoring ones (score: the candidate's importance; ties: token
  order) and drops the rest. Our invariant adds: a token's top-1 is never dropped; top-1 pairs
  count first against C, the room left goes to the other pairs by score.
- reroute (Capacity-Aware Token Reroute, our reading restricted to the router's candidates, since
  a policy may not add experts): every dropped pair, highest score first, moves to its token's
  next candidate beyond the first k (best first) whose expert still has room (load < C); a pair
  with none stays dropped. Needs K > k (a wider router top-k, e.g. ``--top-k``).
Padding tokens of a batch count in T and in the loads like any other (the policy cannot tell them).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from wdmoe.channel.units import BoolArray, FloatArray
from wdmoe.config import check_range
from wdmoe.latency.view import ExpertLatency, IntArray
from wdmoe.policies.base import Stateless, mask_selection
from wdmoe.policies.registry import POLICIES
from wdmoe.types import RouterOutput, Selection


def expert_capacity(tokens: int, k: int, num_experts: int, gamma: float) -> int:
    """C = ⌈γ·T·k/E⌉ (a hair of slack so that an exact product is not rounded up by float error)."""
    return math.ceil(gamma * tokens * k / num_experts - 1e-9)


def drop_over_capacity(
    importance: FloatArray, candidates: IntArray, active: BoolArray, cap: int
) -> BoolArray:
    """keep [T, K]: ``active`` pairs within each expert's capacity (module doc, drop)."""
    keep = active.copy()
    for e in np.unique(candidates[active]):
        mine = active & (candidates == e)
        room = max(cap - int(mine[:, 0].sum()), 0)  # top-1 pairs stay and count first
        t, s = np.nonzero(mine[:, 1:])
        order = np.argsort(-importance[t, s + 1], kind="stable")  # np.nonzero is in token order
        over = order[room:]
        keep[t[over], s[over] + 1] = False
    return keep


def reroute(
    importance: FloatArray, candidates: IntArray, active: BoolArray, keep: BoolArray, cap: int
) -> BoolArray:
    """keep [T, K] with every dropped pair moved to its token's next candidate with room (module doc)."""
    keep = keep.copy()
    load = np.bincount(candidates[keep], minlength=int(candidates.max()) + 1)
    t, s = np.nonzero(active & ~keep)
    spare = ~active  # candidates beyond the first k, best first in each row
    for i in np.argsort(-importance[t, s], kind="stable"):
        for slot in np.flatnonzero(spare[t[i]] & ~keep[t[i]]):
            e = candidates[t[i], slot]
            if load[e] < cap:
                keep[t[i], slot] = True
                load[e] += 1
                break
    return keep


def capacity_keep(route: RouterOutput, k: int, gamma: float, rerouting: bool) -> torch.Tensor:
    """keep [T, K] of the capacity rule for a route."""
    imp = route.importance.double().cpu().numpy()
    cand = route.candidates.cpu().numpy()
    active = np.zeros(cand.shape, dtype=bool)
    active[:, :k] = True
    cap = expert_capacity(cand.shape[0], k, route.num_experts, gamma)
    keep = drop_over_capacity(imp, cand, active, cap)
    if rerouting:
        keep = reroute(imp, cand, active, keep, cap)
    return torch.as_tensor(keep, dtype=torch.bool, device=route.candidates.device)


@POLICIES.register("capacity")
@dataclass(frozen=True)
class Capacity(Stateless):
    """Capacity factor gamma > 0; k ≥ 1 experts per token (None: all K candidates); reroute
    overflow to the next candidates with room (True) or drop it (False)."""

    gamma: float = 1.0
    k: int | None = None
    reroute: bool = False
    name: str = "capacity"

    def __post_init__(self) -> None:
        check_range("capacity.gamma", self.gamma, 0.0, np.inf, lo_open=True)
        if self.k is not None:
            check_range("capacity.k", self.k, 1, 1_000_000)

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        k = route.top_k if self.k is None else min(self.k, route.top_k)
        return mask_selection(route, capacity_keep(route, k, self.gamma, self.reroute))
