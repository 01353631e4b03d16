"""The selection-policy protocol and the helpers every policy shares."""

from typing import Any, Protocol

import torch

from wdmoe.errors import SelectionError
from wdmoe.types import RouterOutput, Selection


class Policy(Protocol):
    """A pure function of a snapshot: router output (+ channel, latency model) → Selection.

    A policy may only drop candidates (never add experts), must keep ≥ 1 expert per token,
    and leaves the weight arithmetic to :func:`mask_selection`.
    """

    name: str

    def select(self, route: RouterOutput, channel: Any = None, latency: Any = None) -> Selection: ...


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
