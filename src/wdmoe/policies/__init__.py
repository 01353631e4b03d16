"""Expert selection policies (pure, registered by name)."""

from wdmoe.policies import budget as _budget  # noqa: F401  (registers "budget")
from wdmoe.policies import capacity as _capacity  # noqa: F401  (registers "capacity")
from wdmoe.policies import dynskip as _dynskip  # noqa: F401  (registers "dynskip")
from wdmoe.policies import joint as _joint  # noqa: F401  (registers "joint")
from wdmoe.policies import marginal as _marginal  # noqa: F401  (registers "marginal")
from wdmoe.policies import priced as _priced  # noqa: F401  (registers "priced")
from wdmoe.policies import slo as _slo  # noqa: F401  (registers "slo")
from wdmoe.policies import topk as _topk  # noqa: F401  (registers "topk")
from wdmoe.policies import topp as _topp  # noqa: F401  (registers "topp")
from wdmoe.policies import wdmoe as _wdmoe  # noqa: F401  (registers "wdmoe")
from wdmoe.policies import wdmoe_j as _wdmoe_j  # noqa: F401  (registers "wdmoe-j")
from wdmoe.policies.base import Policy, check_selection, mask_selection
from wdmoe.policies.registry import POLICIES

# Accepted by every policy but not user settings: the display name and the SLO controller's state.
INTERNAL_PARAMS = ("name", "state")


def make_policy(name: str, **params: object) -> Policy:
    """Build a registered policy by name. An unknown name raises UnknownNameError; a parameter
    the policy does not take, or a value of the wrong type or range, raises ConfigError naming
    the policy, the parameter, the value and the parameters it takes (with their types)."""
    policy: Policy = POLICIES.make(name, params, hidden=INTERNAL_PARAMS)
    return policy


__all__ = [
    "POLICIES",
    "Policy",
    "check_selection",
    "make_policy",
    "mask_selection",
]
