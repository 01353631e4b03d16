"""Energy per device: hand-computed sums for a made-up layer, records that add up over layers,
idle devices that spend nothing, and joules in the latency summary."""

import numpy as np
import pytest

from test_simulate import run
from tiny import TINY
from wdmoe.config import load_scenario
from wdmoe.eval.results import latency_summary, per_request
from wdmoe.latency.devices import DEVICE_CLASSES, devices_for
from wdmoe.latency.energy import DeviceEnergy, EnergyModel, attribute, device_energy
from wdmoe.latency.model import DeviceTimes
from wdmoe.policies import make_policy

# A made-up layer on 2 devices: 3 and 0 tokens, F_tok = 1e9 FLOPs, ε = 10 / 20 pJ/FLOP,
# P_rx = 1 W / 2 W, P_tx = 1.2 W / 2.5 W; device 0 receives 40 ms, computes, sends 50 ms.
MODEL = EnergyModel(np.array([10e-12, 20e-12]), np.array([1.0, 2.0]), np.array([1.2, 2.5]))
TIMES = DeviceTimes(np.array([0.04, 0.0]), np.array([0.003, 0.0]), np.array([0.05, 0.0]))


def test_a_made_up_layer_by_hand():
    spent = device_energy(MODEL, np.array([3.0, 0.0]), TIMES, 1e9)
    # compute: 3 tokens × 1e9 FLOP × 10e-12 J/FLOP = 0.03 J; radio: 1 W × 0.04 s + 1.2 W × 0.05 s
    assert spent.compute_j == pytest.approx([0.03, 0.0])
    assert spent.radio_j == pytest.approx([0.04 + 0.06, 0.0])
    assert spent.sum_j() == pytest.approx(0.13)
    assert spent.per_device_j() == pytest.approx([0.13, 0.0])


def test_a_device_with_no_work_spends_nothing_on_either_device():
    times = DeviceTimes(np.array([0.04, 0.02]), np.array([0.003, 0.001]), np.array([0.05, 0.03]))
    spent = device_energy(MODEL, np.array([3.0, 2.0]), times, 1e9)
    # device 1: 2 × 1e9 × 20e-12 = 0.04 J compute; 2 W × 0.02 s + 2.5 W × 0.03 s = 0.115 J radio
    assert spent.compute_j == pytest.approx([0.03, 0.04]) and spent.radio_j == pytest.approx([0.1, 0.115])
    forward = device_energy(MODEL, np.array([[3.0, 0.0], [1.0, 0.0]]), stack(TIMES, TIMES), 1e9)
    assert forward.per_device_j()[1] == 0.0 and forward.compute_j.shape == (2, 2)


def stack(*times):
    return DeviceTimes(
        *(np.stack([getattr(t, f) for t in times]) for f in ("downlink_s", "compute_s", "uplink_s"))
    )


def test_rows_served_together_share_the_batch_energy():
    batch = DeviceEnergy(np.array([0.3, 0.2]), np.array([0.6, 0.4]))
    rows = [attribute(batch, own, np.array([3.0, 2.0])) for own in ([1.0, 2.0], [2.0, 0.0])]
    assert sum(r.compute_j for r in rows) == pytest.approx(batch.compute_j)
    assert sum(r.radio_j for r in rows) == pytest.approx(batch.radio_j)
    assert rows[1].radio_j[1] == 0.0  # no tokens of its own on device 1: none of its airtime
    idle = attribute(batch, [0.0, 0.0], [0.0, 0.0])
    assert idle.sum_j() == 0.0


