"""`equal`: B/U to every device (the baseline), or B/A to the A devices with work."""

from dataclasses import dataclass

import numpy as np

from wdmoe.allocation.base import ALLOCATORS, Allocation
from wdmoe.channel.state import ChannelState
from wdmoe.latency import LayerDemand


@ALLOCATORS.register("equal")
@dataclass(frozen=True)
class Equal:
    active_only: bool = False
    name: str = "equal"

    def allocate(self, demand: LayerDemand, channel: ChannelState) -> Allocation:
        share = demand.active if self.active_only else np.ones(channel.num_devices, dtype=bool)
        count = max(int(share.sum()), 1)
        return Allocation(np.where(share, channel.bandwidth_hz / count, 0.0), self.name)
