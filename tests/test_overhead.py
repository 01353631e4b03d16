"""The software's own cost per message (wdmoe.latency.overhead): measured by the runtime, priced by
one rule in both faces — every busy device's t_u plus its ô_u, in the wait and in the budgets."""

import math
import time

import numpy as np
import pytest
import torch

from tiny import TINY
from wdmoe.allocation import make_allocator
from wdmoe.config import load_scenario
from wdmoe.latency.cell import Cell
from wdmoe.latency.deadline import DeadlineRule
from wdmoe.latency.overhead import overhead_samples_s, running_estimate_s
from wdmoe.latency.pricing import Calls, price_layer
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.simulate import SimSettings, Simulation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.randint(4, 120, (1, 7), generator=torch.Generator().manual_seed(11))


def test_samples_are_wall_over_time_scale_minus_the_price_never_below_zero():
    wall = np.array([3e-3, np.nan, 1e-4, 2e-2])
    got = overhead_samples_s(wall, [1e-3, 1e-3, 1e-3, 1e-3], time_scale=0.5)
    np.testing.assert_allclose(got[[0, 2, 3]], [5e-3, 0.0, 3.9e-2])
    assert math.isnan(got[1])
    assert running_estimate_s(None, 2.0) == 2.0
    assert running_estimate_s(2.0, 4.0, weight=0.25) == pytest.approx(2.5)
    with pytest.raises(AssertionError):
        running_estimate_s(1.0, 1.0, weight=0.0)


