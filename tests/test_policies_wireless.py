"""Channel-aware selection policies against plain-Python references, their invariants, the latency
view they read, and a policy installed in a tiny Mixtral with a channel snapshot."""

import copy
import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from tiny import tiny_model
from wdmoe.allocation import make_allocator
from wdmoe.channel import generate_trace
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError, UnknownNameError
from wdmoe.latency import ExpertCost, device_time_s, layer_demand
from wdmoe.latency.cell import Cell, Csi, noisy_csi
from wdmoe.latency.view import ExpertLatency
from wdmoe.models.install import install
from wdmoe.policies import check_selection, make_policy
from wdmoe.policies.slo import SloState, slo_update
from wdmoe.types import Feedback, RouterOutput

CFG = load_scenario("paper")


def view(seed: int, placement=None, equal_channel: bool = False) -> ExpertLatency:
    """The BS's view of a random paper-cell snapshot (8 devices)."""
    state = generate_trace(CFG, 1, seed=seed).state(0)
    if equal_channel:  # every device as good as device 0, and all of the same class
        u = state.num_devices
        dl = replace(state.dl, gain=np.full(u, state.dl.gain[0]), snr_hz=np.full(u, state.dl.snr_hz[0]))
        ul = replace(state.ul, gain=np.full(u, state.ul.gain[0]), snr_hz=np.full(u, state.ul.snr_hz[0]))
        state = replace(state, dl=dl, ul=ul)
        return ExpertLatency.build(state, ExpertCost.from_config(CFG), 5e12, placement)
    return ExpertLatency.from_scenario(CFG, state, placement)


def random_route(t=16, e=8, k=3, renormalize=True, seed=0) -> RouterOutput:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g) * 2.0
    probs = torch.softmax(logits, -1)
    imp, idx = probs.topk(k, dim=-1)
    w = imp / imp.sum(-1, keepdim=True) if renormalize else imp
    return RouterOutput(logits, idx, w, imp, renormalize)


def kept_weights(route, keep):
    """The reference combine weights of a keep mask (mask_selection's rule, written out)."""
    out = []
    for j in range(len(keep)):
        w = [float(route.weights[j, k]) if keep[j][k] else 0.0 for k in range(len(keep[j]))]
        if route.renormalize:
            total = float(route.weights[j].sum())
            w = [x * total / sum(w) for x in w]
        out.append(w)
    return torch.tensor(out, dtype=route.weights.dtype)


def assert_selection(route, sel, ref_keep):
    assert sel.keep.tolist() == ref_keep
    torch.testing.assert_close(sel.weights, kept_weights(route, ref_keep), rtol=1e-5, atol=1e-7)


# --- references -------------------------------------------------------------------------------


def ref_wdmoe(route, t_e, theta):
    keep = []
    for j in range(route.candidates.shape[0]):
        wlr = [float(route.importance[j, k]) / t_e[int(route.candidates[j, k])] for k in range(route.top_k)]
        keep.append([k == 0 or w / sum(wlr) >= theta for k, w in enumerate(wlr)])
    return keep


def ref_topp(route, p):
    keep = []
    for j in range(route.candidates.shape[0]):
        imp = [float(x) for x in route.importance[j]]
        order = sorted(range(len(imp)), key=lambda k: -imp[k])
        row, mass = [False] * len(imp), 0.0
        for rank, k in enumerate(order):
            row[k] = rank == 0 or mass < p
            mass += imp[k] / sum(imp)
        keep.append(row)
    return keep


