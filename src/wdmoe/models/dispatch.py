"""Dispatchers: hand each expert its tokens and bring back the outputs.

A dispatcher sees only "layer l, expert e, these hidden states" — never weights or policies — so
the in-process one here, the simulated one and the remote one are interchangeable.
"""

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from wdmoe.formats import round_trip
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


def run_on_wire(
    inner: Dispatcher, layer: int, inputs: Mapping[int, torch.Tensor], formats: Mapping[int, str]
) -> dict[int, torch.Tensor]:
    """``inner``'s outputs as they reach the BS when expert e's device link carries hidden states
    in wire format ``formats[e]`` (:mod:`wdmoe.formats`; absent or "none": exact): its inputs
    [n_e, D] rounded as the downlink delivers them, its outputs as the uplink does. float32 (and
    "none") leave every value bit-identical."""
    exact = ("none", "float32")
    if all(formats.get(e, "none") in exact for e in inputs):
        return inner.run(layer, inputs)  # nothing to round: not even a dict copy
    sent = {
        e: round_trip(x, formats[e]) if formats.get(e, "none") != "none" else x for e, x in inputs.items()
    }
    out = inner.run(layer, sent)
    return {e: round_trip(y, formats[e]) if formats.get(e, "none") != "none" else y for e, y in out.items()}
