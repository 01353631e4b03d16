"""The selection-policy protocol and the helpers every policy shares."""

from typing import Protocol, Self

import torch

from wdmoe.errors import ConfigError, SelectionError
from wdmoe.latency.view import ExpertLatency
from wdmoe.types import Feedback, RouterOutput, Selection


class Policy(Protocol):
    """A pure function of a snapshot: router output + the BS's latency view → Selection.

    A policy may only drop candidates (never add experts), must keep ≥ 1 expert per token,
    and leaves the weight arithmetic to :func:`mask_selection`. ``view`` is None where no cell is
    attached (channel-blind policies need none). After every forward the simulator and the BS tell
    the policy what it cost (``observe``) and install the policy it returns; ``begin_request``
    likewise at the start of each request. Policies are immutable values: feedback policies carry
    their state and return an updated copy.
    """

    name: str

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection: ...

    def observe(self, feedback: Feedback) -> "Policy": ...

    def begin_request(self) -> "Policy": ...


class Stateless:
    """The feedback half of :class:`Policy` for policies that learn nothing: they stay as they are."""

    def observe(self, feedback: Feedback) -> Self:
        return self

    def begin_request(self) -> Self:
        return self


def require_latency(policy: str, view: ExpertLatency | None) -> ExpertLatency:
    """The latency view a channel-aware policy needs, or a ConfigError that says how to give it."""
    if not isinstance(view, ExpertLatency):
        raise ConfigError(
            f"policy {policy!r} is channel-aware and needs an ExpertLatency view, got "
            f"{type(view).__name__}; pass it as select(route, view) or run the model in a cell "
            "(WirelessModel.set_view, the simulator or the BS)"
        )
    return view


def mask_selection(route: RouterOutput, keep: torch.Tensor) -> Selection:
    """Apply a keep mask [T, K] to the router's weights.

    The best candidate of a token that would lose all of them is kept. When the model combines
    with softmax weights (``route.renormalize``), survivors are rescaled so that each token keeps
    its original total weight: w'_k = w_k·m_k · Σ_j w_j / Σ_j w_j·m_j.
    """
    keep = keep.clone()
    empty = ~keep.any(dim=-1)
    keep[empty, 0] = True
    weights = route.weights * keep
    if route.renormalize:
        total = route.weights.sum(dim=-1, keepdim=True)
        weights = weights * (total / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30))
    return Selection(keep=keep, weights=weights)


def check_selection(route: RouterOutput, sel: Selection) -> None:
    """Raise :class:`SelectionError` if a selection breaks a policy invariant."""
    if sel.keep.shape != route.candidates.shape or sel.keep.dtype != torch.bool:
        raise SelectionError(
            f"keep mask must be bool {tuple(route.candidates.shape)}, "
            f"got {sel.keep.dtype} {tuple(sel.keep.shape)}"
        )
    if not bool(sel.keep.any(dim=-1).all()):
        bad = (~sel.keep.any(dim=-1)).nonzero().flatten().tolist()
        raise SelectionError(f"selection keeps no expert for tokens {bad[:10]}")
    if bool((sel.weights[~sel.keep] != 0).any()):
        raise SelectionError("a dropped candidate has a non-zero combine weight")
