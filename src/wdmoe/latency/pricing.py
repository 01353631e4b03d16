"""One pricing path: what a layer and a forward cost in the cell (pure).

The simulator, the BS and the latency study price through these two functions, so they cannot
disagree. For device loads n [..., U] (one layer: [U]; a forward: [L, U]):

1. the allocator splits the band per layer on the BS's *estimate* (the view): B [..., U]; one
   allocation per distinct load (the layers of a decode step share a few patterns);
2. at that split, t_u = DL + compute + UL on the *true* channel, T_l = max_{u: n_u > 0} t_u
   (:func:`wdmoe.latency.model.forward_latency`);
3. a forward adds the BS compute of every layer and the LM head: Σ_l (T_l + BS_l) + head.

``expected_s`` is t_u at the same split on the estimate: what the BS can know in advance (its
deadlines trust it).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wdmoe.channel.state import ChannelState
from wdmoe.channel.units import FloatArray
from wdmoe.latency.model import DeviceTimes, Latency, bs_seconds, forward_latency, layer_demand, lm_head_flops
from wdmoe.latency.view import ExpertLatency

if TYPE_CHECKING:
    from wdmoe.allocation.base import Allocator
    from wdmoe.config import ScenarioConfig


@dataclass(frozen=True)
class Priced:
    """Loads n [..., U] priced: the band split B [..., U], the latency on the true channel (per
    device DL/compute/UL [..., U], waits [...]; BS compute and LM head for a forward) and the
    per-device time the BS expected on its estimate [..., U]."""

    device_tokens: FloatArray
    bandwidth_hz: FloatArray
    latency: Latency
    expected_s: FloatArray

    @property
    def wait_s(self) -> FloatArray:
        """T_l [...]: the slowest device with work, on the true channel."""
        return self.latency.waiting_s


def split_band(view: ExpertLatency, allocator: "Allocator", device_tokens: Any) -> FloatArray:
    """B [..., U]: the allocator's split for each layer's loads n [..., U], on the view's estimate."""
    tokens = np.asarray(device_tokens, dtype=np.float64)
    flat = tokens.reshape(-1, tokens.shape[-1])
    loads, inverse = np.unique(flat, axis=0, return_inverse=True)
    splits = np.stack(
        [
            allocator.allocate(layer_demand(n, view.flops_per_s, view.cost), view.channel).bandwidth_hz
            for n in loads
        ]
    )
    return np.asarray(splits[np.asarray(inverse).reshape(-1)].reshape(tokens.shape))


def price(
    view: ExpertLatency,
    true: ChannelState,
    allocator: "Allocator",
    device_tokens: Any,
    bs_s: Any = 0.0,
    head_s: float = 0.0,
) -> Priced:
    """Loads n [..., U] priced on ``true`` at the split decided on ``view`` (module doc)."""
    tokens = np.asarray(device_tokens, dtype=np.float64)
    band = split_band(view, allocator, tokens)
    rates = (true.dl.rate_bps(band), true.ul.rate_bps(band))
    latency = forward_latency(tokens, *rates, view.flops_per_s, view.cost, bs_s, head_s)
    expected = forward_latency(
        tokens, view.channel.dl.rate_bps(band), view.channel.ul.rate_bps(band), view.flops_per_s, view.cost
    ).devices.total_s
    return Priced(tokens, band, latency, expected)


def price_layer(
    view: ExpertLatency, true: ChannelState, allocator: "Allocator", device_tokens: Any
) -> Priced:
    """One MoE layer: loads n [U] → split, per-device times, the wait T_l."""
    return price(view, true, allocator, device_tokens)


def forward_overheads(
    scenario: "ScenarioConfig", new_tokens: int, context_tokens: int
) -> tuple[FloatArray, float]:
    """BS compute per layer [L] and the LM head (s) of a forward of ``new_tokens`` after
    ``context_tokens`` cached ones."""
    flops = scenario.cell.bs_flops_per_s
    bs = bs_seconds(scenario.model, new_tokens, context_tokens, flops)
    return bs, lm_head_flops(scenario.model) / flops


def price_forward(
    view: ExpertLatency,
    true: ChannelState,
    allocator: "Allocator",
    scenario: "ScenarioConfig",
    device_tokens: Any,
    new_tokens: int,
    context_tokens: int,
) -> Priced:
    """One forward: loads n [L, U] of its MoE layers, ``new_tokens`` after ``context_tokens``
    cached ones → per layer as :func:`price_layer`, plus BS compute per layer and the LM head;
    ``latency.total_s`` = Σ_l (T_l + BS_l) + head."""
    return price(
        view, true, allocator, device_tokens, *forward_overheads(scenario, new_tokens, context_tokens)
    )


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
    return Priced(stack("device_tokens"), stack("bandwidth_hz"), latency, stack("expected_s"))
