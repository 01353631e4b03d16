"""Registry of selection policies: ``POLICIES.get(name)(**params)``."""

from typing import Any

from wdmoe.registry import Registry

POLICIES: Registry[Any] = Registry("policy")
