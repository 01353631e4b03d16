"""The allocator protocol, the Allocation value and the registry of allocators."""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from wdmoe.channel.state import ChannelState
from wdmoe.channel.units import FloatArray
from wdmoe.errors import WdmoeError
from wdmoe.latency import LayerDemand
from wdmoe.registry import Factories


class InfeasibleAllocationError(WdmoeError, ValueError):
    """No split of the band meets the requested latency target."""


@dataclass(frozen=True)
class Allocation:
    """Bandwidth B_u [U] in Hz given to each device in each direction (Σ_u B_u ≤ B)."""

    bandwidth_hz: FloatArray
    allocator: str

    def __post_init__(self) -> None:
        assert np.all(self.bandwidth_hz >= 0), f"negative bandwidth: {self.bandwidth_hz}"
        self.bandwidth_hz.setflags(write=False)


class Allocator(Protocol):
    """A pure function: one layer's demand + a channel snapshot → Allocation."""

    name: str

    def allocate(self, demand: LayerDemand, channel: ChannelState) -> Allocation: ...


ALLOCATORS: Factories[Allocator] = Factories("bandwidth allocator")
