"""Outage and deadlines under both faces: the simulator and the runtime (tiny model, loopback
devices, emulated links, time scale 1) replay one trace where one device's link goes into outage
and another misses its deadline under stale CSI; they price every forward alike and drop the same
experts."""

import time
from dataclasses import replace

import numpy as np
import pytest

from tiny import tiny_tokenizer
from wdmoe.channel import generate_trace
from wdmoe.generate import generate
from wdmoe.latency.cell import Cell, Csi
from wdmoe.latency.deadline import DeadlineRule
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.simulate import SimSettings, Simulation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Four devices at fixed places, no fading: the channel is whatever the trace below makes it.
CELL = [
    "cell.bandwidth_hz=4e5",
    "channel.fading=none",
    "channel.coherence_s=10",
    "mobility.model=static",
    "cell.positions_m=[[3, 0], [0, 4], [-5, 0], [0, -6]]",
    "channel.los=los",
    "channel.shadowing_std_db=0",
]
GRACE_S = 0.04
START_S = 15.0  # the middle of block 1 (blocks of 10 s): every forward of the test runs there
PROMPT, NEW_TOKENS = "the router sends each token to", 6


def trace_with_events(scenario):
    """Block 0: all links fine. From block 1 device 0's link is in outage (its SNR 90 dB down); in
    block 1 device 1 is 78 dB down — slow, not down. With CSI one block late, the BS believes
    block 0 throughout block 1: it calls device 0 (lost at its deadline) and budgets device 1
    for a fast link (late)."""
    trace = generate_trace(scenario, 4, scenario.seed)
    dl, ul = trace.fading_dl.copy(), trace.fading_ul.copy()
    dl[1:, 0] = ul[1:, 0] = 1e-9
    dl[1, 1] = ul[1, 1] = 10 ** (-7.8)
    return replace(trace, fading_dl=dl, fading_ul=ul)


def test_the_simulator_and_the_runtime_agree_on_outage_and_deadline_misses(lab_factory):
    rule = DeadlineRule(grace_s=GRACE_S)
    settings = RuntimeSettings(
        emulate_links=True, grace_s=GRACE_S, csi_delay_blocks=1, bench_after=1000, max_active=1
    )
    lab = lab_factory(devices=4, settings=settings, overrides=CELL)
    scenario, csi = lab.bs.scenario, Csi(delay_blocks=1)
    trace = trace_with_events(scenario)

    # the events the test is about hold on this trace (block 1, as the BS sees it)
    snap = Cell(scenario, 4, 0, csi, trace=trace).snapshot(START_S)
    assert snap.view.up.all() and list(snap.true_up) == [False, True, True, True]
    one = np.ones(4)
    expected, true = snap.view.device_time_s(one), snap.view.times_on(snap.true, one).total_s
    assert true[1] > 1.5 * rule.budgets_s(expected)[1]  # device 1 is late even for one token

    # the runtime: the BS's clock at START_S, its cell on the trace
    lab.bs.cell = Cell(scenario, 4, 0, csi, wrap=True, trace=trace)
    priced_at_bs = []
    end_forward = lab.bs.end_forward

    def keep_price(fwd, new_tokens):
        end_forward(fwd, new_tokens)
        priced_at_bs.append((lab.bs.last_priced, fwd.requests[0].forwards[-1]))

    lab.bs.end_forward = keep_price
    lab.bs.t0 = time.monotonic() - START_S
    served = lab.bs.generate(api.GenerateRequest(PROMPT, max_new_tokens=NEW_TOKENS), lambda _: None)

    # the simulator: the same model, scenario, trace, CSI and rule, its clock at START_S
    sim_settings = SimSettings(csi_delay_blocks=1, deadline=rule)
    sim = Simulation(lab.ref, scenario, sim_settings)
    sim.cell = Cell(scenario, 4, 0, csi, trace=trace)
    sim.time_s = START_S
    with sim.attached():
        text = generate(lab.ref, tiny_tokenizer(), PROMPT, max_new_tokens=NEW_TOKENS, record=False).text

    assert text == served["text"]  # the same experts dropped: the same answer
    assert len(sim.records) == len(priced_at_bs) == served["forwards"]
    for step, (priced, measured) in zip(sim.records, priced_at_bs, strict=True):
        assert step.total_s == pytest.approx(float(priced.latency.total_s), rel=0.05)
        np.testing.assert_array_equal(step.cut_down, priced.down)
        np.testing.assert_array_equal(step.cut_late, priced.late)
        # the emulated links really waited out what was priced (outage: the whole budget)
        assert measured["measured_s"] >= 0.9 * measured["moe_predicted_s"]
    cut_down = sum(r.cut_down.sum(0) for r in sim.records)
    cut_late = sum(r.cut_late.sum(0) for r in sim.records)
    assert cut_down[0] > 0 and cut_down[1:].sum() == 0  # device 0 lost its calls to outage
    assert cut_late[1] > 0 and cut_late[[0, 2, 3]].sum() == 0  # device 1 missed deadlines
    # the BS's own books saw the same misses: every cut call failed with DEADLINE_EXCEEDED
    books = {d["slot"]: d["failures"].get("DEADLINE_EXCEEDED", 0) for d in lab.bs.summary()["devices"]}
    per_device = [int(np.sum([(r.cut_down | r.cut_late)[:, u].sum() for r in sim.records])) for u in range(4)]
    calls_cut = [books[u] for u in range(4)]
    assert calls_cut[2:] == [0, 0] and calls_cut[0] >= per_device[0] > 0 and calls_cut[1] >= per_device[1] > 0