def test_energy_per_flop_is_the_class_power_over_its_flops():
    agx = DEVICE_CLASSES["jetson-agx-orin"]
    assert agx.joules_per_flop == pytest.approx(60.0 / agx.effective_flops_per_s)
    assert all(1e-12 < c.joules_per_flop < 1e-10 for c in DEVICE_CLASSES.values())  # pJ per FLOP
    cfg = load_scenario("paper", TINY)
    model = EnergyModel.from_scenario(cfg, 3)
    radiated_w = 10 ** ((cfg.cell.device_power_dbm - 30) / 10)
    rx = [d.radio_rx_w for d in devices_for(cfg.cell.device_classes, 3)]
    assert model.tx_power_w == pytest.approx(np.add(rx, radiated_w)) and model.rx_power_w == pytest.approx(rx)


def test_a_simulated_records_energy_is_its_layers_priced_times_and_tokens():
    records = run(make_policy("wdmoe", theta=0.3), steps=3)
    cfg = load_scenario("paper", TINY)
    units = records[0].device_tokens.shape[1]
    model = EnergyModel.from_scenario(cfg, units)
    flops = 2.0 * 3.0 * cfg.model.hidden_size * cfg.model.ffn_size
    for r in records:
        assert r.compute_j is not None and r.radio_j is not None and r.compute_j.shape == r.downlink_s.shape
        assert r.compute_j == pytest.approx(r.device_tokens * flops * model.joules_per_flop)
        radio = model.rx_power_w * r.downlink_s + model.tx_power_w * r.uplink_s
        assert r.radio_j == pytest.approx(radio)
        assert r.energy_j == pytest.approx(sum(r.compute_j[i].sum() + r.radio_j[i].sum() for i in range(2)))
        idle = r.device_tokens == 0
        assert np.all(r.compute_j[idle] == 0.0) and np.all(r.radio_j[idle] == 0.0)
    assert any((r.device_tokens == 0).any() for r in records)  # the θ policy left some device idle


def test_the_latency_summary_gives_joules_per_request_and_per_device():
    records = run(make_policy("topk"), steps=3)
    summary = latency_summary(records)
    per_req = per_request(records, lambda r: r.energy_j)
    assert summary["energy_j"] == pytest.approx(np.mean(per_req)) and summary["energy_j"] > 0
    assert summary["compute_j"] + summary["radio_j"] == pytest.approx(summary["energy_j"])
    devices = summary["per_device_energy"]
    assert set(devices) == {"compute_j", "radio_j", "energy_j"}
    assert sum(devices["energy_j"]) == pytest.approx(summary["energy_j"])
    unaccounted = [r.__class__(**{**r.__dict__, "compute_j": None}) for r in records]
    assert "energy_j" not in latency_summary(unaccounted)


@pytest.mark.usefixtures("one_torch_thread")
def test_rows_of_a_batched_step_add_up_to_the_steps_energy():
    import torch

    from tiny import tiny_model
    from wdmoe.models.install import install
    from wdmoe.models.requests import serving_rows
    from wdmoe.runtime.bs import fit_scenario
    from wdmoe.simulate import SimSettings, Simulation

    wm = install(tiny_model("mixtral"))
    scenario = fit_scenario(load_scenario("lab", ["cell.num_devices=4"]), wm, "mixtral")
    sim = Simulation(wm, scenario, SimSettings(allocator="minmax", channel_moves=False))
    with sim.attached(), torch.no_grad(), serving_rows(["a", "b", "c"], [0, 0, 0]):
        wm.model(input_ids=torch.tensor([[5], [9], [17]]))
    rows = sim.records
    step, model = rows[0], EnergyModel.from_scenario(scenario, 4)
    flops = 2.0 * 3.0 * scenario.model.hidden_size * scenario.model.ffn_size
    batch = device_energy(model, step.device_tokens, stack_of(step), flops)  # device_tokens: the step's
    assert sum(r.compute_j for r in rows) == pytest.approx(batch.compute_j)
    assert sum(r.radio_j for r in rows) == pytest.approx(batch.radio_j)
    assert sum(r.energy_j for r in rows) == pytest.approx(batch.sum_j())


def stack_of(record):
    return DeviceTimes(record.downlink_s, record.compute_s, record.uplink_s)
