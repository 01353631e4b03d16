"""Install wdmoe into a loaded model: swap each sparse MoE block for a WirelessMoEBlock.

The :class:`WirelessModel` handle is how the simulator and the BS drive a model, the same way:
``attach(listener)`` calls ``listener.before_forward`` / ``after_forward`` around every forward
(module hooks; the latter also when the forward raised), ``set_view`` gives the blocks the latency
view of this forward, ``observe`` / ``begin_request`` tell the policy what a forward cost and
when a request starts.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from wdmoe.errors import ConfigError
from wdmoe.latency.view import ExpertLatency
from wdmoe.models.adapters import MoEAdapter, adapter_for, decoder_layers, moe_slots
from wdmoe.models.block import BlockContext, Recorder, WirelessMoEBlock
from wdmoe.models.dispatch import Dispatcher, LocalDispatcher
from wdmoe.models.experts import ExpertLayout, expert_size, run_fused
from wdmoe.policies import Policy, make_policy
from wdmoe.types import CausalLM, Feedback


@dataclass(frozen=True)
class ForwardCall:
    """One call of the model as its hooks see it: input_ids [B, S], the attention mask, the KV
    cache handed in (None: none) and whether the model was asked to build one."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: Any
    use_cache: bool

    @classmethod
    def of(cls, args: tuple, kwargs: dict[str, Any]) -> "ForwardCall":
        ids = kwargs.get("input_ids", args[0] if args else None)
        assert ids is not None, "the model was called without input_ids"
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 generate: `cache`
        return cls(ids, kwargs.get("attention_mask"), cache, bool(kwargs.get("use_cache", False)))

    @property
    def new_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def starts_request(self) -> bool:
        """No cached tokens: the forward processes a whole new context (a new request)."""
        if self.cache is None:
            return True
        return hasattr(self.cache, "get_seq_length") and int(self.cache.get_seq_length()) == 0

    @property
    def stateless(self) -> bool:
        """Neither reads nor builds a KV cache (a scoring forward: its rows are independent)."""
        return self.cache is None and not self.use_cache


class ForwardListener(Protocol):
    """Told about every forward of an attached model (the simulator, the BS)."""

    def before_forward(self, call: ForwardCall) -> None: ...

    def after_forward(self, call: ForwardCall, ok: bool) -> None: ...