def ref_wdmoe_j(route, t_e, alpha, step, gamma):
    w = route.importance.double().tolist()
    t = [[t_e[int(e)] for e in row] for row in route.candidates]
    keep = [[True] * route.top_k for _ in w]

    def mean_wlr():
        vals = [w[j][k] / t[j][k] for j in range(len(w)) for k in range(route.top_k) if keep[j][k]]
        return sum(vals) / len(vals)

    target, theta = gamma * mean_wlr(), 0.0
    for _ in range(int(np.ceil(1.0 / step))):
        if mean_wlr() >= target:
            break
        theta = min(theta + step, 1.0)
        nxt = [row[:] for row in keep]
        for j in range(len(w)):
            align = [
                w[j][k] ** alpha * t[j][k] ** (alpha - 1) if keep[j][k] else 0.0 for k in range(route.top_k)
            ]
            alive = [k for k in range(1, route.top_k) if keep[j][k]]
            if alive:
                victim = min(reversed(alive), key=lambda k: w[j][k])
                if align[victim] / sum(align) < theta:
                    nxt[j][victim] = False
        keep = nxt
    return keep


def brute_force_budget_mass(route, lat, tau_s):
    """Max retained importance over every keep mask with ≥ 1 per token and devices within τ."""
    pairs = [(j, k) for j in range(route.candidates.shape[0]) for k in range(route.top_k)]
    best = None
    for bits in itertools.product([False, True], repeat=len(pairs)):
        kept = [p for p, b in zip(pairs, bits, strict=True) if b]
        if {j for j, _ in kept} != set(range(route.candidates.shape[0])):
            continue
        load = np.zeros(lat.channel.num_devices)
        for j, k in kept:
            load[lat.placement[int(route.candidates[j, k])]] += 1
        if np.all(lat.device_time_s(load)[load > 0] <= tau_s):
            mass = sum(float(route.importance[j, k]) for j, k in kept)  # float64
            best = mass if best is None else max(best, mass)
    return best


# --- the latency view ---------------------------------------------------------------------------


def test_latency_view_reuses_the_latency_model():
    placement = np.array([0, 0, 1, 2, 3, 3, 3, 7])  # several experts per device, idle devices
    lat = view(3, placement)
    flops = lat.flops_per_s
    per_device = device_time_s(layer_demand(np.ones(8), flops, lat.cost), lat.channel, lat.bandwidth_hz)
    np.testing.assert_allclose(lat.per_token_s(), per_device[placement])
    n_e = np.array([2, 1, 0, 4, 1, 0, 2, 3])
    n_u = np.array([3, 0, 4, 3, 0, 0, 0, 3.0])
    np.testing.assert_array_equal(lat.device_tokens(n_e), n_u)
    t_u = device_time_s(layer_demand(n_u, flops, lat.cost), lat.channel, lat.bandwidth_hz)
    np.testing.assert_allclose(lat.expert_time_s(n_e), t_u[placement])
    assert float(lat.layer_time_s(n_e)) == pytest.approx(max(t_u[u] for u in (0, 2, 3, 7)))
    np.testing.assert_allclose(lat.bandwidth_hz, np.full(8, CFG.cell.bandwidth_hz / 8))


def test_noisy_and_stale_csi_are_seeded_and_sized():
    trace = generate_trace(CFG, 5, seed=1)
    true = trace.state(4)
    block_s = trace.block_s
    stale = Cell(CFG, 5, seed=1, csi=Csi(delay_blocks=3))
    assert stale.snapshot(4.5 * block_s).estimate.time_s == trace.state(1).time_s
    assert stale.snapshot(1.5 * block_s).estimate.time_s == 0.0
    wrapped = Cell(CFG, 5, seed=1, csi=Csi(delay_blocks=3), wrap=True)
    assert wrapped.snapshot(1.5 * block_s).estimate.time_s == trace.state(3).time_s
    perfect = Cell(CFG, 5, seed=1)  # at any time (block edges included) the BS knows the truth
    for t in np.linspace(0.0, 4.99 * block_s, 97):
        snap = perfect.snapshot(t)
        assert snap.estimate.time_s == snap.true.time_s, t
    noisy = Cell(CFG, 5, seed=1, csi=Csi(error_std_db=3.0))
    again = Cell(CFG, 5, seed=1, csi=Csi(error_std_db=3.0))  # one draw per block: same estimate
    first, second = noisy.snapshot(2.5 * block_s).estimate, again.snapshot(2.5 * block_s).estimate
    np.testing.assert_array_equal(first.dl.gain, second.dl.gain)
    assert not np.array_equal(first.dl.gain, trace.state(2).dl.gain)
    a = noisy_csi(true, np.random.default_rng(7), 2.0)
    b = noisy_csi(true, np.random.default_rng(7), 2.0)
    np.testing.assert_array_equal(a.ul.snr_hz, b.ul.snr_hz)
    err_db = 10 * np.log10(np.concatenate([a.dl.gain / true.dl.gain, a.ul.gain / true.ul.gain]))
    assert 0 < np.abs(err_db).max() < 10
    np.testing.assert_allclose(a.dl.snr_hz / true.dl.snr_hz, a.dl.gain / true.dl.gain)
    np.testing.assert_array_equal(noisy_csi(true, np.random.default_rng(0), 0.0).dl.gain, true.dl.gain)
    with pytest.raises(ConfigError, match=r"csi\.error_std_db = -1.0 is out of range; allowed: \[0, 60\]"):
        noisy_csi(true, np.random.default_rng(0), -1.0)


