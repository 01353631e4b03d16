"""Registry of selection policies: ``POLICIES.get(name)(**params)``."""

from typing import TYPE_CHECKING

from wdmoe.registry import Factories

if TYPE_CHECKING:
    from wdmoe.policies.base import Policy

POLICIES: "Factories[Policy]" = Factories("policy")
