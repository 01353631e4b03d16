"""`marginal`: drop a candidate only when its importance does not pay for what it really adds to the
layer's wait under the bandwidth allocator — straggler-aware selection (beyond the paper, issue 14).

With min-max bandwidth every busy device finishes together, but not at the same price per token: a
weak device is power-limited (its rate B·log2(1 + P·h/(N0·B)) saturates at P·h/(N0·ln 2) as B
grows), so once it holds most of the band one more of its tokens lengthens the layer by far more
than its time on the equal share t_u(1) suggests, while a token of a strong device adds almost
nothing (on the paper cell, 4–5× more and 5–14× less). WDMoE-θ prices both by t_u(1). Here:

    c_u = T(n) − T(n − e_u)       [ms per token] the layer's wait T (the allocator's split of the
                                   band for device loads n, on the BS's estimate) saved by one token
                                   less on device u
    drop (j, u)  iff  w_ju < λ·c_u,
λ ≥ 0 in importance per ms of wait (``price_per_ms``; 0 drops nothing but unreachable candidates).
c depends on the loads, so the rule is applied in rounds: each round recomputes c at the loads
kept so far and drops, per device, at most ``step`` (a fraction) of its load, lowest importance
first; it stops when a round drops nothing, after ``rounds`` rounds. Rounds only drop. T is
homogeneous of degree one in n when airtime dominates, so c reads the same for a batch of rows as
for each row alone (the simulator prices every row as its own request).

``protect_top1`` (default) never drops a token's top-1, as WDMoE-θ. Without it a top-1 on the
device that sets the wait may go too when it does not pay for itself: the straggler's top-1 tokens
are then what bounds the wait, and only they can shorten it further; a token always keeps ≥ 1
expert. Candidates on a device the BS cannot reach are dropped (a top-1 stays in the mask; the
simulator skips it).
Cost: (U + 1) allocations per round (≈ 0.6 ms each for min-max with U = 8).
"""

from dataclasses import dataclass

import numpy as np
import torch

from wdmoe.allocation import make_allocator
from wdmoe.allocation.base import Allocator
from wdmoe.channel.units import BoolArray, FloatArray
from wdmoe.config import check_range
from wdmoe.latency.model import waiting_s
from wdmoe.latency.view import ExpertLatency, IntArray
from wdmoe.policies.base import Stateless, mask_selection, require_latency
from wdmoe.policies.registry import POLICIES
from wdmoe.types import RouterOutput, Selection


def wait_s(view: ExpertLatency, allocator: Allocator, device_tokens: FloatArray) -> float:
    """T [s]: the layer's wait for device loads n [U] at the allocator's split on the view."""
    if not (device_tokens > 0).any():
        return 0.0
    split = view.allocate_devices(allocator, device_tokens)
    return float(waiting_s(split.device_time_s(device_tokens), device_tokens))


def marginal_ms(view: ExpertLatency, allocator: Allocator, device_tokens: FloatArray) -> FloatArray:
    """c [U] = T(n) − T(n − e_u) in ms for every device with work (0 for the others)."""
    base = wait_s(view, allocator, device_tokens)
    out = np.zeros(device_tokens.shape[0])
    for u in np.flatnonzero(device_tokens > 0):
        less = device_tokens.copy()
        less[u] -= 1.0
        out[u] = (base - wait_s(view, allocator, less)) * 1e3
    return out


def drop_round(
    keep: BoolArray,
    importance: FloatArray,
    device: IntArray,
    cost_ms: FloatArray,
    price: float,
    step: float,
    first_slot: int = 1,
) -> BoolArray:
    """One round: per device u, drop the kept pairs (slot ≥ ``first_slot``; 1: never a top-1) with
    w < λ·c_u, lowest w first, at most ⌈step·n_u⌉ of them (n_u: the device's kept pairs).
    keep, importance, device: [T, K]; cost_ms: c [U] (ms per token); price: λ (importance per ms)."""
    keep = keep.copy()
    for u in np.flatnonzero(cost_ms > 0):
        mine = keep & (device == u)
        t, s = np.nonzero(mine & (importance < price * cost_ms[u]))
        t, s = t[s >= first_slot], s[s >= first_slot]
        if t.size:
            first = np.argsort(importance[t, s], kind="stable")[: int(np.ceil(step * mine.sum()))]
            keep[t[first], s[first]] = False
    return keep


def marginal_keep(
    route: RouterOutput,
    view: ExpertLatency,
    allocator: Allocator,
    price: float,
    rounds: int,
    step: float,
    protect_top1: bool = True,
) -> torch.Tensor:
    """keep [T, K] of the marginal rule (module doc)."""
    device = view.placement[route.candidates.cpu().numpy()]
    importance = route.importance.double().cpu().numpy()
    up = ~view.unreachable_experts()[route.candidates.cpu().numpy()]
    keep = up.copy()
    keep[:, 0] = True
    u = view.channel.num_devices
    for _ in range(rounds):
        loads = np.bincount(device[keep & up], minlength=u).astype(np.float64)
        nxt = drop_round(
            keep, importance, device, marginal_ms(view, allocator, loads), price, step, int(protect_top1)
        )
        nxt[~nxt.any(axis=1), 0] = True  # a token never loses its last expert
        if np.array_equal(nxt, keep):
            break
        keep = nxt
    return torch.as_tensor(keep, dtype=torch.bool, device=route.candidates.device)


@POLICIES.register("marginal")
@dataclass(frozen=True)
class Marginal(Stateless):
    """Drop a candidate iff importance < price_per_ms (≥ 0) × the ms one token less on its device saves
    the layer under ``allocator``; rounds ≥ 1, step ∈ (0, 1] of a device's load per round;
    protect_top1: never a token's top-1."""

    price_per_ms: float = 0.05
    allocator: str = "minmax"
    rounds: int = 8
    step: float = 0.25
    protect_top1: bool = True
    name: str = "marginal"

    def __post_init__(self) -> None:
        check_range("marginal.price_per_ms", self.price_per_ms, 0.0, np.inf)
        check_range("marginal.rounds", self.rounds, 1, 1000)
        check_range("marginal.step", self.step, 0.0, 1.0, lo_open=True)
        make_allocator(self.allocator)  # unknown names fail here, at build time

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        view = require_latency(self.name, view)
        allocator = make_allocator(self.allocator)
        keep = marginal_keep(
            route, view, allocator, self.price_per_ms, self.rounds, self.step, self.protect_top1
        )
        return mask_selection(route, keep)
