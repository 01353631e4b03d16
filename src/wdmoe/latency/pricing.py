"""One pricing path: what a layer and a forward cost in the cell (pure).

The simulator, the BS and the latency study price through these two functions, so they cannot
disagree. For device loads n [..., U] (one layer: [U]; a forward: [L, U]):

1. the allocator splits the band per layer on the BS's *estimate* (the view): B [..., U]; one
   allocation per distinct load (the layers of a decode step share a few patterns);
2. at that split, t_u = DL + compute + UL on the *true* channel
   (:func:`wdmoe.latency.model.forward_latency`), ``expected_s`` t̂_u the same on the estimate;
   with ``Calls.overhead_s`` the software's own cost per message ô_u [U] joins τ0 in the compute
   of every busy device, for the split, t_u and t̂_u alike (:mod:`wdmoe.latency.overhead`);
3. with a :class:`~wdmoe.latency.deadline.DeadlineRule` the calls are settled
   (:func:`~wdmoe.latency.deadline.settle`): each gets its budget from t̂_u, a call over a link
   truly in outage is lost at its budget, a late one cut there, and the layer waits
   T_l = max_{u: n_u > 0} min(t_u, b_u); without one, T_l = max_{u: n_u > 0} t_u;
4. a forward adds the BS compute of every layer and the LM head: Σ_l (T_l + BS_l) + head.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from wdmoe.channel.state import ChannelState
from wdmoe.channel.units import BoolArray, FloatArray
from wdmoe.latency.deadline import DeadlineRule, settle
from wdmoe.latency.model import DeviceTimes, Latency, bs_seconds, forward_latency, layer_demand, lm_head_flops
from wdmoe.latency.view import ExpertLatency

if TYPE_CHECKING:
    from wdmoe.allocation.base import Allocator
    from wdmoe.config import ScenarioConfig


@dataclass(frozen=True)
class Priced:
    """Loads n [..., U] priced: the band split B [..., U], the latency on the true channel (per
    device DL/compute/UL [..., U], waits [...]; BS compute and LM head for a forward), the
    per-device time the BS expected on its estimate [..., U], each call's budget [..., U] (s of
    the cell; ∞ without a deadline rule) and which calls were cut late or lost to outage."""

    device_tokens: FloatArray
    bandwidth_hz: FloatArray
    latency: Latency
    expected_s: FloatArray
    budget_s: FloatArray
    late: BoolArray
    down: BoolArray

    def take(self, index: int) -> "Priced":
        """The prices of one leading index (e.g. one row of loads [R, U] priced at once)."""
        d, lat = self.latency.devices, self.latency
        devices = DeviceTimes(d.downlink_s[index], d.compute_s[index], d.uplink_s[index])
        latency = Latency(devices, lat.waiting_s[index], lat.bs_s[index], lat.head_s)
        arrays = (self.expected_s, self.budget_s, self.late, self.down)
        return Priced(
            self.device_tokens[index], self.bandwidth_hz[index], latency, *(a[index] for a in arrays)
        )

    @property
    def cut(self) -> BoolArray:
        """Calls cut late or lost to outage (:attr:`wdmoe.latency.deadline.Settled.cut`)."""
        return np.asarray(self.late | self.down)

    @property
    def wait_s(self) -> FloatArray:
        """T_l [...]: what the BS waited for its slowest device with work, on the true channel
        (at most each call's budget when the calls were settled)."""
        return self.latency.waiting_s


def split_band(view: ExpertLatency, allocator: "Allocator", device_tokens: Any) -> FloatArray:
    """B [..., U]: the allocator's split for each layer's loads n [..., U], on the view's estimate."""
    tokens = np.asarray(device_tokens, dtype=np.float64)
    if tokens.ndim == 1:  # one layer (as the BS prices while it runs): one allocation
        demand = layer_demand(tokens, view.flops_per_s, view.cost)
        return np.asarray(allocator.allocate(demand, view.channel).bandwidth_hz, dtype=np.float64)
    flat = tokens.reshape(-1, tokens.shape[-1])
    loads, inverse = np.unique(flat, axis=0, return_inverse=True)
    splits = np.stack(
        [
            allocator.allocate(layer_demand(n, view.flops_per_s, view.cost), view.channel).bandwidth_hz
            for n in loads
        ]
    )
    return np.asarray(splits[np.asarray(inverse).reshape(-1)].reshape(tokens.shape))


@dataclass(frozen=True)
class Calls:
    """How device calls are settled: the deadline rule, the true link states [U] (None: all up),
    the runtime's wall seconds per second of the cell (budgets are wall seconds), for a request
    priced after the batch it travelled in, how the batch's calls were settled (late, down [U];
    :func:`~wdmoe.latency.deadline.settle`), and the software's own cost per message ô_u [U] (s of
    the cell; None: not priced), added to every busy device's t_u (:mod:`~wdmoe.latency.overhead`)."""

    rule: DeadlineRule
    true_up: Any = None
    time_scale: float = 1.0
    late: Any = None
    down: Any = None
    overhead_s: Any = None


def price(
    view: ExpertLatency,
    true: ChannelState,
    allocator: "Allocator",
    device_tokens: Any,
    bs_s: Any = 0.0,
    head_s: float = 0.0,
    calls: Calls | None = None,
) -> Priced:
    """Loads n [..., U] priced on ``true`` at the split decided on ``view``, calls settled by
    ``calls`` (None: waited for however long they take) (module doc)."""
    tokens = np.asarray(device_tokens, dtype=np.float64)
    if calls is not None and calls.overhead_s is not None:  # τ0 + ô_u: for the split, t_u and t̂_u
        cost = replace(view.cost, overhead_s=view.cost.overhead_s + np.asarray(calls.overhead_s, dtype=float))
        view = replace(view, cost=cost)
    band = split_band(view, allocator, tokens)
    rates = (true.dl.rate_bps(band), true.ul.rate_bps(band))
    latency = forward_latency(tokens, *rates, view.flops_per_s, view.cost, bs_s, head_s)
    expected = forward_latency(
        tokens, view.channel.dl.rate_bps(band), view.channel.ul.rate_bps(band), view.flops_per_s, view.cost
    ).devices.total_s
    if calls is None:
        never = np.zeros(tokens.shape, dtype=bool)
        return Priced(tokens, band, latency, expected, np.full(tokens.shape, np.inf), never, never)
    budget = calls.rule.budgets_s(expected, calls.time_scale) / calls.time_scale
    up = np.ones(tokens.shape[-1], dtype=bool) if calls.true_up is None else calls.true_up
    settled = settle(latency.devices.total_s, budget, tokens, up, calls.late, calls.down)
    latency = replace(latency, waiting_s=settled.layer_s)
    return Priced(tokens, band, latency, expected, budget, settled.late, settled.down)


def price_layer(
    view: ExpertLatency,
    true: ChannelState,
    allocator: "Allocator",
    device_tokens: Any,
    calls: Calls | None = None,
) -> Priced:
    """One MoE layer: loads n [U] → split, per-device times, calls settled, the wait T_l."""
    return price(view, true, allocator, device_tokens, calls=calls)


def forward_overheads(
    scenario: "ScenarioConfig", new_tokens: int, context_tokens: int
) -> tuple[FloatArray, float]:
    """BS compute per layer [L] and the LM head (s) of a forward of ``new_tokens`` after
    ``context_tokens`` cached ones."""
    flops = scenario.cell.bs_flops_per_s
    bs = bs_seconds(scenario.model, new_tokens, context_tokens, flops)
    return bs, lm_head_flops(scenario.model) / flops


def rows_overheads(
    scenario: "ScenarioConfig", new_tokens: Sequence[int], context_tokens: Sequence[int]
) -> tuple[FloatArray, float]:
    """BS compute per layer [L] and the LM head (s) of one forward serving several requests
    together (continuous batching): row r computes ``new_tokens[r]`` tokens after its own
    ``context_tokens[r]`` cached ones; FLOPs add up over rows, and every row needs the head once
    (its next token)."""
    bs = sum(
        (forward_overheads(scenario, n, c)[0] for n, c in zip(new_tokens, context_tokens, strict=True)),
        np.zeros(scenario.model.num_layers),
    )
    return bs, len(new_tokens) * forward_overheads(scenario, 1, 0)[1]


def price_forward(
    view: ExpertLatency,
    true: ChannelState,
    allocator: "Allocator",
    scenario: "ScenarioConfig",
    device_tokens: Any,
    new_tokens: int,
    context_tokens: int,
    calls: Calls | None = None,
) -> Priced:
    """One forward on one snapshot: loads n [L, U] of its MoE layers, ``new_tokens`` after
    ``context_tokens`` cached ones → per layer as :func:`price_layer`, plus BS compute per layer
    and the LM head; ``latency.total_s`` = Σ_l (T_l + BS_l) + head."""
    overheads = forward_overheads(scenario, new_tokens, context_tokens)
    return price(view, true, allocator, device_tokens, *overheads, calls=calls)


def stack_layers(layers: Sequence[Priced], bs_s: Any, head_s: float) -> Priced:
    """A forward from its layers priced one by one ([U] each, as the BS prices them while they run):
    the same value :func:`price_forward` gives for their loads [L, U] at once."""
    d = [p.latency.devices for p in layers]
    devices = DeviceTimes(
        *(np.stack([getattr(t, f) for t in d]) for f in ("downlink_s", "compute_s", "uplink_s"))
    )
    waits = np.stack([p.latency.waiting_s for p in layers])
    bs = np.broadcast_to(np.asarray(bs_s, dtype=np.float64), waits.shape)
    latency = Latency(devices, waits, bs, head_s)
    stack = lambda f: np.stack([getattr(p, f) for p in layers])  # noqa: E731
    fields = ("expected_s", "budget_s", "late", "down")
    return Priced(stack("device_tokens"), stack("bandwidth_hz"), latency, *(stack(f) for f in fields))
