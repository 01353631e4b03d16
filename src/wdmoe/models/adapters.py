"""Model adapters: how to find and read the sparse MoE blocks of each supported family.

transformers 5.x gives every supported family the same block shape — a router ``gate`` returning
(logits [T, E], top-k weights [T, K], top-k ids [T, K]) and fused ``experts`` — so an adapter
only states what differs: how the model combines (renormalised softmax or not), how much each
candidate matters, and whether a shared expert runs beside the routed ones.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from wdmoe.errors import UnsupportedModelError
from wdmoe.models.block import ImportanceFn, WirelessMoEBlock, softmax_importance
from wdmoe.registry import Registry
from wdmoe.types import CausalLM


@dataclass(frozen=True)
class MoEAdapter:
    """What wdmoe needs to know about one model family."""

    name: str
    model_types: tuple[str, ...]
    importance: ImportanceFn = softmax_importance
    norm_flag: str | None = None  # config attribute saying whether top-k weights are renormalised
    sums_experts: bool = False  # experts are added with weight 1 (MoEfied dense FFNs)

    def renormalize(self, config: PretrainedConfig) -> bool:
        """Whether dropping a candidate rescales the survivors (softmax-combining models)."""
        if self.sums_experts:
            return False
        return True if self.norm_flag is None else bool(getattr(config, self.norm_flag))

    def is_moe_block(self, module: Any) -> bool:
        experts = getattr(module, "experts", None)
        return hasattr(module, "gate") and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")


ADAPTERS: Registry[MoEAdapter] = Registry("model adapter")
for _adapter in (
    MoEAdapter("mixtral", ("mixtral",)),
    MoEAdapter("qwen2_moe", ("qwen2_moe",), norm_flag="norm_topk_prob"),
    MoEAdapter("qwen3_moe", ("qwen3_moe",), norm_flag="norm_topk_prob"),
    MoEAdapter("olmoe", ("olmoe",), norm_flag="norm_topk_prob"),
    # The embedded default: a dense Llama whose FFNs were MoEfied (wdmoe.models.moefy); its
    # experts are summed (weight 1), so dropping one is never compensated by rescaling; its
    # router scores are predicted log output norms, so their softmax is each expert's share.
    MoEAdapter("moefied", ("llama",), sums_experts=True),
):
    ADAPTERS.register(_adapter.name)(_adapter)


def decoder_layers(model: CausalLM) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` for every supported family)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers; not a decoder-only LM")
    return layers


def adapter_for(model: CausalLM) -> MoEAdapter:
    """Find the adapter by the model's config type; raise a clear error when there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name in ADAPTERS:
        adapter = ADAPTERS.get(name)
        if model_type in adapter.model_types and any(
            adapter.is_moe_block(layer.mlp) for layer in decoder_layers(model)
        ):
            return adapter
    supported = sorted({t for n in ADAPTERS for t in ADAPTERS.get(n).model_types} - {"llama"})
    raise UnsupportedModelError(
        f"model type {model_type!r} has no MoE blocks wdmoe can drive; supported: {', '.join(supported)}, "
        "and the embedded default (wdmoe model build)"
    )


def moe_blocks(model: CausalLM) -> Iterator[tuple[int, Any]]:
    """(decoder layer index, MoE block) for every layer whose FFN is a sparse MoE block."""
    for i, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        if isinstance(mlp, WirelessMoEBlock) or (
            hasattr(mlp, "experts") and hasattr(mlp.experts, "gate_up_proj")
        ):
            yield i, mlp
