"""`proportional`: a heuristic — each device with work gets bandwidth in proportion to the
bandwidth-seconds its bits need at the spectral efficiency it would have on an equal share:
    B_u ∝ Σ_dir bits_u,dir / η_u,dir(B/A),   A = number of devices with work.
Equalises the air time when spectral efficiencies do not depend on B_u; ignores compute."""

from dataclasses import dataclass

import numpy as np

from wdmoe.allocation.base import ALLOCATORS, Allocation
from wdmoe.channel.state import ChannelState
from wdmoe.latency import LayerDemand


@ALLOCATORS.register("proportional")
@dataclass(frozen=True)
class Proportional:
    name: str = "proportional"

    def allocate(self, demand: LayerDemand, channel: ChannelState) -> Allocation:
        active = demand.active
        if not active.any():
            return Allocation(np.zeros(channel.num_devices), self.name)
        share_hz = np.full(channel.num_devices, channel.bandwidth_hz / active.sum())
        need = demand.downlink_bits / channel.dl.spectral_efficiency(share_hz)
        need = need + demand.uplink_bits / channel.ul.spectral_efficiency(share_hz)
        need = np.where(active, need, 0.0)
        return Allocation(channel.bandwidth_hz * need / need.sum(), self.name)
