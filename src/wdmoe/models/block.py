"""The wireless MoE block: route → select → dispatch → combine.

It replaces a model's sparse MoE block in place, keeping the original router (``gate``), experts
and shared expert as children under their original names, so the state dict, the router-logit
hooks of transformers and the model's arithmetic are unchanged.
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


def softmax_importance(logits: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Importance of a softmax-combining model: its softmax probability of each candidate."""
    return torch.softmax(logits.float(), dim=-1).gather(-1, candidates)


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

    gate: Any  # the model's router: x [T, D] → (logits [T, E], weights [T, K], ids [T, K]); has top_k
    experts: Any  # fused experts: gate_up_proj [E, 2F, D], down_proj [E, D, F], act_fn

    def __init__(
        self,
        layer: int,
        gate: nn.Module,
        experts: nn.Module,
        *,
        renormalize: bool,
        importance: ImportanceFn,
        context: BlockContext,
        dispatcher: Dispatcher,
        recorder: Recorder,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.gate, self.experts = gate, experts
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate
        self.renormalize, self.importance = renormalize, importance
        self.context, self.dispatcher, self.recorder = context, dispatcher, recorder

    def route(self, x: torch.Tensor) -> RouterOutput:
        """Run the model's own router on x [T, D]."""
        logits, weights, candidates = self.gate(x)
        imp = self.importance(logits, candidates, weights)
        return RouterOutput(logits, candidates, weights, imp, self.renormalize)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        route = self.route(x)
        sel = self.context.policy.select(route, self.context.layer_view(self.layer))
        check_selection(route, sel)
        selected = sel.keep
        if self.context.on_select is not None:
            self.context.on_select(self.layer, route.candidates, selected)
        out, sel, failed = self.dispatch_and_combine(x, route, sel)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
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
        return out.reshape(hidden.shape)

    def dispatch_and_combine(
        self, x: torch.Tensor, route: RouterOutput, sel: Selection
    ) -> tuple[torch.Tensor, Selection, list[int]]:
        """Send each selected expert its tokens, then y_t = Σ_k w_tk · expert_k(x_t)."""
        n_exp, k = route.num_experts, route.top_k
        chosen = torch.where(sel.keep, route.candidates, n_exp).reshape(-1)  # [T·K], E = dropped
        order = torch.argsort(chosen, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(chosen, minlength=n_exp + 1).tolist()
        plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e, pairs in enumerate(torch.split(order, counts)[:n_exp]):
            if len(pairs):
                plan[e] = (pairs // k, pairs % k)  # (token ids, slot ids)
        outputs = self.dispatcher.run(self.layer, {e: x[token] for e, (token, _) in plan.items()})
        failed = [e for e in plan if e not in outputs]
        if failed:
            sel = drop_failed(route, sel, failed)
        out = torch.zeros_like(x)
        for e, (token, slot) in plan.items():
            if e in outputs:
                w = sel.weights[token, slot, None]
                out.index_add_(0, token, (outputs[e] * w).to(out.dtype))
        return out, sel, failed
