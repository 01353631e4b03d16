"""Expert selection policies (pure, registered by name)."""

from typing import Any

from wdmoe.policies import topk as _topk  # noqa: F401  (registers "topk")
from wdmoe.policies.base import Policy, check_selection, mask_selection
from wdmoe.policies.registry import POLICIES


def make_policy(name: str, **params: Any) -> Policy:
    """Build a registered policy by name; unknown names raise UnknownNameError."""
    policy: Policy = POLICIES.get(name)(**params)
    return policy


__all__ = ["POLICIES", "Policy", "check_selection", "make_policy", "mask_selection"]
