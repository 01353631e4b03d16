"""Bandwidth allocators (pure, registered by name): demand + channel snapshot → Allocation.

make_allocator("minmax").allocate(layer_demand(tokens, flops, cost), channel_state)
"""

from wdmoe.allocation import energy as _energy  # noqa: F401  (registers "energy")
from wdmoe.allocation import equal as _equal  # noqa: F401  (registers "equal")
from wdmoe.allocation import minmax as _minmax  # noqa: F401  (registers "minmax")
from wdmoe.allocation import proportional as _proportional  # noqa: F401  (registers "proportional")
from wdmoe.allocation.base import ALLOCATORS, Allocation, Allocator, InfeasibleAllocationError


def make_allocator(name: str, **params: object) -> Allocator:
    """Build a registered allocator by name; unknown names raise UnknownNameError."""
    allocator: Allocator = ALLOCATORS.get(name)(**params)
    return allocator


__all__ = ["ALLOCATORS", "Allocation", "Allocator", "InfeasibleAllocationError", "make_allocator"]
