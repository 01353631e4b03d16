"""Bandwidth allocators (pure, registered by name): demand + channel snapshot → Allocation.

make_allocator("minmax").allocate(layer_demand(tokens, flops, cost), channel_state)
"""

from typing import TYPE_CHECKING

from wdmoe.allocation import energy as _energy  # noqa: F401  (registers "energy")
from wdmoe.allocation import equal as _equal  # noqa: F401  (registers "equal")
from wdmoe.allocation import minmax as _minmax  # noqa: F401  (registers "minmax")
from wdmoe.allocation import proportional as _proportional  # noqa: F401  (registers "proportional")
from wdmoe.allocation.base import ALLOCATORS, Allocation, Allocator, InfeasibleAllocationError
from wdmoe.allocation.energy import energy_params

if TYPE_CHECKING:
    from wdmoe.config import ScenarioConfig


def allocator_for(name: str, scenario: "ScenarioConfig", energy_slack: float = 0.1) -> Allocator:
    """The allocator ``name`` as a cell runs it — the simulator and the BS alike: ``energy`` with
    ``energy_slack`` and the scenario's device radios; the others as registered."""
    params = energy_params(scenario, energy_slack) if name == "energy" else {}
    return make_allocator(name, **params)


def make_allocator(name: str, **params: object) -> Allocator:
    """Build a registered allocator by name; unknown names raise UnknownNameError."""
    allocator: Allocator = ALLOCATORS.get(name)(**params)
    return allocator


__all__ = [
    "ALLOCATORS",
    "Allocation",
    "Allocator",
    "InfeasibleAllocationError",
    "allocator_for",
    "make_allocator",
]
