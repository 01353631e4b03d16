"""What the BS believes an expert costs now: the latency view a channel-aware policy receives.

A policy decides on the channel *as the BS estimates it* (possibly stale or noisy CSI), while
the simulator accounts latency on the true channel; both go through the same arithmetic of
:mod:`wdmoe.latency.model` (nothing is re-derived here):

    n_u   = Σ_{e: place(e) = u} n_e          tokens of device u (one message per device and layer)
    t_u   = device_time_s(layer_demand(n_u, C_u, cost), channel, B_u)                      [s]
    t_e   = t_{place(e)}(n = 1)              per-expert per-token latency, what WLR divides by

Shapes: placement [E] (expert → device), C_u and B_u [U]; loads [..., E] or [..., U].
"""

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wdmoe.channel.state import ChannelState
from wdmoe.channel.units import BoolArray, FloatArray
from wdmoe.formats import choose_formats, link_snr_db
from wdmoe.latency.devices import devices_for, effective_flops_per_s
from wdmoe.latency.model import DeviceTimes, ExpertCost, device_time_s, device_times, layer_demand, waiting_s

if TYPE_CHECKING:
    from wdmoe.allocation.base import Allocator
    from wdmoe.config import ScenarioConfig

IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class ExpertLatency:
    """A snapshot of expert costs: channel estimate, expert cost, compute, placement, bandwidth.

    channel: the BS's channel estimate; cost: message sizes / FLOPs / τ0; flops_per_s: C_u [U];
    placement: device of each expert [E]; bandwidth_hz: B_u [U] per direction; up: whether the
    BS can reach device u [U] (its link is not in outage on the estimate; None: every device).
    A device it cannot reach takes t_u = ∞ for any work.
    """

    channel: ChannelState
    cost: ExpertCost
    flops_per_s: FloatArray
    placement: IntArray
    bandwidth_hz: FloatArray
    up: BoolArray | None = None

    def __post_init__(self) -> None:
        u = self.channel.num_devices
        assert self.flops_per_s.shape == (u,), f"flops_per_s {self.flops_per_s.shape} != ({u},)"
        assert self.bandwidth_hz.shape == (u,), f"bandwidth_hz {self.bandwidth_hz.shape} != ({u},)"
        assert self.placement.ndim == 1 and self.placement.min() >= 0 and self.placement.max() < u, (
            f"placement {self.placement} must map experts to devices 0..{u - 1}"
        )
        for array in (self.flops_per_s, self.placement, self.bandwidth_hz):
            array.setflags(write=False)
        if self.up is not None:
            assert self.up.shape == (u,), f"up {self.up.shape} != ({u},)"
            self.up.setflags(write=False)

    @classmethod
    def build(
        cls,
        channel: ChannelState,
        cost: ExpertCost,
        flops_per_s: Any,
        placement: Any = None,
        bandwidth_hz: Any = None,
        up: Any = None,
    ) -> "ExpertLatency":
        """Defaults: expert e on device e (E = U), the equal split B/U, every device reachable."""
        u = channel.num_devices
        place = np.arange(u) if placement is None else np.asarray(placement, dtype=np.int64)
        band = channel.equal_share_hz() if bandwidth_hz is None else np.array(bandwidth_hz, np.float64)
        flops = np.broadcast_to(np.asarray(flops_per_s, dtype=np.float64), (u,)).copy()
        reach = None if up is None else np.array(up, dtype=bool)
        return cls(channel, cost, flops, place.astype(np.int64), band, reach)

    @classmethod
    def from_scenario(
        cls,
        scenario: "ScenarioConfig",
        channel: ChannelState,
        placement: Any = None,
        bandwidth_hz: Any = None,
        up: Any = None,
    ) -> "ExpertLatency":
        """The scenario's expert cost and device classes on ``channel`` (each device's wire format
        by :func:`device_formats`)."""
        flops = effective_flops_per_s(devices_for(scenario.cell.device_classes, channel.num_devices))
        cost = ExpertCost.from_config(scenario)
        formats = device_formats(scenario, channel)
        cost = cost.with_formats(formats) if formats else cost
        return cls.build(channel, cost, flops, placement, bandwidth_hz, up)

    @property
    def num_experts(self) -> int:
        return int(self.placement.shape[0])

    def unreachable_experts(self) -> BoolArray:
        """[E] experts whose device the BS cannot reach (its link is in outage on the estimate)."""
        if self.up is None:
            return np.zeros(self.num_experts, dtype=bool)
        return np.asarray(~self.up[self.placement])

    def device_tokens(self, expert_tokens: Any) -> FloatArray:
        """n_u [..., U] = Σ_{e on u} n_e from expert loads n_e [..., E]."""
        n = np.asarray(expert_tokens, dtype=np.float64)
        onehot = np.eye(self.channel.num_devices)[self.placement]  # [E, U]
        return np.asarray(n @ onehot)

    def device_time_s(self, device_tokens: Any) -> FloatArray:
        """t_u [..., U] for device loads n_u [..., U] on the estimated channel at B_u (∞ for work on
        a device the BS cannot reach)."""
        demand = layer_demand(device_tokens, self.flops_per_s, self.cost)
        t = device_time_s(demand, self.channel, self.bandwidth_hz)
        if self.up is None:
            return t
        return np.asarray(np.where(self.up | (demand.tokens <= 0), t, np.inf))

    def expert_time_s(self, expert_tokens: Any) -> FloatArray:
        """[..., E] the time of each expert's device when the experts carry loads n_e [..., E]."""
        return self.device_time_s(self.device_tokens(expert_tokens))[..., self.placement]

    def per_token_s(self) -> FloatArray:
        """t_e [E]: the time of expert e's device serving one token alone (the WLR denominator).
        Computed once per snapshot (every MoE layer of a forward asks for it)."""
        cached = self.__dict__.get("_per_token_s")
        if cached is None:
            cached = self.device_time_s(np.ones(self.channel.num_devices))[self.placement]
            cached.setflags(write=False)
            object.__setattr__(self, "_per_token_s", cached)
        return cached.copy()  # callers may hand it to torch, which wants a writable array

    def layer_time_s(self, expert_tokens: Any) -> FloatArray:
        """T_l [...] = the slowest device with work, for expert loads n_e [..., E]."""
        n_u = self.device_tokens(expert_tokens)
        return waiting_s(self.device_time_s(n_u), n_u)

    def with_bandwidth(self, bandwidth_hz: Any) -> "ExpertLatency":
        return replace(self, bandwidth_hz=np.array(bandwidth_hz, dtype=np.float64))

    def allocate(self, allocator: "Allocator", expert_tokens: Any) -> "ExpertLatency":
        """The same view with the allocator's split of the band for expert loads n_e [E]."""
        return self.allocate_devices(allocator, self.device_tokens(expert_tokens))

    def allocate_devices(self, allocator: "Allocator", device_tokens: Any) -> "ExpertLatency":
        """The same view with the allocator's split of the band for device loads n_u [U]."""
        demand = layer_demand(device_tokens, self.flops_per_s, self.cost)
        return self.with_bandwidth(allocator.allocate(demand, self.channel).bandwidth_hz)

    def times_on(self, channel: ChannelState, device_tokens: Any) -> DeviceTimes:
        """t_u's parts [U] for device loads n_u [U] at this view's bandwidth B_u on ``channel``
        (e.g. the true channel, where the view holds the BS's estimate)."""
        return device_times(
            device_tokens,
            channel.dl.rate_bps(self.bandwidth_hz),
            channel.ul.rate_bps(self.bandwidth_hz),
            self.flops_per_s,
            self.cost,
        )


def device_formats(scenario: "ScenarioConfig", channel: ChannelState) -> tuple[str, ...]:
    """Each device's wire format [U] on ``channel`` (the BS's estimate): ``wire.format`` for all,
    or the adaptive rule on their link SNRs (:func:`wdmoe.formats.choose_formats`); () for "none"."""
    w = scenario.wire
    if w.format == "none":
        return ()
    if w.format != "adaptive":
        return (w.format,) * channel.num_devices
    return choose_formats(link_snr_db(channel), w.adaptive_formats, w.adaptive_snr_db)