@pytest.mark.parametrize("allocator", ["equal", "minmax"])
def test_priced_overhead_adds_to_every_busy_device_and_to_its_budget(allocator):
    snap = Cell(load_scenario("paper", TINY), 4, seed=3).snapshot(0.0)
    u = snap.view.channel.num_devices
    tokens = np.array([2.0, 0.0, 1.0, 3.0] + [0.0] * (u - 4))
    overhead = np.linspace(1e-3, 4e-3, u)
    rule = Calls(DeadlineRule(slack=2.0, grace_s=0.01))
    alloc = make_allocator(allocator)
    plain = price_layer(snap.view, snap.true, alloc, tokens, rule)
    priced = price_layer(snap.view, snap.true, alloc, tokens, Calls(rule.rule, overhead_s=overhead))
    busy = tokens > 0
    if allocator == "equal":  # the same split: t_u grows by exactly ô_u where there is work
        added = priced.latency.devices.total_s - plain.latency.devices.total_s
        np.testing.assert_allclose(added, np.where(busy, overhead, 0.0), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(priced.expected_s - plain.expected_s, np.where(busy, overhead, 0.0))
    assert float(priced.wait_s) > float(plain.wait_s)
    assert (priced.budget_s[busy] > plain.budget_s[busy]).all()
    total = priced.latency.devices.total_s
    assert float(priced.wait_s) == pytest.approx(float(np.max(np.minimum(total, priced.budget_s)[busy])))


def test_the_simulator_and_the_runtime_price_the_same_overhead_alike(lab_factory):
    """The BS pricing each device's ô (its estimates held at 2 ms of the cell) and the simulator
    told ``software_overhead_ms=2``: the same per-layer waits and total, from the same function."""
    settings = RuntimeSettings(emulate_links=True, allocator="minmax", software_overhead="measured")
    still = ["channel.coherence_s=10", "mobility.model=static"]  # one fading block for the test
    lab = lab_factory(devices=8, settings=settings, overrides=still)
    for entry in lab.bs.registry.devices.values():
        entry.overhead_s = 2e-3
    lab.bs.registry.note_overheads = lambda samples, pings: None  # hold the estimates
    lab.bs.t0 = time.monotonic()  # the BS's clock at 0, as the simulator's: both in block 0
    lab.wm.model(IDS)
    at_bs = lab.bs.last_priced
    sims = {
        ms: Simulation(lab.ref, lab.bs.scenario, SimSettings(allocator="minmax", software_overhead_ms=ms))
        for ms in (0.0, 2.0)
    }
    steps = {}
    for ms, sim in sims.items():
        with sim.attached():
            lab.ref.model(IDS)
        steps[ms] = sim.records[-1]
    assert at_bs is not None
    np.testing.assert_allclose(at_bs.wait_s, steps[2.0].waiting_s, rtol=1e-12)
    assert float(at_bs.latency.total_s) == pytest.approx(steps[2.0].total_s, rel=1e-12)
    assert steps[2.0].total_s > steps[0.0].total_s + 2 * 2e-3  # two MoE layers, 2 ms each at least


def test_the_bs_measures_each_device_from_its_ping_on(lab_factory):
    """Every device called gets an estimate (started at its ping's round trip, then its messages'
    samples), priced or not."""
    lab = lab_factory(devices=4)
    assert lab.bs.settings.software_overhead == "none"
    assert all(e.overhead_s is None for e in lab.bs.registry.devices.values())
    lab.wm.model(IDS)
    estimates = lab.bs.registry.overheads_s()
    called = [u for u, e in lab.bs.registry.devices.items() if e.overhead_s is not None]
    assert called and all(0.0 < estimates[u] < 1.0 for u in called), estimates
    priced, view = lab.bs.last_priced, lab.bs.snapshot()[0].view
    assert priced is not None  # "none": measured, not priced — compute + τ0 only
    unpriced = view.cost.fixed_s(priced.device_tokens, view.flops_per_s)
    np.testing.assert_allclose(priced.latency.devices.compute_s, unpriced, rtol=1e-12)


def test_the_bs_own_cost_is_kept_per_kind_of_forward_and_read_before_it_is_noted():
    from wdmoe.latency.overhead import bs_own_sample_s
    from wdmoe.runtime.own_cost import OwnCost

    assert bs_own_sample_s(0.5, 0.3, 0.05) == pytest.approx(0.15)
    assert bs_own_sample_s(0.5, 0.6, 0.0) == 0.0  # a cost, never a credit
    own = OwnCost()
    assert own.estimate_s(1, 1, decode=True) == 0.0  # nothing measured yet
    own.note(1, 1, True, 0.04)
    own.note(4, 1, True, 0.10)
    own.note(1, 20, False, 0.40)  # a prefill of 20 tokens: 20 ms a token
    assert own.estimate_s(1, 1, True) == pytest.approx(0.04)
    assert own.estimate_s(3, 1, True) == pytest.approx(0.10)  # the nearest batch size seen
    assert own.estimate_s(1, 10, False) == pytest.approx(0.20)
    own.note(1, 1, True, 0.14)
    assert own.estimate_s(1, 1, True) == pytest.approx(0.9 * 0.04 + 0.1 * 0.14)  # α = 0.1


def test_a_bs_pricing_its_software_adds_its_own_cost_to_each_forwards_prediction(lab_factory):
    from wdmoe.runtime import api

    lab = lab_factory(devices=4, settings=RuntimeSettings(software_overhead="measured", grace_s=5.0))
    records, end_forward = [], lab.bs.end_forward

    def keep(fwd, new_tokens):
        end_forward(fwd, new_tokens)
        records.append(fwd.requests[0].forwards[-1])

    lab.bs.end_forward = keep
    for _ in range(2):
        lab.bs.generate(api.GenerateRequest("the router sends", max_new_tokens=5, chat=False), lambda _: None)
    assert lab.bs.own_cost.decode_s and lab.bs.own_cost.prefill_token_s is not None
    assert records[0]["bs_own_s"] == 0.0  # the first forward: nothing measured before it
    later = records[5:]  # the second request: every forward has earlier ones of its kind
    assert all(r["bs_own_s"] > 0 for r in later)
    assert all(r["predicted_s"] >= r["moe_predicted_s"] + r["bs_own_s"] for r in later)
