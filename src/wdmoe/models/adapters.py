"""Model adapters: how to find and read the sparse MoE blocks of each supported family.

transformers 5.x gives every MoE family the same parts — a router, fused ``experts`` and sometimes
shared experts — and the wireless block calls those very modules, so an adapter only states, as
data, what differs: where the block and its router sit, how to read the router's output, how the
model combines (renormalised top-k weights or not), how much each candidate matters, which shared
experts run beside the routed ones, and the experts' layout and gating. Routing itself (grouped
top-k, bias-corrected choice, scaling factors, sparsemixer) always runs in the model's own router.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from wdmoe.errors import UnsupportedModelError
from wdmoe.models.block import (
    BlockSpec,
    ImportanceFn,
    RouterReader,
    WirelessMoEBlock,
    router_triple,
    share_importance,
    softmax_importance,
)
from wdmoe.models.experts import ExpertLayout, clamped_swiglu_name
from wdmoe.registry import Registry
from wdmoe.types import CausalLM

# Where decoder layers keep their FFN: most families `mlp`, Llama 4 `feed_forward`, Granite
# `block_sparse_moe`.
FFN_ATTRS = ("mlp", "feed_forward", "block_sparse_moe")


def hidden_act(experts: Any, config: PretrainedConfig) -> str:
    """The gating of SwiGLU-style experts: act(gate) ⊙ up with the config's activation."""
    return str(getattr(experts, "act_name", None) or config.hidden_act)


def gpt_oss_act(experts: Any, config: PretrainedConfig) -> str:
    """GPT-OSS's clamped SwiGLU, with the module's own α and limit."""
    return clamped_swiglu_name(float(experts.alpha), float(experts.limit))


