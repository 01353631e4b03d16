"""One expert's weights and its forward: the unit a device holds and runs.

In transformers 5.x a layer's experts are one fused module with ``gate_up_proj`` [E, 2F, D] and
``down_proj`` [E, D, F]; expert e is the slice [e] of both (SwiGLU: down(act(gate)·up)).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN


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


def run_expert(weights: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """Run a standalone expert on x [n, D] → [n, D]."""
    return expert_forward(weights.gate_up, weights.down, ACT2FN[weights.act], x)


class FusedExperts(nn.Module):
    """A layer's experts as fused tensors, in the transformers 5.x layout (used by MoEfied models)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, act: str = "silu") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        self.act_name = act
        self.act_fn = ACT2FN[act]

    def expert(self, e: int) -> ExpertWeights:
        return ExpertWeights(self.gate_up_proj[e].detach(), self.down_proj[e].detach(), self.act_name)
