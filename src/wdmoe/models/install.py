"""Install wdmoe into a loaded model: swap each sparse MoE block for a WirelessMoEBlock."""

from dataclasses import dataclass
from typing import Any

import torch

from wdmoe.errors import ConfigError
from wdmoe.models.adapters import MoEAdapter, adapter_for, decoder_layers, moe_blocks
from wdmoe.models.block import Recorder, WirelessMoEBlock
from wdmoe.models.dispatch import Dispatcher, LocalDispatcher
from wdmoe.policies import Policy, make_policy
from wdmoe.types import CausalLM


@dataclass
class WirelessModel:
    """A model with wdmoe installed: its blocks, the shared recorder, and knobs to turn."""

    model: CausalLM
    adapter: MoEAdapter
    blocks: dict[int, WirelessMoEBlock]
    recorder: Recorder

    @property
    def num_experts(self) -> int:
        return int(next(iter(self.blocks.values())).experts.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        return int(next(iter(self.blocks.values())).gate.top_k)

    def set_policy(self, policy: Policy) -> None:
        for block in self.blocks.values():
            block.policy = policy

    def set_context(self, channel: Any = None, latency: Any = None) -> None:
        """The snapshot every block hands its policy: select(route, channel, latency)."""
        for block in self.blocks.values():
            block.context = (channel, latency)

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        for block in self.blocks.values():
            block.dispatcher = dispatcher

    def set_top_k(self, k: int) -> None:
        """Change how many candidates the router proposes per token (1 ≤ k ≤ E)."""
        if not 1 <= k <= self.num_experts:
            raise ConfigError(f"top_k must be in 1..{self.num_experts} for this model, got {k}")
        for block in self.blocks.values():
            block.gate.top_k = k

    def release_experts(self) -> int:
        """Free the fused expert tensors (devices hold the experts now); returns the bytes freed.
        The expert count stays readable (tensors [E, 0, 0]); running experts locally is no longer
        possible."""
        freed = 0
        for block in self.blocks.values():
            for name in ("gate_up_proj", "down_proj"):
                old = getattr(block.experts, name)
                freed += old.numel() * old.element_size()
                empty = torch.empty(old.shape[0], 0, 0, dtype=old.dtype)
                setattr(block.experts, name, torch.nn.Parameter(empty, requires_grad=False))
        return freed

    def local_dispatcher(self) -> LocalDispatcher:
        return LocalDispatcher({i: b.experts for i, b in self.blocks.items()})


def install(
    model: CausalLM, policy: Policy | None = None, dispatcher: Dispatcher | None = None
) -> WirelessModel:
    """Replace every sparse MoE block of ``model`` (in place) and return the handle.

    Defaults: the ``topk`` policy (keeps every candidate) and the in-process dispatcher, which
    together reproduce the unmodified model.
    """
    adapter = adapter_for(model)
    policy = policy or make_policy("topk")
    recorder = Recorder()
    layers = decoder_layers(model)
    renormalize = adapter.renormalize(model.config)
    blocks: dict[int, WirelessMoEBlock] = {}
    for i, old in list(moe_blocks(model)):
        if isinstance(old, WirelessMoEBlock):
            raise ConfigError("wdmoe is already installed in this model")
        blocks[i] = WirelessMoEBlock(
            i,
            old.gate,
            old.experts,
            renormalize=renormalize,
            importance=adapter.importance,
            policy=policy,
            dispatcher=None,  # type: ignore[arg-type]  # set below, once all blocks exist
            recorder=recorder,
            shared_expert=getattr(old, "shared_expert", None),
            shared_expert_gate=getattr(old, "shared_expert_gate", None),
        )
        layers[i].mlp = blocks[i]
    handle = WirelessModel(model, adapter, blocks, recorder)
    handle.set_dispatcher(dispatcher or handle.local_dispatcher())
    return handle