# --- each policy against its reference -----------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("theta", [0.0, 0.1, 0.2, 0.3, 0.5])
def test_wdmoe_equals_reference(theta, k):
    for seed in range(6):
        route, lat = random_route(t=12, k=k, seed=seed), view(seed)
        sel = make_policy("wdmoe", theta=theta).select(route, lat)
        assert_selection(route, sel, ref_wdmoe(route, lat.per_token_s().tolist(), theta))
        scaled = make_policy("wdmoe", theta=theta, k_scaled=True).select(route, lat)
        assert_selection(route, scaled, ref_wdmoe(route, lat.per_token_s().tolist(), theta * 2 / k))


@pytest.mark.parametrize("renormalize", [True, False])
def test_wdmoe_theta0_and_topk_on_a_perfect_channel_are_the_routers_topk(renormalize):
    for seed in range(10):
        route = random_route(k=3, renormalize=renormalize, seed=seed)
        for lat in (view(seed), view(seed, equal_channel=True)):
            for sel in (
                make_policy("wdmoe", theta=0.0).select(route, lat),
                make_policy("topk").select(route, lat),
            ):
                assert sel.keep.all() and torch.equal(sel.weights, route.weights)
        # on a perfect channel the WLR share is the importance share: channel-blind thresholding
        perfect = view(seed, equal_channel=True)
        sel = make_policy("wdmoe", theta=0.3).select(route, perfect)
        share = route.importance / route.importance.sum(-1, keepdim=True)
        expected = (share >= 0.3) | (torch.arange(3) == 0)
        assert torch.equal(sel.keep, expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.95, 1.0])
def test_topp_equals_reference(p):
    for seed in range(10):
        route = random_route(t=12, k=4, seed=seed)
        sel = make_policy("topp", p=p).select(route)
        assert_selection(route, sel, ref_topp(route, p))
    assert make_policy("topp", p=1.0).select(route).keep.all()


@pytest.mark.parametrize(
    "alpha, step, gamma", [(0.5, 0.05, 1.2), (0.0, 0.1, 1.5), (1.0, 0.02, 1.1), (0.3, 0.2, 3)]
)
def test_wdmoe_j_equals_reference(alpha, step, gamma):
    for seed in range(6):
        route, lat = random_route(t=12, k=3, seed=seed), view(seed)
        sel = make_policy("wdmoe-j", alpha=alpha, delta_theta=step, gamma=gamma).select(route, lat)
        assert_selection(route, sel, ref_wdmoe_j(route, lat.per_token_s().tolist(), alpha, step, gamma))
    topk = make_policy("wdmoe-j", gamma=0.9).select(route, lat)
    assert topk.keep.all()


