"""`priced` (issue 14 item 2): keep a candidate iff its importance pays for its device's per-token
time at one price λ — hand-computed masks, a plain-Python reference on paper-cell views, and what
sets it apart from WDMoE-θ (no per-token normalisation)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from wdmoe.channel import generate_trace
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError
from wdmoe.latency.view import ExpertLatency
from wdmoe.policies import check_selection, make_policy
from wdmoe.policies.priced import cap_drops, priced_keep
from wdmoe.types import RouterOutput

CFG = load_scenario("paper")


def paper_view(seed: int) -> ExpertLatency:
    return ExpertLatency.from_scenario(CFG, generate_trace(CFG, 1, seed=seed).state(0))


def random_route(t=16, e=8, k=3, renormalize=True, seed=0) -> RouterOutput:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g) * 2.0
    imp, idx = torch.softmax(logits, -1).topk(k, dim=-1)
    w = imp / imp.sum(-1, keepdim=True) if renormalize else imp
    return RouterOutput(logits, idx, w, imp, renormalize)


# importance [T, K] best first; per-token latency of each candidate's device in seconds
IMP = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.25, 0.15], [0.4, 0.35, 0.25]], dtype=torch.float64)
T_S = torch.tensor([[1e-3, 4e-3, 1e-3], [9e-3, 1e-3, 5e-3], [1e-3, 1e-3, torch.inf]], dtype=torch.float64)


def test_priced_keeps_a_candidate_iff_its_importance_pays_for_its_time():
    # λ = 0.05 / ms: thresholds λ·t = [0.05, 0.2, 0.05], [0.45, 0.05, 0.25], [0.05, 0.05, ∞]
    keep = priced_keep(IMP, T_S, 0.05)
    assert keep.tolist() == [[True, True, True], [True, True, False], [True, True, False]]
    # λ = 0.1 / ms: [0.1, 0.4, 0.1], [0.9, 0.1, 0.5], [0.1, 0.1, ∞]; top-1s stay even when too dear
    assert priced_keep(IMP, T_S, 0.1).tolist() == [
        [True, False, True],
        [True, True, False],
        [True, True, False],
    ]
    assert priced_keep(IMP, T_S.clamp(max=1.0), 0.0).all()  # λ = 0: vanilla top-k (reachable)


def test_a_cap_brings_back_all_but_the_worst_dropped_ratios():
    keep = priced_keep(IMP, T_S, 0.5)  # drops every non-top-1
    assert keep.tolist() == [[True, False, False]] * 3
    # w/t of the dropped: t0 [75, 200] /s, t1 [250, 30], t2 [350, 0 (unreachable)]
    assert cap_drops(keep, IMP, T_S, 1).tolist() == [
        [True, False, True],
        [True, True, False],
        [True, True, False],
    ]
    assert cap_drops(keep, IMP, T_S, 0).tolist() == [
        [True, True, True],
        [True, True, True],
        [True, True, False],
    ]
    assert cap_drops(keep, IMP, T_S, 2).tolist() == keep.tolist()


@pytest.mark.parametrize("renormalize", [True, False])
def test_priced_matches_a_plain_python_reference_on_paper_views(renormalize):
    for seed in range(10):
        route, view = random_route(t=12, k=4, renormalize=renormalize, seed=seed), paper_view(seed)
        t_ms = view.per_token_s() * 1e3
        price = 0.02 * (1 + seed % 4)
        ref = [
            [
                k == 0 or float(route.importance[j, k]) >= price * t_ms[int(route.candidates[j, k])]
                for k in range(4)
            ]
            for j in range(12)
        ]
        sel = make_policy("priced", price_per_ms=price).select(route, view)
        assert sel.keep.tolist() == ref
        check_selection(route, sel)


def test_a_uniformly_slower_cell_drops_more_under_priced_but_not_under_wdmoe():
    route, view = random_route(t=64, k=4, seed=3), paper_view(3)
    slow = replace(view, flops_per_s=view.flops_per_s / 1e3)  # every device ~ much slower
    assert (slow.per_token_s() > 2 * view.per_token_s()).all()
    priced, wdmoe = make_policy("priced", price_per_ms=0.05), make_policy("wdmoe", theta=0.2)
    assert priced.select(route, slow).keep.sum() < priced.select(route, view).keep.sum()
    # WDMoE-θ compares a token's candidates with each other: it barely reacts to a uniform slow-down
    assert abs(int(wdmoe.select(route, slow).keep.sum()) - int(wdmoe.select(route, view).keep.sum())) <= 8


def test_priced_rejects_bad_parameters_and_needs_a_view():
    with pytest.raises(ConfigError, match=r"priced\.price_per_ms = -1\.0 is out of range"):
        make_policy("priced", price_per_ms=-1.0)
    with pytest.raises(ConfigError, match=r"priced\.max_drop = -1 is out of range"):
        make_policy("priced", max_drop=-1)
    with pytest.raises(ConfigError, match="policy 'priced' is channel-aware"):
        make_policy("priced").select(random_route())
    assert np.isfinite(paper_view(0).per_token_s()).all()


# --- marginal: the wait one token less saves, under the allocator -------------------------------

from wdmoe.allocation import make_allocator  # noqa: E402
from wdmoe.policies.marginal import drop_round, marginal_ms, wait_s  # noqa: E402

MINMAX = make_allocator("minmax")


def test_a_drop_round_drops_cheap_pairs_on_dear_devices_lowest_first_within_the_step():
    imp = np.array([[0.5, 0.3, 0.2], [0.6, 0.25, 0.15], [0.4, 0.35, 0.25]])
    dev = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    keep = np.ones((3, 3), dtype=bool)
    cost = np.array([1.0, 0.1, 10.0])  # ms per token; λ = 0.05 → thresholds 0.05, 0.005, 0.5
    # device 2 (threshold 0.5): non-top-1 pairs (0, 2) w 0.2 and (1, 1) w 0.25; the top-1 (2, 0) stays
    out = drop_round(keep, imp, dev, cost, 0.05, step=1.0)
    assert out.tolist() == [[True, True, False], [True, False, True], [True, True, True]]
    # step ⌈0.25·3⌉ = 1: only the lowest (0.2) goes this round
    assert drop_round(keep, imp, dev, cost, 0.05, step=0.25).tolist() == [
        [True, True, False],
        [True, True, True],
        [True, True, True],
    ]
    # unprotected: device 2's top-1 (2, 0) w 0.4 < 0.5 goes too
    assert not drop_round(keep, imp, dev, cost, 0.05, step=1.0, first_slot=0)[2, 0]


def test_marginal_cost_is_the_wait_one_token_less_saves():
    view = paper_view(1)
    n = np.full(8, 40.0)
    c = marginal_ms(view, MINMAX, n)
    for u in range(8):
        less = n.copy()
        less[u] -= 1
        split = view.allocate_devices(MINMAX, less)
        ref = split.device_time_s(less).max()  # every device busy: the wait is the slowest
        assert c[u] == pytest.approx((wait_s(view, MINMAX, n) - ref) * 1e3, rel=1e-9)
    assert (c > 0).all() and wait_s(view, MINMAX, np.zeros(8)) == 0.0


def test_the_power_limited_device_costs_more_than_its_equal_share_time_says():
    # the paper cell: one device far out; under min-max its token costs the wait far more than t(1)
    for seed in range(6):
        view = paper_view(seed)
        c = marginal_ms(view, MINMAX, np.full(8, 50.0))
        t1 = view.per_token_s() * 1e3
        assert c.max() / np.median(c) > t1.max() / np.median(t1)


@pytest.mark.parametrize("protect", [True, False])
def test_marginal_keeps_its_invariants_and_spends_drops_on_the_straggler(protect):
    for seed in range(6):
        route, view = random_route(t=40, e=8, k=7, renormalize=False, seed=seed), paper_view(seed)
        sel = make_policy("marginal", price_per_ms=0.3, protect_top1=protect).select(route, view)
        check_selection(route, sel)
        if protect:
            assert sel.keep[:, 0].all()
        assert make_policy("marginal", price_per_ms=0.0).select(route, view).keep.all()  # all reachable here
    # seed 0: device 4 is far out and power-limited; it sets the wait, and loses most
    route, view = random_route(t=40, e=8, k=7, renormalize=False, seed=0), paper_view(0)
    keep = make_policy("marginal", price_per_ms=0.03, protect_top1=protect).select(route, view).keep
    dev = view.placement[route.candidates.numpy()]
    full = np.bincount(dev.reshape(-1), minlength=8).astype(float)
    dropped = np.bincount(dev[~keep.numpy()], minlength=8)
    assert dropped.argmax() == marginal_ms(view, MINMAX, full).argmax() == 4
    with pytest.raises(ConfigError, match=r"marginal\.step = 0\.0 is out of range"):
        make_policy("marginal", step=0.0)
