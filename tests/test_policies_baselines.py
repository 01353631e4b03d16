"""Published training-free baselines as policies, on hand-made router scores with hand-computed keep
masks: dynamic skipping (Lu et al., arXiv 2402.14800) and capacity-aware dropping / re-routing
(He et al., arXiv 2503.05066)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from wdmoe.errors import ConfigError
from wdmoe.policies import check_selection, make_policy
from wdmoe.policies.capacity import expert_capacity
from wdmoe.policies.dynskip import DynamicSkip, SkipCalibration, calibrate, weight_ratios
from wdmoe.types import RouterOutput


def route_of(candidates, importance, num_experts, renormalize=False) -> RouterOutput:
    """A route with the given candidates [T, K] and importance [T, K] (best first)."""
    cand = torch.tensor(candidates)
    imp = torch.tensor(importance, dtype=torch.float64)
    logits = torch.zeros(cand.shape[0], num_experts)
    weights = imp / imp.sum(-1, keepdim=True) if renormalize else torch.ones_like(imp)
    return RouterOutput(logits, cand, weights, imp, renormalize)


# --- dynamic skipping -----------------------------------------------------------------------------

SKIP_IMP = [[0.6, 0.32, 0.08], [0.5, 0.3, 0.2], [0.9, 0.06, 0.04]]


def test_dynskip_skips_candidates_whose_weight_is_below_beta_times_the_top1():
    # ratios w_j/w_0: [0.533, 0.133], [0.6, 0.4], [0.067, 0.044]; β = 0.5
    route = route_of([[0, 1, 2], [3, 4, 5], [6, 7, 0]], SKIP_IMP, 8)
    sel = make_policy("dynskip", beta=0.5).select(route)
    assert sel.keep.tolist() == [[True, True, False], [True, True, False], [True, False, False]]
    assert make_policy("dynskip", beta=0.0).select(route).keep.all()
    assert make_policy("dynskip", beta=1.0).select(route).keep.sum().item() == 3  # top-1s only


def test_dynskip_for_k2_is_the_papers_rule_and_renormalises():
    route = route_of([[0, 1], [2, 3], [4, 5]], [[0.7, 0.3], [0.55, 0.45], [0.8, 0.2]], 8, renormalize=True)
    sel = make_policy("dynskip", beta=0.5).select(route)  # skip e_1 iff w_1 < β·w_0
    assert sel.keep.tolist() == [[True, False], [True, True], [True, False]]
    check_selection(route, sel)
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(3, dtype=torch.float64))


def test_calibration_takes_the_median_ratio_per_layer_and_pooled():
    cal = calibrate([np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6, 0.7, 0.8])], source="hand")
    assert cal.betas == pytest.approx((0.2, 0.65)) and cal.beta_all == pytest.approx(0.5)
    assert cal.beta(0) == pytest.approx(0.2) and cal.beta(1) == pytest.approx(0.65)
    assert cal.beta(None) == cal.beta(7) == pytest.approx(0.5)  # unknown layer: pooled
    assert calibrate([np.array([0.1, 0.2, 0.3, 0.4])], quantile=0.25).betas == pytest.approx((0.175,))
    np.testing.assert_allclose(
        weight_ratios(torch.tensor(SKIP_IMP)),
        [0.6 / 1.125, 0.08 / 0.6, 0.6, 0.4, 0.06 / 0.9, 0.04 / 0.9],
        rtol=1e-6,
    )


def test_dynskip_reads_a_calibration_json_per_layer(tmp_path):
    cal = SkipCalibration(betas=(0.5, 0.1), beta_all=0.3, quantile=0.5, source="hand")
    path = tmp_path / "skip.json"
    path.write_text(cal.to_json())
    policy = make_policy("dynskip", calibration=str(path))
    assert isinstance(policy, DynamicSkip) and policy.table == cal
    route = route_of([[0, 1, 2], [3, 4, 5], [6, 7, 0]], SKIP_IMP, 8)
    at = {layer: policy.select(replace(route, layer=layer)).keep.tolist() for layer in (0, 1)}
    assert at[0] == [[True, True, False], [True, True, False], [True, False, False]]  # β = 0.5
    assert at[1] == [[True, True, True], [True, True, True], [True, False, False]]  # β = 0.1
    # a route without its layer: the pooled β = 0.3
    assert policy.select(route).keep.tolist() == [
        [True, True, False],
        [True, True, True],
        [True, False, False],
    ]
    assert DynamicSkip(table=cal).threshold(1) == 0.1


def test_dynskip_needs_exactly_one_threshold_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of beta"):
        make_policy("dynskip")
    with pytest.raises(ConfigError, match="exactly one of beta"):
        make_policy("dynskip", beta=0.5, calibration="x.json")
    with pytest.raises(ConfigError, match=r"dynskip\.beta = 1\.5 is out of range"):
        make_policy("dynskip", beta=1.5)
    with pytest.raises(ConfigError, match="is not a calibration JSON"):
        make_policy("dynskip", calibration=str(tmp_path / "missing.json"))


# --- capacity-aware dropping / re-routing -----------------------------------------------------------

# T = 4 tokens, E = 3 experts, k = K = 2. Expert 0 carries 4 pairs: the top-1s of t0, t1, and the
# second choices of t2 (0.45) and t3 (0.2).
CAP_CAND = [[0, 1], [0, 2], [1, 0], [2, 0]]
CAP_IMP = [[0.6, 0.4], [0.7, 0.3], [0.55, 0.45], [0.8, 0.2]]


def test_capacity_is_gamma_t_k_over_e_rounded_up():
    assert expert_capacity(4, 2, 3, 1.0) == 3  # ⌈8/3⌉
    assert expert_capacity(4, 2, 3, 0.5) == 2  # ⌈4/3⌉
    assert expert_capacity(8, 2, 4, 1.0) == 4  # exact: not rounded up
    assert expert_capacity(10, 7, 8, 1.2) == math.ceil(10.5)


@pytest.mark.parametrize(
    ("gamma", "expected"),
    [
        # C = 3: expert 0 has 2 top-1s, room 1 → keeps t2's 0.45, drops t3's 0.2
        (1.0, [[True, True], [True, True], [True, True], [True, False]]),
        # C = 2: expert 0 is full with its top-1s; experts 1 and 2 have room for one second choice
        (0.5, [[True, True], [True, True], [True, False], [True, False]]),
        # C = 1: every expert is full with its top-1s (expert 0 over capacity: top-1s stay)
        (0.25, [[True, False], [True, False], [True, False], [True, False]]),
        (2.0, [[True, True]] * 4),
    ],
)
def test_capacity_drop_keeps_the_highest_scores_and_every_top1(gamma, expected):
    route = route_of(CAP_CAND, CAP_IMP, 3)
    sel = make_policy("capacity", gamma=gamma).select(route)
    assert sel.keep.tolist() == expected
    check_selection(route, sel)


# T = 4, E = 4, K = 3 candidates, k = 2 active: C = ⌈4·2/4⌉ = 2. Expert 0 gets t0, t1 (top-1s) and
# t2 (0.35), t3 (0.3): both second choices drop. Expert 1 gets t2 (top-1), t0 (0.3), t1 (0.25):
# room 1 keeps t0's. Re-routing, highest score first: t2 → its 3rd, expert 2 (load 1 → 2);
# t3 → expert 3 (0 → 1); t1 → its 3rd, expert 2, is full: stays dropped.
RR_CAND = [[0, 1, 2], [0, 1, 2], [1, 0, 2], [2, 0, 3]]
RR_IMP = [[0.5, 0.3, 0.2], [0.6, 0.25, 0.15], [0.5, 0.35, 0.15], [0.5, 0.3, 0.2]]


def test_capacity_reroutes_overflow_to_the_next_candidate_with_room():
    route = route_of(RR_CAND, RR_IMP, 4)
    dropped = make_policy("capacity", gamma=1.0, k=2).select(route).keep.tolist()
    assert dropped == [[True, True, False], [True, False, False], [True, False, False], [True, False, False]]
    sel = make_policy("capacity", gamma=1.0, k=2, reroute=True).select(route)
    assert sel.keep.tolist() == [
        [True, True, False],
        [True, False, False],
        [True, False, True],
        [True, False, True],
    ]
    check_selection(route, sel)
    loads = torch.bincount(route.candidates[sel.keep], minlength=4)
    assert (loads <= 2).all()


def test_capacity_on_random_routes_respects_capacity_beyond_top1s():
    g = torch.Generator().manual_seed(0)
    for seed in range(20):
        t, e, k = 5 + seed, 8, 2 + seed % 3
        logits = torch.randn(t, e, generator=g)
        imp, cand = torch.softmax(logits, -1).topk(k + 1, dim=-1)
        route = RouterOutput(logits, cand, imp, imp, True)
        for reroute in (False, True):
            sel = make_policy("capacity", gamma=0.8, k=k, reroute=reroute).select(route)
            check_selection(route, sel)
            assert sel.keep[:, 0].all() and (reroute or not sel.keep[:, k:].any())
            cap = expert_capacity(t, k, e, 0.8)
            top1 = torch.bincount(route.candidates[:, 0], minlength=e)
            loads = torch.bincount(route.candidates[sel.keep], minlength=e)
            assert (loads <= torch.clamp(top1, min=cap)).all()


def test_capacity_rejects_bad_parameters():
    with pytest.raises(ConfigError, match=r"capacity\.gamma = 0\.0 is out of range"):
        make_policy("capacity", gamma=0.0)
    with pytest.raises(ConfigError, match=r"capacity\.k = 0 is out of range"):
        make_policy("capacity", k=0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("dynskip", {"beta": 0.3}),
        ("capacity", {"gamma": 0.7}),
        ("capacity", {"gamma": 0.7, "k": 2, "reroute": True}),
    ],
)
@pytest.mark.parametrize("renormalize", [True, False])
def test_baselines_keep_the_policy_invariants(name, params, renormalize):
    policy = make_policy(name, **params)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(12, 8, generator=g) * 2.0
        imp, cand = torch.softmax(logits, -1).topk(4, dim=-1)
        w = imp / imp.sum(-1, keepdim=True) if renormalize else imp
        route = RouterOutput(logits, cand, w, imp, renormalize)
        sel = policy.select(route)
        check_selection(route, sel)
        assert sel.keep[:, 0].all()
        if renormalize:
            torch.testing.assert_close(sel.weights.sum(-1), route.weights.sum(-1))
        else:
            torch.testing.assert_close(sel.weights, route.weights * sel.keep)


def test_the_wireless_block_tells_a_policy_which_layer_routed():
    """dynskip's per-layer β needs it: every MoE layer's route says its own index, in order."""
    from tiny import tiny_model
    from wdmoe.models.install import install
    from wdmoe.policies.base import Stateless

    seen: list[int | None] = []

    class Spy(Stateless):
        name = "spy"

        def select(self, route, view=None):
            seen.append(route.layer)
            return make_policy("topk").select(route)

    wm = install(tiny_model("mixtral"))
    wm.set_policy(Spy())
    wm.model(torch.randint(4, 120, (1, 5)))
    assert seen == list(range(len(wm.blocks))) and len(seen) >= 2