@pytest.mark.parametrize("placement", [None, np.array([0, 0, 1, 1, 2, 2, 3, 3])])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_budget_equals_brute_force_for_decode(k, placement):
    for seed in range(8):
        route, lat = random_route(t=1, k=k, seed=seed), view(seed, placement)
        t_e = lat.per_token_s()[route.candidates[0].numpy()]
        for tau_s in (0.5 * t_e.min(), *np.sort(t_e), 2.5 * t_e.max()):
            sel = make_policy("budget", tau_s=float(tau_s)).select(route, lat)
            mass = float(route.importance[sel.keep].double().sum())
            best = brute_force_budget_mass(route, lat, tau_s)
            if best is None:  # nothing fits τ: the candidate whose device finishes first
                assert sel.keep.sum() == 1 and t_e[sel.keep[0].numpy()][0] == t_e.min()
            else:
                assert mass == pytest.approx(best, rel=1e-12)
                n_e = np.bincount(route.candidates[sel.keep].numpy(), minlength=8)
                assert lat.expert_time_s(n_e)[n_e > 0].max() <= tau_s


def test_budget_prefill_is_exact_when_no_token_is_left_empty_and_feasible():
    checked = 0
    for seed in range(12):
        route, lat = random_route(t=3, k=2, seed=seed), view(seed, np.array([0, 0, 1, 1, 2, 2, 3, 3]))
        for tau_s in np.quantile(lat.expert_time_s(np.full(8, 2.0)), [0.2, 0.5, 0.9]):
            sel = make_policy("budget", tau_s=float(tau_s)).select(route, lat)
            n_e = np.bincount(route.candidates[sel.keep].numpy(), minlength=8)
            best = brute_force_budget_mass(route, lat, tau_s)
            if lat.expert_time_s(n_e)[n_e > 0].max() <= tau_s:
                assert best is not None and float(route.importance[sel.keep].double().sum()) <= best + 1e-12
                checked += 1
                if float(route.importance[sel.keep].double().sum()) < best - 1e-12:
                    pytest.fail(f"budget not optimal on seed {seed}, τ = {tau_s}")
    assert checked > 10


def ref_joint(route, lat, theta, max_iter):
    allocator = make_allocator("minmax")

    def select(v):
        return ref_wdmoe(route, v.per_token_s().tolist(), theta)

    def loads(keep):
        n = np.zeros(8)
        for j, row in enumerate(keep):
            for k, kept in enumerate(row):
                n[int(route.candidates[j, k])] += kept
        return n

    keep = select(lat)
    v = lat.allocate(allocator, loads(keep))
    for _ in range(max_iter):
        priced = v.with_bandwidth([b if b > 0 else CFG.cell.bandwidth_hz / 8 for b in v.bandwidth_hz])
        again = select(priced)
        nxt = [[a and b for a, b in zip(r, q, strict=True)] for r, q in zip(keep, again, strict=True)]
        if nxt == keep:
            break
        keep = nxt
        v = lat.allocate(allocator, loads(keep))
    return keep, v


@pytest.mark.parametrize("theta", [0.1, 0.3])
def test_joint_equals_reference_and_is_stable(theta):
    from wdmoe.policies.joint import joint_select, pricing_view
    from wdmoe.policies.wdmoe import WDMoE

    rounds = 0
    for seed in range(4):
        route, lat = random_route(t=6, k=3, seed=seed), view(seed)
        sel = make_policy("joint", theta=theta).select(route, lat)
        ref_keep, ref_view = ref_joint(route, lat, theta, 10)
        assert_selection(route, sel, ref_keep)
        sel2, v = joint_select(route, lat, WDMoE(theta), make_allocator("minmax"), 10)
        np.testing.assert_allclose(v.bandwidth_hz, ref_view.bandwidth_hz)
        again = WDMoE(theta).select(route, pricing_view(v))
        assert torch.equal(again.keep & sel2.keep, sel2.keep)  # a fixed point: nothing more to drop
        assert (sel.keep <= make_policy("wdmoe", theta=theta).select(route, lat).keep).all()
        rounds += int(
            not torch.equal(sel.keep, make_policy("wdmoe", theta=theta).select(route, lat).keep)
        )
    assert rounds > 0  # the alternation does change selections