@dataclass
class WirelessModel:
    """A model with wdmoe installed: its blocks, the shared recorder, and knobs to turn."""

    model: CausalLM
    adapter: MoEAdapter
    blocks: dict[int, WirelessMoEBlock]
    recorder: Recorder
    context: BlockContext

    @property
    def num_experts(self) -> int:
        return int(next(iter(self.blocks.values())).experts.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        return int(next(iter(self.blocks.values())).router_module.top_k)

    @property
    def expert_size(self) -> int:
        """F, the inner width of one routed expert (read before the experts are released)."""
        experts = next(iter(self.blocks.values())).experts
        return expert_size(experts, self.adapter.layout(experts))

    @property
    def policy(self) -> Policy:
        return self.context.policy

    def set_policy(self, policy: Policy) -> None:
        self.context.policy = policy

    def set_view(self, view: ExpertLatency | None) -> None:
        """The latency view every block hands its policy: select(route, view)."""
        self.context.view = view

    def set_view_source(self, view_at: Callable[[int], ExpertLatency] | None) -> None:
        """Where every block gets its view when its layer starts (None: the view of ``set_view``)."""
        self.context.view_at = view_at

    def observe(self, feedback: Feedback) -> None:
        """Tell the policy what the last forward cost; install the policy it returns."""
        self.context.policy = self.context.policy.observe(feedback)

    def begin_request(self) -> None:
        self.context.policy = self.context.policy.begin_request()

    @contextmanager
    def attach(self, listener: ForwardListener) -> Iterator[None]:
        """Call ``listener`` around every forward of the model while inside (hooks removed on exit)."""

        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            listener.before_forward(ForwardCall.of(args, kwargs))

        def post(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            listener.after_forward(ForwardCall.of(args, kwargs), ok=out is not None)

        handles = [
            self.model.register_forward_pre_hook(pre, with_kwargs=True),
            self.model.register_forward_hook(post, with_kwargs=True, always_call=True),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @property
    def dispatcher(self) -> Dispatcher:
        return next(iter(self.blocks.values())).dispatcher

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        for block in self.blocks.values():
            block.dispatcher = dispatcher

    def set_top_k(self, k: int) -> None:
        """Change how many candidates the router proposes per token (1 ≤ k ≤ E)."""
        if not 1 <= k <= self.num_experts:
            raise ConfigError(f"top_k must be in 1..{self.num_experts} for this model, got {k}")
        fixed = self.adapter.fixed_top_k
        if fixed is not None and k != fixed:
            name = self.adapter.name
            raise ConfigError(f"top_k of a {name} model is always {fixed} (its router ignores it), got {k}")
        for block in self.blocks.values():
            block.router_module.top_k = k

    def release_experts(self) -> int:
        """Free the fused expert tensors (devices hold the experts now); returns the bytes freed.
        The expert count stays readable (tensors [E, 0, 0]); running experts locally is no longer
        possible."""
        freed = 0
        for block in self.blocks.values():
            for name in self.adapter.layout(block.experts).params():
                old = getattr(block.experts, name)
                freed += old.numel() * old.element_size()
                empty = torch.empty(old.shape[0], *(0,) * (old.dim() - 1), dtype=old.dtype)
                setattr(block.experts, name, torch.nn.Parameter(empty, requires_grad=False))
        return freed

    def local_dispatcher(self) -> LocalDispatcher:
        return FusedDispatcher(
            {i: b.experts for i, b in self.blocks.items()},
            {i: self.adapter.layout(b.experts) for i, b in self.blocks.items()},
        )


class FusedDispatcher(LocalDispatcher):
    """Runs every expert in this process from the model's own fused tensors, in each family's
    layout and with its own gating (:func:`wdmoe.models.experts.run_fused`)."""

    def __init__(self, experts_by_layer: dict[int, Any], layouts: dict[int, ExpertLayout]) -> None:
        super().__init__(experts_by_layer)
        self.layouts = layouts

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        experts, layout = self.experts_by_layer[layer], self.layouts[layer]
        return {e: run_fused(experts, layout, e, x) for e, x in inputs.items()}


def install(
    model: CausalLM, policy: Policy | None = None, dispatcher: Dispatcher | None = None
) -> WirelessModel:
    """Replace every sparse MoE block of ``model`` (in place) and return the handle.

    Defaults: the ``topk`` policy (keeps every candidate) and the in-process dispatcher, which
    together reproduce the unmodified model.
    """
    adapter = adapter_for(model)
    context = BlockContext(policy or make_policy("topk"))
    recorder = Recorder()
    layers = decoder_layers(model)
    spec = adapter.block_spec(model.config)
    blocks: dict[int, WirelessMoEBlock] = {}
    for i, attr, old in list(moe_slots(model)):
        if isinstance(old, WirelessMoEBlock):
            raise ConfigError("wdmoe is already installed in this model")
        names = [n for n in (*spec.shared, spec.shared_gate) if n and getattr(old, n, None) is not None]
        blocks[i] = WirelessMoEBlock(
            i,
            getattr(old, spec.router),
            old.experts,
            spec=replace(spec, shared=tuple(n for n in spec.shared if n in names)),
            context=context,
            dispatcher=None,  # type: ignore[arg-type]  # set below, once all blocks exist
            recorder=recorder,
            shared={n: getattr(old, n) for n in names},
        )
        setattr(layers[i], attr, blocks[i])
    handle = WirelessModel(model, adapter, blocks, recorder, context)
    handle.set_dispatcher(dispatcher or handle.local_dispatcher())
    return handle
