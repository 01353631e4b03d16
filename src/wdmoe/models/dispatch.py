"""Dispatchers: hand each expert its tokens and bring back the outputs.

A dispatcher sees only "layer l, expert e, these hidden states" — never weights or policies — so
the in-process one here, the simulated one and the remote one are interchangeable.
"""

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from wdmoe.models.experts import expert_forward


class Dispatcher(Protocol):
    """Runs experts for one layer; an expert that could not run is absent from the result."""

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """inputs: expert id → hidden states [n_e, D]; returns expert id → outputs [n_e, D]."""
        ...


class LocalDispatcher:
    """Runs every expert in this process from the model's own fused expert tensors."""

    def __init__(self, experts_by_layer: Mapping[int, Any]) -> None:
        self.experts_by_layer = experts_by_layer

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        experts = self.experts_by_layer[layer]
        return {
            e: expert_forward(experts.gate_up_proj[e], experts.down_proj[e], experts.act_fn, x)
            for e, x in inputs.items()
        }
