"""One core under two faces: the simulator and the BS price a forward with the same function, and a
feedback policy (slo) adapts in both."""

import time

import numpy as np
import pytest
import torch

from lab import TOKEN
from tiny import TINY, tiny_model
from wdmoe.allocation import make_allocator
from wdmoe.config import load_scenario
from wdmoe.latency.cell import Cell
from wdmoe.latency.pricing import price_forward, price_layer, stack_layers
from wdmoe.models.install import install
from wdmoe.policies import make_policy
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.client import BSClient
from wdmoe.simulate import SimSettings, Simulation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.randint(4, 120, (1, 7), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("allocator", ["equal", "minmax", "energy"])
def test_the_simulator_and_the_bs_price_a_forward_alike(lab_factory, allocator):
    """A forward through 8 loopback devices with emulated links, and the same forward simulated on
    the BS's scenario and trace: the same per-layer waits and total, from the same function."""
    settings = RuntimeSettings(emulate_links=True, allocator=allocator, energy_slack=0.3)
    still = ["channel.coherence_s=10", "mobility.model=static"]  # one fading block for the test
    lab = lab_factory(devices=8, settings=settings, overrides=still)
    lab.bs.t0 = time.monotonic()  # the BS's clock at 0, as the simulator's: both in block 0
    lab.wm.model(IDS)
    at_bs = lab.bs.last_priced
    sim = Simulation(lab.ref, lab.bs.scenario, SimSettings(allocator=allocator, energy_slack=0.3))
    with sim.attached():
        lab.ref.model(IDS)
    step = sim.records[-1]
    assert at_bs is not None and step.waiting_s.shape == at_bs.wait_s.shape == (2,)
    assert (step.waiting_s > 0).all()
    np.testing.assert_allclose(at_bs.wait_s, step.waiting_s, rtol=1e-12)
    assert float(at_bs.latency.total_s) == pytest.approx(step.total_s, rel=1e-12)
    np.testing.assert_allclose(at_bs.latency.devices.uplink_s, step.uplink_s, rtol=1e-12)


def test_a_forward_priced_layer_by_layer_equals_it_priced_at_once():
    scenario = load_scenario("paper", TINY)
    snap = Cell(scenario, 4, seed=2).snapshot(0.0)
    loads = np.array([[3, 0, 1, 2, 0, 0, 5, 1], [1, 1, 1, 1, 0, 2, 0, 0]], dtype=float)
    alloc = make_allocator("minmax")
    whole = price_forward(snap.view, snap.true, alloc, scenario, loads, 7, 0)
    layers = [price_layer(snap.view, snap.true, alloc, n) for n in loads]
    stacked = stack_layers(layers, whole.latency.bs_s, whole.latency.head_s)
    np.testing.assert_allclose(stacked.wait_s, whole.wait_s, rtol=1e-12)
    assert float(stacked.latency.total_s) == pytest.approx(float(whole.latency.total_s), rel=1e-12)
    np.testing.assert_allclose(stacked.bandwidth_hz, whole.bandwidth_hz, rtol=1e-12)


def run_requests(policy, scenario, n=40):
    """``n`` one-forward requests (scored sequences, as eval's multiple choice) in the simulator;
    their latencies and the policy at the end."""
    wm = install(tiny_model("mixtral"), policy)
    sim = Simulation(wm, scenario, SimSettings(seed=5))
    gen = torch.Generator().manual_seed(1)
    with sim.attached():
        for _ in range(n):
            sim.new_request()
            wm.model(torch.randint(4, 120, (1, 24), generator=gen))
    return np.array([r.total_s for r in sim.records]), wm.policy


def test_slo_adapts_in_the_simulator_and_meets_its_target_within_10_percent():
    """Eval, sweep and demo run the model in a Simulation, which tells the policy what every
    forward cost: θ rises until requests meet the target."""
    scenario = load_scenario("paper", [*TINY, "channel.fading=none", "cell.bandwidth_hz=2e5"])
    fast, _ = run_requests(make_policy("wdmoe", theta=0.5), scenario)
    slow, _ = run_requests(make_policy("topk"), scenario)
    target = float(fast.mean() + slow.mean()) / 2
    assert slow.mean() > 1.2 * target > target > 1.2 * fast.mean()  # a target that needs θ > 0
    latencies, policy = run_requests(make_policy("slo", target_s=target, gain=0.2, theta_max=0.5), scenario)
    assert policy.theta > 0.0  # θ moved from θ_min = 0 (top-k)
    late = latencies[10:].mean()
    assert abs(late - target) <= 0.1 * target, (late, target)


def test_slo_adapts_at_the_bs(lab_factory):
    """At the BS the policy is told the measured time of every forward: with a target no forward
    can meet, θ climbs to θ_max; with one every forward meets, it stays at θ_min."""
    for target, want in ((1e-6, 0.4), (1e3, 0.0)):
        params = {"target_s": target, "gain": 0.1, "theta_max": 0.4}
        lab = lab_factory(devices=2, settings=RuntimeSettings(policy="slo", params=params))
        with BSClient(lab.server.address, TOKEN) as c:
            c.generate(api.GenerateRequest("what is the router", max_new_tokens=8))
        assert lab.wm.policy.theta == pytest.approx(want)
