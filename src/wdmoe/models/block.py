"""The wireless MoE block: route → select → dispatch → combine.

It replaces a model's sparse MoE block in place, keeping the original router, experts and shared
experts as children under their original names (``gate`` or ``router``, ``experts``,
``shared_expert(s)``), so the state dict, the router-logit hooks of transformers and the model's
arithmetic are unchanged. What differs between families is data, a :class:`BlockSpec`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wdmoe.latency.view import ExpertLatency
from wdmoe.models.dispatch import Dispatcher
from wdmoe.policies.base import Policy, check_selection
from wdmoe.types import LayerTrace, RouterOutput, Selection

ImportanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (router module, what it returned) → (logits [T, E], weights [T, K], candidates [T, K])
RouterReader = Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def softmax_importance(logits: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Importance of a softmax-scoring model: its softmax probability of each candidate over all E."""
    return torch.softmax(logits.float(), dim=-1).gather(-1, candidates)


def share_importance(logits: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Importance of a model whose scores are no distribution over E (sigmoid scores of DeepSeek-V3,
    GLM-4.5 and Llama 4; PhiMoE's sparsemixer): each candidate's share of the token's combine
    weight, w_k / Σ_j w_j."""
    w = weights.float()
    return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def router_triple(router: Any, out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transformers 5.x router contract: it returns (logits [T, E], weights [T, K], ids [T, K])."""
    logits, weights, candidates = out
    return logits, weights, candidates


@dataclass(frozen=True)
class BlockSpec:
    """How one family's sparse MoE block is wired (built by its adapter from the model config).

    renormalize: see :class:`RouterOutput`.
    importance: how much each candidate matters (policies weigh it).
    router: the router's attribute name in the original block.
    read_router: turns what the router returns into (logits, weights, candidates).
    shared: attribute names of shared experts: they run at the BS on every token, added to the output.
    shared_gate: a [D → 1] gate scaling the shared expert by σ(gate(x)) (Qwen2-MoE, Qwen3-Next).
    scales_input: expert k sees w_k·x and is added with weight 1 (Llama 4), not w_k·expert_k(x).
    returns: what the original block returns beside its output, which the decoder layer unpacks and
        drops: None (the output alone), "logits" [T, E] (Llama 4), "weights" [T, K] (GPT-OSS).
    """

    renormalize: bool
    importance: ImportanceFn = softmax_importance
    router: str = "gate"
    read_router: RouterReader = router_triple
    shared: tuple[str, ...] = ()
    shared_gate: str | None = None
    scales_input: bool = False
    returns: str | None = None


@dataclass
class BlockContext:
    """What every MoE block of a model shares: the policy, and the latency view it decides on —
    ``view``, or, when the simulator or the BS set ``view_at``, the view of the cell at the time
    each layer starts (``view_at(layer)``: the channel moves during a forward); None outside a
    cell. ``on_select(layer, candidates [T, K], keep [T, K])``, when set, is told each layer's
    selection before its experts are dispatched (the simulator counts real tokens with it: a
    batch's padding is not work a BS would send)."""

    policy: Policy
    view: ExpertLatency | None = None
    view_at: Callable[[int], ExpertLatency] | None = None
    on_select: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def layer_view(self, layer: int) -> ExpertLatency | None:
        return self.view if self.view_at is None else self.view_at(layer)


@dataclass
class Recorder:
    """Collects a :class:`LayerTrace` per MoE layer forward while ``enabled``."""

    enabled: bool = False
    traces: list[LayerTrace] = field(default_factory=list)

    def record(self, trace: LayerTrace) -> None:
        if self.enabled:
            self.traces.append(trace)

    def clear(self) -> list[LayerTrace]:
        traces, self.traces = self.traces, []
        return traces


def drop_failed(route: RouterOutput, sel: Selection, failed: list[int]) -> Selection:
    """Mask experts that did not answer, renormalising like the policy would.

    Unlike a policy, failure may leave a token with no expert: its MoE output is then zero
    (the residual stream carries it), recorded as a failure rather than raised.
    """
    keep = sel.keep & ~torch.isin(route.candidates, torch.tensor(failed))
    weights = sel.weights * keep
    if route.renormalize:
        kept = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(
            kept > 0, weights * sel.weights.sum(-1, keepdim=True) / kept.clamp_min(1e-30), 0.0
        )
    return Selection(keep=keep, weights=weights)


class WirelessMoEBlock(nn.Module):
    """A sparse MoE block whose expert selection and execution are pluggable."""

    experts: Any  # the fused experts (layouts: wdmoe.models.experts.ExpertLayout)

    def __init__(
        self,
        layer: int,
        router: nn.Module,
        experts: nn.Module,
        *,
        spec: BlockSpec,
        context: BlockContext,
        dispatcher: Dispatcher,
        recorder: Recorder,
        shared: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.layer, self.spec = layer, spec
        self.add_module(spec.router, router)
        self.experts = experts
        for name, module in (shared or {}).items():
            self.add_module(name, module)
        self.renormalize, self.importance = spec.renormalize, spec.importance
        self.context, self.dispatcher, self.recorder = context, dispatcher, recorder

    @property
    def router_module(self) -> Any:
        """The model's router (x [T, D] → its routing decision); it has ``top_k``."""
        return self.get_submodule(self.spec.router)

    def route(self, x: torch.Tensor) -> RouterOutput:
        """Run the model's own router on x [T, D]; candidates ordered by importance, best first."""
        router = self.router_module
        logits, weights, candidates = self.spec.read_router(router, router(x))
        imp = self.importance(logits, candidates, weights)
        order = torch.sort(imp, dim=-1, descending=True, stable=True).indices
        candidates, weights, imp = (t.gather(-1, order) for t in (candidates, weights, imp))
        return RouterOutput(logits, candidates, weights, imp, self.renormalize, self.layer)

    def forward(self, hidden: torch.Tensor) -> Any:
        x = hidden.reshape(-1, hidden.shape[-1])
        route = self.route(x)
        sel = self.context.policy.select(route, self.context.layer_view(self.layer))
        check_selection(route, sel)
        selected = sel.keep
        if self.context.on_select is not None:
            self.context.on_select(self.layer, route.candidates, selected)
        out, sel, failed = self.dispatch_and_combine(x, route, sel)
        out = out + self.shared_output(x)
        if self.recorder.enabled:
            self.recorder.record(
                LayerTrace(
                    self.layer,
                    route.logits.detach(),
                    route.candidates,
                    sel.keep,
                    sel.weights.detach(),
                    tuple(failed),
                    selected if failed else None,
                )
            )
        out = out.reshape(hidden.shape)
        if self.spec.returns is None:
            return out
        return out, route.logits if self.spec.returns == "logits" else route.weights

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | float:
        """Σ of the shared experts on x [T, D] (0 without any), gated by σ(shared_gate(x)) if set."""
        total: torch.Tensor | float = 0.0
        for name in self.spec.shared:
            shared = self.get_submodule(name)(x)
            if self.spec.shared_gate is not None:
                shared = torch.sigmoid(self.get_submodule(self.spec.shared_gate)(x)) * shared
            total = total + shared
        return total

    def dispatch_and_combine(
        self, x: torch.Tensor, route: RouterOutput, sel: Selection
    ) -> tuple[torch.Tensor, Selection, list[int]]:
        """Send each selected expert its tokens, then y_t = Σ_k w_tk · expert_k(x_t)
        (or y_t = Σ_k expert_k(w_tk · x_t) where the family scales the input)."""
        n_exp, k = route.num_experts, route.top_k
        chosen = torch.where(sel.keep, route.candidates, n_exp).reshape(-1)  # [T·K], E = dropped
        order = torch.argsort(chosen, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(chosen, minlength=n_exp + 1).tolist()
        plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e, pairs in enumerate(torch.split(order, counts)[:n_exp]):
            if len(pairs):
                plan[e] = (pairs // k, pairs % k)  # (token ids, slot ids)
        scaled = self.spec.scales_input
        inputs = {
            e: x[token] * sel.weights[token, slot, None].to(x.dtype) if scaled else x[token]
            for e, (token, slot) in plan.items()
        }
        outputs = self.dispatcher.run(self.layer, inputs)
        failed = [e for e in plan if e not in outputs]
        if failed:
            sel = drop_failed(route, sel, failed)
        out = torch.zeros_like(x)
        for e, (token, slot) in plan.items():
            if e in outputs:
                y = outputs[e] if scaled else outputs[e] * sel.weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out, sel, failed
