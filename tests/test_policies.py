"""Policies drop candidates only, keep ≥ 1 expert, and renormalise softmax-combined weights."""

from dataclasses import dataclass

import pytest
import torch

from tiny import tiny_model
from wdmoe.errors import SelectionError, UnknownNameError
from wdmoe.models.dispatch import LocalDispatcher
from wdmoe.models.install import install
from wdmoe.policies import check_selection, make_policy, mask_selection
from wdmoe.types import RouterOutput


@dataclass(frozen=True)
class DropMask:
    """Test policy: drop candidates where a fixed random mask says so."""

    seed: int = 0
    name: str = "drop-mask"

    def select(self, route, channel=None, latency=None):
        g = torch.Generator().manual_seed(self.seed)
        return mask_selection(route, torch.rand(route.candidates.shape, generator=g) < 0.5)


class SpyDispatcher(LocalDispatcher):
    """The in-process dispatcher, remembering which tokens each expert received."""

    def __init__(self, experts):
        super().__init__(experts)
        self.calls = []

    def run(self, layer, inputs):
        self.calls.append((layer, {e: x.shape[0] for e, x in inputs.items()}))
        return super().run(layer, inputs)


def random_route(t=64, e=8, k=3, renormalize=True, seed=0) -> RouterOutput:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    w, idx = torch.softmax(logits, -1).topk(k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return RouterOutput(logits, idx, w, w, renormalize)


@pytest.mark.parametrize("renormalize", [True, False])
def test_mask_selection_invariants_on_random_masks(renormalize):
    for seed in range(50):
        route = random_route(renormalize=renormalize, seed=seed)
        mask = torch.rand(route.candidates.shape, generator=torch.Generator().manual_seed(seed)) < 0.4
        sel = mask_selection(route, mask)
        check_selection(route, sel)
        assert sel.keep.any(-1).all()
        assert (sel.keep & ~mask).sum() == (~mask.any(-1)).sum()  # only the forced top-1s are added
        assert (sel.weights[~sel.keep] == 0).all()
        kept_mass = (route.weights * sel.keep).sum(-1)
        if renormalize:
            assert torch.allclose(sel.weights.sum(-1), route.weights.sum(-1), atol=1e-6)
        else:
            assert torch.allclose(sel.weights.sum(-1), kept_mass)


def test_check_selection_rejects_broken_selections():
    route = random_route()
    sel = mask_selection(route, torch.ones_like(route.candidates, dtype=torch.bool))
    with pytest.raises(SelectionError, match="keeps no expert"):
        check_selection(route, type(sel)(torch.zeros_like(sel.keep), sel.weights * 0))
    with pytest.raises(SelectionError, match="non-zero combine weight"):
        keep = sel.keep.clone()
        keep[:, -1] = False
        check_selection(route, type(sel)(keep, sel.weights))
    with pytest.raises(SelectionError, match="must be bool"):
        check_selection(route, type(sel)(sel.keep[:, :1], sel.weights))


def test_dropping_policy_changes_which_experts_ran_and_renormalises():
    model = tiny_model("mixtral")
    wm = install(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    spy = SpyDispatcher({i: b.experts for i, b in wm.blocks.items()})
    wm.set_dispatcher(spy)
    full = model(ids).logits
    ran_full = sum(sum(c.values()) for _, c in spy.calls)
    spy.calls.clear()
    wm.set_policy(DropMask())
    wm.recorder.enabled = True
    dropped = model(ids).logits
    ran_dropped = sum(sum(c.values()) for _, c in spy.calls)
    assert ran_full == 2 * 32 * 2  # layers × tokens × k
    assert 32 * 2 <= ran_dropped < ran_full
    assert not torch.allclose(full, dropped)
    for t in wm.recorder.traces:
        assert torch.allclose(t.weights.sum(-1), torch.ones(32), atol=1e-6)  # Mixtral renormalises
        ran = t.candidates[t.keep]
        assert set(ran.tolist()) <= set(t.candidates.flatten().tolist())
        assert int(t.tokens_per_expert().sum()) == int(t.keep.sum())


def test_topk_policy_k_drops_lowest_candidates():
    route = random_route(k=4)
    sel = make_policy("topk", k=2).select(route)
    assert sel.keep[:, :2].all() and not sel.keep[:, 2:].any()


def test_unknown_policy_names_the_choices():
    with pytest.raises(
        UnknownNameError,
        match="unknown policy 'fastest'; choose one of: budget, capacity, dynskip, joint, marginal, priced, "
        "slo, topk, topp, wdmoe, wdmoe-j",
    ):
        make_policy("fastest")