def llama4_router(router: Any, out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Llama 4's router returns (scores [T, E]: σ(logit) on its top-k, 0 elsewhere; logits [T, E]);
    the candidates are its top-k of the logits, taken exactly as the router takes them."""
    scores, logits = out
    candidates = torch.topk(logits, router.top_k, dim=1).indices
    return logits, scores.gather(1, candidates), candidates


@dataclass(frozen=True)
class MoEAdapter:
    """What wdmoe needs to know about one model family (the fields of :class:`BlockSpec`, and):

    norm_flag: config attribute saying whether top-k weights are renormalised (else ``renormalizes``).
    sums_experts: experts are added with weight 1 (MoEfied dense FFNs): never renormalised.
    transposed: the experts' layout where transformers declares none (Llama 4).
    act: the experts' gating name for a shard (:func:`wdmoe.models.experts.glu`).
    fixed_top_k: the router ignores ``top_k`` and always proposes this many (PhiMoE's sparsemixer).
    """

    name: str
    model_types: tuple[str, ...]
    importance: ImportanceFn = softmax_importance
    norm_flag: str | None = None
    renormalizes: bool = True
    sums_experts: bool = False
    router: str = "gate"
    read_router: RouterReader = router_triple
    shared: tuple[str, ...] = ()
    shared_gate: str | None = None
    scales_input: bool = False
    returns: str | None = None
    transposed: bool | None = None
    act: Callable[[Any, PretrainedConfig], str] = hidden_act
    fixed_top_k: int | None = None

    def renormalize(self, config: PretrainedConfig) -> bool:
        """Whether dropping a candidate rescales the survivors, as the model's own top-k would."""
        if self.sums_experts:
            return False
        return self.renormalizes if self.norm_flag is None else bool(getattr(config, self.norm_flag))

    def block_spec(self, config: PretrainedConfig) -> BlockSpec:
        return BlockSpec(
            self.renormalize(config),
            self.importance,
            self.router,
            self.read_router,
            self.shared,
            self.shared_gate,
            self.scales_input,
            self.returns,
        )

    def layout(self, experts: Any) -> ExpertLayout:
        return ExpertLayout.of(experts, self.transposed)

    def is_moe_block(self, module: Any) -> bool:
        experts = getattr(module, "experts", None)
        return (
            hasattr(module, self.router)
            and hasattr(experts, "gate_up_proj")
            and hasattr(experts, "down_proj")
        )


ADAPTERS: Registry[MoEAdapter] = Registry("model adapter")
SHARED = ("shared_experts",)
for _adapter in (
    MoEAdapter("mixtral", ("mixtral",)),
    MoEAdapter(
        "qwen2_moe",
        ("qwen2_moe",),
        norm_flag="norm_topk_prob",
        shared=("shared_expert",),
        shared_gate="shared_expert_gate",
    ),
    MoEAdapter("qwen3_moe", ("qwen3_moe",), norm_flag="norm_topk_prob"),
    MoEAdapter("olmoe", ("olmoe",), norm_flag="norm_topk_prob"),
    MoEAdapter("flex_olmo", ("flex_olmo",), norm_flag="norm_topk_prob"),
    # Qwen3-Next: gated DeltaNet / gated attention stay at the BS like any attention.
    MoEAdapter(
        "qwen3_next",
        ("qwen3_next",),
        norm_flag="norm_topk_prob",
        shared=("shared_expert",),
        shared_gate="shared_expert_gate",
    ),
    # DeepSeek-V2: softmax scores × routed_scaling_factor, (group-limited) greedy top-k, no
    # renormalisation (its router never reads norm_topk_prob).
    MoEAdapter("deepseek_v2", ("deepseek_v2",), renormalizes=False, shared=SHARED),
    # DeepSeek-V3 and GLM-4.5: sigmoid scores, bias-corrected node-limited choice, top-k weights
    # renormalised (norm_topk_prob) then × routed_scaling_factor.
    MoEAdapter("deepseek_v3", ("deepseek_v3",), share_importance, "norm_topk_prob", shared=SHARED),
    MoEAdapter("glm4_moe", ("glm4_moe",), share_importance, "norm_topk_prob", shared=SHARED),
    # ERNIE-4.5: bias-corrected choice, softmax probabilities renormalised over the top-k.
    MoEAdapter("ernie4_5_moe", ("ernie4_5_moe",), shared=SHARED),
    # Granite (the shared variant's shared MLP sits in the decoder layer: at the BS anyway) and
    # GPT-OSS: softmax over the top-k logits, i.e. renormalised.
    MoEAdapter("granitemoe", ("granitemoe", "granitemoeshared"), router="router"),
    MoEAdapter("gpt_oss", ("gpt_oss",), router="router", act=gpt_oss_act, returns="weights"),
    # PhiMoE: sparsemixer picks 2 experts, each weight its own masked softmax: nothing to rescale.
    MoEAdapter("phimoe", ("phimoe",), share_importance, renormalizes=False, router="router", fixed_top_k=2),
    # Llama 4: σ(logit) of its top-k scales the expert's *input*; the shared expert runs at the BS.
    MoEAdapter(
        "llama4_text",
        ("llama4_text",),
        share_importance,
        renormalizes=False,
        router="router",
        read_router=llama4_router,
        shared=("shared_expert",),
        scales_input=True,
        returns="logits",
        transposed=True,
    ),
    # The embedded default: a dense Llama whose FFNs were MoEfied (wdmoe.models.moefy); its
    # experts are summed (weight 1), so dropping one is never compensated by rescaling; its
    # router scores are predicted log output norms, so their softmax is each expert's share.
    MoEAdapter("moefied", ("llama",), sums_experts=True),
):
    ADAPTERS.register(_adapter.name)(_adapter)

# MoE families transformers ships that cannot be split into a BS part and device experts.
REFUSED = {
    "llama4": "load the text model alone (Llama4ForCausalLM with its text_config, model type llama4_text)",
    "jetmoe": "its attention is itself a mixture of experts (MoA) routed per token inside the BS's "
    "attention, and its FFN experts are not fused gate/up/down tensors",
    "nllb_moe": "it is an encoder-decoder model; wdmoe drives decoder-only LMs",
    "switch_transformers": "it is an encoder-decoder model; wdmoe drives decoder-only LMs",
}


def decoder_layers(model: CausalLM) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` for every supported family)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers; not a decoder-only LM")
    return layers


def supported_types() -> list[str]:
    return sorted({t for n in ADAPTERS for t in ADAPTERS.get(n).model_types} - {"llama"})


def adapter_for(model: CausalLM) -> MoEAdapter:
    """Find the adapter by the model's config type; raise a clear error when there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModelError(
            f"model type {model_type!r} cannot be driven by wdmoe: {REFUSED[model_type]}"
        )
    for name in ADAPTERS:
        adapter = ADAPTERS.get(name)
        if model_type in adapter.model_types and any(
            adapter.is_moe_block(m) for layer in decoder_layers(model) for m in ffn_modules(layer)
        ):
            return adapter
    raise UnsupportedModelError(
        f"model type {model_type!r} has no MoE blocks wdmoe can drive; supported: "
        f"{', '.join(supported_types())}, and the embedded default (wdmoe model build)"
    )


def ffn_modules(layer: nn.Module) -> Iterator[Any]:
    for attr in FFN_ATTRS:
        module = getattr(layer, attr, None)
        if module is not None:
            yield module


def moe_slots(model: CausalLM) -> Iterator[tuple[int, str, Any]]:
    """(decoder layer index, attribute, MoE block) for every layer whose FFN is a sparse MoE block;
    dense layers (DeepSeek's first ones, Llama 4's interleaved ones) stay as they are, at the BS."""
    for i, layer in enumerate(decoder_layers(model)):
        for attr in FFN_ATTRS:
            ffn = getattr(layer, attr, None)
            if isinstance(ffn, WirelessMoEBlock) or hasattr(getattr(ffn, "experts", None), "gate_up_proj"):
                yield i, attr, ffn
                break


def moe_blocks(model: CausalLM) -> Iterator[tuple[int, Any]]:
    """(decoder layer index, MoE block) for every layer whose FFN is a sparse MoE block."""
    for i, _, block in moe_slots(model):
        yield i, block
