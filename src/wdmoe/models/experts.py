"""One expert's weights and its forward: the unit a device holds and runs.

In transformers 5.x a layer's experts are one fused module and expert e is the slice [e] of its
tensors. Most families store ``gate_up_proj`` [E, 2F, D] (gate rows, then up rows) and
``down_proj`` [E, D, F] and compute y = down · (act(x·Wg) ⊙ x·Wu). Some differ, and say so with the
flags transformers' ``use_experts_implementation`` sets on the module (:class:`ExpertLayout`):
GPT-OSS stores them transposed ([E, D, 2F], [E, F, D]), interleaves gate and up columns
(g0, u0, g1, u1, …), adds biases and gates with a clamped SwiGLU.

A shard (what a device holds) is always in one canonical layout — ``gate_up`` [2F, D] (gate rows
then up rows), ``down`` [D, F], optional biases [2F] and [D] — and names its gating by a string
(:func:`glu`), so a device runs every family with one function and without transformers.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Glu = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate [n, F], up [n, F]) → [n, F]


@dataclass(frozen=True)
class ExpertWeights:
    """A standalone expert in the canonical layout: gate_up [2F, D], down [D, F], optional biases
    gate_up_bias [2F] and down_bias [D], and its gating's name (see :func:`glu`)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    act: str = "silu"
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.down.shape[0])


def expert_forward(gate_up: torch.Tensor, down: torch.Tensor, act: Callable, x: torch.Tensor) -> torch.Tensor:
    """y = down · (act(x·Wg) ⊙ x·Wu) for x [n, D] → y [n, D] (the transformers 5.x arithmetic)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(act(gate) * up, down)


LIGHT_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called ``name`` as transformers defines it; the common ones without importing
    transformers (a device worker stays small: its import costs ~120 MB and seconds on a board)."""
    if name in LIGHT_ACTIVATIONS:
        return LIGHT_ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]  # type: ignore[no-any-return]


CLAMPED = re.compile(r"clamped_swiglu:alpha=([-+.\deE]+):limit=([-+.\deE]+)")


def clamped_swiglu_name(alpha: float, limit: float) -> str:
    """The gating name of GPT-OSS's experts (``repr`` keeps the floats exact)."""
    return f"clamped_swiglu:alpha={alpha!r}:limit={limit!r}"


def glu(name: str) -> Glu:
    """The gating called ``name``: an activation name (act(gate) ⊙ up), or GPT-OSS's
    ``clamped_swiglu:alpha=a:limit=L``: g = min(gate, L), u = clamp(up, −L, L),
    (u + 1) ⊙ g ⊙ σ(a·g)."""
    match = CLAMPED.fullmatch(name)
    if match is None:
        act = activation(name)
        return lambda gate, up: act(gate) * up
    alpha, limit = float(match[1]), float(match[2])

    def clamped(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return clamped


def run_expert(weights: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """Run a standalone expert on x [n, D] → [n, D]."""
    gate, up = F.linear(x, weights.gate_up, weights.gate_up_bias).chunk(2, dim=-1)
    return F.linear(glu(weights.act)(gate, up), weights.down, weights.down_bias)


@dataclass(frozen=True)
class ExpertLayout:
    """How a fused experts module stores its tensors (transformers' own flags, or the adapter's).

    transposed: gate_up_proj [E, D, 2F] and down_proj [E, F, D] (y = x @ W) instead of
        [E, 2F, D] and [E, D, F] (y = x · Wᵀ).
    concatenated: gate_up columns are [gate | up]; False: interleaved g0, u0, g1, u1, … (GPT-OSS).
    bias: the module has gate_up_proj_bias [E, 2F] and down_proj_bias [E, D].
    """

    transposed: bool = False
    concatenated: bool = True
    bias: bool = False

    @classmethod
    def of(cls, experts: Any, transposed: bool | None = None) -> "ExpertLayout":
        """The layout transformers declares on ``experts`` (``use_experts_implementation``)."""
        declared = bool(getattr(experts, "is_transposed", False))
        return cls(
            declared if transposed is None else transposed,
            bool(getattr(experts, "is_concatenated", True)),
            bool(getattr(experts, "has_bias", False)),
        )

    def params(self) -> tuple[str, ...]:
        """The names of the module's per-expert tensors."""
        extra = ("gate_up_proj_bias", "down_proj_bias") if self.bias else ()
        return ("gate_up_proj", "down_proj", *extra)


def expert_size(experts: Any, layout: ExpertLayout) -> int:
    """F, one expert's inner width."""
    return int(experts.down_proj.shape[1 if layout.transposed else 2])


def run_fused(experts: Any, layout: ExpertLayout, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a fused module on x [n, D] → [n, D], in its own layout and with its own
    gating (``_apply_gate``, which transformers gives every decorated experts class)."""
    gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]
    h = x @ gate_up if layout.transposed else F.linear(x, gate_up)
    if layout.bias:
        h = h + experts.gate_up_proj_bias[e]
    if hasattr(experts, "_apply_gate"):
        a = experts._apply_gate(h)
    else:  # Llama 4's experts: [gate | up], act(gate) ⊙ up
        gate, up = h.chunk(2, dim=-1)
        a = experts.act_fn(gate) * up
    y = a @ down if layout.transposed else F.linear(a, down)
    return y + experts.down_proj_bias[e] if layout.bias else y


def canonical_expert(experts: Any, layout: ExpertLayout, e: int, act: str) -> ExpertWeights:
    """Expert ``e`` copied out of a fused module into the canonical layout of a shard."""
    gate_up, down = experts.gate_up_proj[e].detach(), experts.down_proj[e].detach()
    if layout.transposed:
        gate_up, down = gate_up.T, down.T
    bias = experts.gate_up_proj_bias[e].detach() if layout.bias else None
    if not layout.concatenated:  # rows g0, u0, g1, u1, … → g0, g1, …, u0, u1, …
        gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
        bias = None if bias is None else torch.cat([bias[0::2], bias[1::2]])
    down_bias = experts.down_proj_bias[e].detach().clone() if layout.bias else None
    return ExpertWeights(
        gate_up.contiguous().clone(),
        down.contiguous().clone(),
        act,
        None if bias is None else bias.contiguous().clone(),
        down_bias,
    )


def load_canonical(experts: Any, layout: ExpertLayout, e: int, w: ExpertWeights) -> None:
    """Write a canonical expert back into slot ``e`` of a fused module (the inverse of
    :func:`canonical_expert`)."""
    gate_up, bias = w.gate_up, w.gate_up_bias
    if not layout.concatenated:
        gate_up = torch.stack(gate_up.chunk(2), dim=1).reshape(gate_up.shape)
        bias = None if bias is None else torch.stack(bias.chunk(2), dim=1).reshape(bias.shape)
    experts.gate_up_proj[e].copy_(gate_up.T if layout.transposed else gate_up)
    experts.down_proj[e].copy_(w.down.T if layout.transposed else w.down)
    if layout.bias:
        assert bias is not None and w.down_bias is not None, "the shard has no biases; its module needs them"
        experts.gate_up_proj_bias[e].copy_(bias)
        experts.down_proj_bias[e].copy_(w.down_bias)


class FusedExperts(nn.Module):
    """A layer's experts as fused tensors, in the transformers 5.x layout (used by MoEfied models)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, act: str = "silu") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        self.act_name = act
        self.act_fn = activation(act)

    def expert(self, e: int) -> ExpertWeights:
        return ExpertWeights(self.gate_up_proj[e].detach(), self.down_proj[e].detach(), self.act_name)
