"""One expert's weights and its forward: the unit a device holds and runs.

In transformers 5.x a layer's experts are one fused module with ``gate_up_proj`` [E, 2F, D] and
``down_proj`` [E, D, F]; expert e is the slice [e] of both (SwiGLU: down(act(gate)·up)).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ExpertWeights:
    """A standalone expert: gate_up [2F, D], down [D, F] and its activation's name."""

    gate_up: torch.Tensor
    down: torch.Tensor
    act: str = "silu"

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


def run_expert(weights: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """Run a standalone expert on x [n, D] → [n, D]."""
    return expert_forward(weights.gate_up, weights.down, activation(weights.act), x)


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
