"""Values that flow between stages (frozen dataclasses; shapes follow the legend in ``wdmoe``)."""

from dataclasses import dataclass
from typing import Any, NewType

import torch

LayerId = NewType("LayerId", int)
# A transformers causal LM (PreTrainedModel). Its submodules (model.layers[i].mlp.experts, …) are
# resolved at run time, so the static type is open; adapters check the structure when installing.
CausalLM = Any
ExpertId = NewType("ExpertId", int)
ExpertKey = tuple[int, int]  # (layer, expert): one expert of one MoE layer


@dataclass(frozen=True)
class RouterOutput:
    """What a model's own router decided for one MoE layer.

    logits:     [T, E] raw router scores.
    candidates: [T, K] expert ids of the router's top-k, best first.
    weights:    [T, K] the combine weight the model gives each candidate.
    importance: [T, K] how much each candidate matters to the token, summing to ≤ 1 per token
        (the softmax probability for trained MoEs; the predicted output-norm share for MoEfied
        models, which combine with weight 1). Channel-aware policies weigh this.
    renormalize: the model combines with softmax weights, so a policy that drops
        candidates rescales the survivors to keep the token's total weight.
    layer: the MoE layer that routed (0..L-1; None: not said, e.g. hand-made scores).
    """

    logits: torch.Tensor
    candidates: torch.Tensor
    weights: torch.Tensor
    importance: torch.Tensor
    renormalize: bool
    layer: int | None = None

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[-1])

    @property
    def top_k(self) -> int:
        return int(self.candidates.shape[-1])


@dataclass(frozen=True)
class Selection:
    """Which candidates a policy keeps and the weights they are combined with.

    keep:    [T, K] bool, aligned with ``RouterOutput.candidates``.
    weights: [T, K] combine weights, 0 where dropped.
    """

    keep: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class LayerTrace:
    """One MoE layer's forward, as recorded for latency and accuracy accounting.

    logits [T, E], candidates [T, K], keep [T, K] (what ran), weights [T, K]; ``failed`` lists
    experts the dispatcher could not run (treated as dropped); ``selected`` [T, K] what the policy
    kept, before those failures (None: the same as keep).
    """

    layer: int
    logits: torch.Tensor
    candidates: torch.Tensor
    keep: torch.Tensor
    weights: torch.Tensor
    failed: tuple[int, ...] = ()
    selected: torch.Tensor | None = None

    @property
    def sent(self) -> torch.Tensor:
        """[T, K] the candidates the policy kept (sent to their devices, answered or not)."""
        return self.keep if self.selected is None else self.selected

    def tokens_per_expert(self) -> torch.Tensor:
        """[E] number of tokens each expert actually processed."""
        counts = torch.zeros(int(self.logits.shape[-1]), dtype=torch.long)
        return counts.index_add_(0, self.candidates[self.keep], torch.ones_like(self.candidates[self.keep]))


@dataclass(frozen=True)
class Feedback:
    """What one forward cost, told to the policy after it (:meth:`Policy.observe`).

    step_s: its latency (simulated, or measured at the BS) [s]; new_tokens: tokens it processed;
    decode: it ran on a KV cache (a prefill is not); steps_left: forwards still to come in its
    request (0: it was the last, or the caller cannot know).
    """

    step_s: float
    new_tokens: int
    decode: bool
    steps_left: int = 0