def test_slo_control_law_and_convergence():
    s = SloState(0.1, spent_s=0.2)
    nxt = slo_update(s, 0.05, 10, 0.5, 0.1, (0.0, 0.6))
    assert nxt.spent_s == pytest.approx(0.25)
    assert nxt.theta == pytest.approx(0.1 + 0.1 * ((0.25 + 10 * 0.05) / 0.5 - 1))
    assert slo_update(s, 1.0, 10, 0.5, 0.1, (0.0, 0.6)).theta == 0.6  # clipped
    assert slo_update(s, 0.0, 0, 10.0, 1.0, (0.0, 0.6)).theta == 0.0  # slack: back to θ_min

    # A plant where a decode step takes 40 ms at θ = 0 and 15 ms at θ = 0.5: a 50-step request
    # must fit 1.2 s (prefill 0.1 s), which needs θ = 0.36; top-k would take 2.1 s.
    def step_s(theta):
        return 0.040 - 0.05 * theta

    policy = make_policy("slo", target_s=1.2, gain=0.05, theta_max=0.5)
    totals = []
    for _ in range(6):
        policy = policy.begin_request().observe(Feedback(0.1, 20, decode=False, steps_left=50))
        total = 0.1
        for n in range(50):
            dt = step_s(policy.theta)
            total += dt
            policy = policy.observe(Feedback(dt, 1, decode=True, steps_left=49 - n))
        totals.append(total)
    assert totals[0] < 2.1 and all(t <= 1.2 * 1.05 for t in totals[1:])
    assert 0.3 < policy.theta < 0.42  # it gives up no more than the target needs
    route, lat = random_route(seed=1), view(1)
    sel = policy.select(route, lat)
    assert torch.equal(sel.keep, make_policy("wdmoe", theta=policy.theta).select(route, lat).keep)


# --- invariants and errors ------------------------------------------------------------------------

ALL = [
    ("topk", {}),
    ("topk", {"k": 1}),
    ("wdmoe", {"theta": 0.3}),
    ("wdmoe", {"theta": 0.2, "k_scaled": True}),
    ("wdmoe-j", {}),
    ("topp", {"p": 0.6}),
    ("budget", {"tau_s": 0.004}),
    ("joint", {"theta": 0.3}),
    ("slo", {"state": SloState(0.4)}),
]


@pytest.mark.parametrize("name, params", ALL, ids=[f"{n}{p}" for n, p in ALL])
@pytest.mark.parametrize("renormalize", [True, False])
def test_every_policy_keeps_its_invariants(name, params, renormalize):
    policy = make_policy(name, **params)
    for seed in range(15):
        t, k = [(1, 2), (8, 2), (20, 4)][seed % 3]
        route, lat = random_route(t=t, k=k, renormalize=renormalize, seed=seed), view(seed)
        sel = policy.select(route, lat)
        check_selection(route, sel)
        assert (sel.weights[~sel.keep] == 0).all()
        if renormalize:
            torch.testing.assert_close(sel.weights.sum(-1), route.weights.sum(-1))
        else:
            torch.testing.assert_close(sel.weights, route.weights * sel.keep)


BAD = [
    ("wdmoe", {"theta": -0.1}, r"wdmoe\.theta = -0\.1 is out of range; allowed: \[0, 1\]"),
    ("wdmoe", {"theta": 1.5}, r"wdmoe\.theta = 1\.5 is out of range; allowed: \[0, 1\]"),
    ("joint", {"theta": -1}, r"joint\.theta = -1 is out of range; allowed: \[0, 1\]"),
    ("joint", {"max_iter": 0}, r"joint\.max_iter = 0 is out of range; allowed: \[1, 1000\]"),
    ("budget", {"tau_s": 0.0}, r"budget\.tau_s = 0\.0 is out of range; allowed: \(0, inf\]"),
    ("budget", {"tau_s": -1e-3}, r"budget\.tau_s = -0\.001 is out of range; allowed: \(0, inf\]"),
    ("topp", {"p": 0.0}, r"topp\.p = 0\.0 is out of range; allowed: \(0, 1\]"),
    ("wdmoe-j", {"alpha": 2.0}, r"wdmoe-j\.alpha = 2\.0 is out of range; allowed: \[0, 1\]"),
    ("wdmoe-j", {"delta_theta": 0.0}, r"wdmoe-j\.delta_theta = 0\.0 is out of range; allowed: \(0, 1\]"),
    ("wdmoe-j", {"gamma": -1.0}, r"wdmoe-j\.gamma = -1\.0 is out of range; allowed: \(0, inf\]"),
    ("slo", {"target_s": 0.0}, r"slo\.target_s = 0\.0 is out of range; allowed: \(0, inf\]"),
    (
        "slo",
        {"theta_min": 0.6},
        r"slo\.theta_min = 0\.6 is out of range; allowed: \[0, slo\.theta_max = 0\.5\]",
    ),
]


@pytest.mark.parametrize("name, params, match", BAD, ids=[f"{n}{p}" for n, p, _ in BAD])
def test_bad_parameters_name_the_field_value_and_range(name, params, match):
    with pytest.raises(ConfigError, match=match):
        make_policy(name, **params)


def test_unknown_names_and_missing_latency_are_clear():
    with pytest.raises(UnknownNameError, match="unknown policy 'wdmoe2'; choose one of: budget, capacity"):
        make_policy("wdmoe2")
    with pytest.raises(UnknownNameError, match="unknown bandwidth allocator 'fair'"):
        make_policy("joint", allocator="fair")
    for name in ("wdmoe", "wdmoe-j", "budget", "joint", "slo"):
        with pytest.raises(ConfigError, match=f"policy '{name}' is channel-aware and needs an ExpertLatency"):
            make_policy(name).select(random_route())
    make_policy("topp").select(random_route())  # channel-blind policies need nothing


# --- installed in a model ------------------------------------------------------------------------


def test_wdmoe_installed_in_tiny_mixtral_reads_the_context():
    ref = tiny_model("mixtral")
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    lat = view(0)
    wm = install(model, make_policy("wdmoe", theta=0.0))
    wm.set_view(lat)
    assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-5  # θ = 0 is the model itself

    wm.set_policy(make_policy("wdmoe", theta=0.3))
    wm.recorder.enabled = True
    dropped = model(ids).logits
    traces = wm.recorder.clear()
    assert not torch.allclose(dropped, ref(ids).logits)
    t_e = lat.per_token_s().tolist()
    for tr in traces:
        probs = torch.softmax(tr.logits, -1).gather(-1, tr.candidates)
        route = RouterOutput(tr.logits, tr.candidates, probs / probs.sum(-1, keepdim=True), probs, True)
        assert tr.keep.tolist() == ref_wdmoe(route, t_e, 0.3)
        assert (~tr.keep).sum() > 0 and tr.keep[:, 0].all()

    wm.set_view(None)
    with pytest.raises(ConfigError, match="set_view"):
        model(ids)


def test_a_cell_generates_its_trace_as_far_as_time_goes_and_then_wraps():
    """The trace grows with the clock (the same channel as one generated in full: traces are
    prefix-stable) and repeats after the cell's blocks."""
    lazy = Cell(CFG, 10_000, seed=4, wrap=True)
    full = Cell(CFG, 10_000, seed=4, wrap=True, trace=generate_trace(CFG, 10_000, seed=4))
    block_s = full.trace.block_s
    assert lazy.trace.num_blocks == Cell.FIRST_BLOCKS
    for t in (0.5 * block_s, 5000.5 * block_s, 9999.5 * block_s):
        np.testing.assert_array_equal(lazy.snapshot(t).true.ul.gain, full.snapshot(t).true.ul.gain)
    assert lazy.trace.num_blocks == 10_000
    wrapped = lazy.snapshot(10_003.5 * block_s)
    np.testing.assert_array_equal(wrapped.true.dl.gain, full.snapshot(3.5 * block_s).true.dl.gain)
