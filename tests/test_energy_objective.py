"""The `energy` allocator: least radio energy within (1 + slack)·T*, against min-max and a brute-force grid.

The oracle writes rates and energies out again from the SPEC formulas (R = B·min(log2(1 + SNR/Γ),
η_max); E = P^rx·t^DL + P^tx·t^UL) and shares none of the allocator's code.
"""

import itertools
import math

import numpy as np
import pytest

from test_allocation import LINKS, case, makespan
from wdmoe.allocation import make_allocator
from wdmoe.allocation.energy import EnergyAllocator, default_energy, energy_params, radio_energy_at
from wdmoe.channel.state import ChannelState
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError
from wdmoe.latency import LayerDemand
from wdmoe.latency.energy import EnergyModel
from wdmoe.simulate import SimSettings

SLACKS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 3.0)
RX_W, TX_W = 1.28804, 1.28804 + 10 ** ((23.0 - 30.0) / 10)  # the paper cell's radio (W)


def energy_j(demand, state, bandwidth_hz, energy: EnergyModel | None = None) -> float:
    return float(radio_energy_at(demand, state, bandwidth_hz, energy or default_energy()).sum())


def plain_airtimes_s(demand: LayerDemand, channel: ChannelState, bandwidth_hz: np.ndarray):
    """(t^DL, t^UL) [..., U] from the SPEC formulas, broadcasting over grid points."""
    out = []
    for bits, link in ((demand.downlink_bits, channel.dl), (demand.uplink_bits, channel.ul)):
        band_p = link.power_band_hz if link.power_band_hz is not None else bandwidth_hz
        with np.errstate(divide="ignore", invalid="ignore"):
            se = np.minimum(np.log2(1 + link.snr_hz / band_p / link.snr_gap), link.max_se_bps_per_hz)
            out.append(np.where(bits > 0, bits / (bandwidth_hz * se), 0.0))
    return out


def grid_least_energy(demand: LayerDemand, channel: ChannelState, target_s: float, steps: int) -> float:
    """min over a grid of splits of the whole band (energy falls with every B_u, so the optimum
    uses all of it) of Σ_u (P^rx·t^DL + P^tx·t^UL), among splits with max_u t_u ≤ target."""
    active = np.flatnonzero(demand.active)
    fractions = [c for c in itertools.product(range(1, steps), repeat=len(active) - 1) if sum(c) < steps]
    shares = np.array([[*c, steps - sum(c)] for c in fractions], dtype=float) / steps
    bandwidth_hz = np.zeros((len(shares), channel.num_devices))
    bandwidth_hz[:, active] = shares * channel.bandwidth_hz
    dl_s, ul_s = plain_airtimes_s(demand, channel, bandwidth_hz)
    times = np.where(demand.active, dl_s + ul_s + demand.fixed_s, 0.0).max(axis=-1)
    energies = np.where(demand.active, RX_W * dl_s + TX_W * ul_s, 0.0).sum(axis=-1)
    feasible = times <= target_s
    assert feasible.any(), "no grid point meets the target: refine the grid"
    return float(energies[feasible].min())


def test_slack_zero_is_minmax():
    for links in LINKS:
        for seed in range(5):
            demand, state = case(8, seed, links, tokens=np.random.default_rng(seed).integers(0, 5, 8))
            minmax = make_allocator("minmax").allocate(demand, state)
            ours = make_allocator("energy", slack=0.0).allocate(demand, state)
            assert makespan(demand, state, ours) == pytest.approx(makespan(demand, state, minmax), rel=1e-12)
            np.testing.assert_allclose(ours.bandwidth_hz, minmax.bandwidth_hz, rtol=1e-12)


@pytest.mark.parametrize("links", list(LINKS))
def test_never_more_energy_than_minmax_and_target_met(links):
    for seed in range(8):
        demand, state = case(8, seed, links, tokens=np.random.default_rng(seed).integers(0, 30, 8))
        minmax = make_allocator("minmax").allocate(demand, state)
        t_star, e_minmax = makespan(demand, state, minmax), energy_j(demand, state, minmax.bandwidth_hz)
        previous = e_minmax
        for slack in SLACKS:
            ours = make_allocator("energy", slack=slack).allocate(demand, state)
            e_ours = energy_j(demand, state, ours.bandwidth_hz)
            assert e_ours <= e_minmax * (1 + 1e-9), (slack, e_ours, e_minmax)
            assert e_ours <= previous * (1 + 1e-9)  # a looser target never costs more energy
            assert makespan(demand, state, ours) <= (1 + slack) * t_star * (1 + 1e-9)
            assert ours.bandwidth_hz.sum() == pytest.approx(state.bandwidth_hz, rel=1e-9)
            assert np.all(ours.bandwidth_hz[~demand.active] == 0)
            previous = e_ours


def test_some_slack_saves_energy_on_the_paper_cell():
    """The least-energy split differs from min-max: 10 % more latency saves energy (measured ≥ 5 %)."""
    demand, state = case(8, 0, "shannon", tokens=[12, 3, 25, 7, 1, 18, 9, 4])
    minmax = make_allocator("minmax").allocate(demand, state)
    ours = make_allocator("energy", slack=0.1).allocate(demand, state)
    assert energy_j(demand, state, ours.bandwidth_hz) < 0.95 * energy_j(demand, state, minmax.bandwidth_hz)


@pytest.mark.parametrize("num_devices, steps, tol", [(2, 20000, 1e-3), (3, 500, 2e-2)])
@pytest.mark.parametrize("links", ["shannon", "gap+cap"])
@pytest.mark.parametrize("slack", [0.05, 0.3, 2.0])
def test_optimal_against_brute_force_grid(num_devices, steps, tol, links, slack):
    for seed in range(3):
        demand, state = case(num_devices, seed, links)
        t_star = makespan(demand, state, make_allocator("minmax").allocate(demand, state))
        target_s = (1 + slack) * t_star
        ours = make_allocator("energy", slack=slack).allocate(demand, state)
        e_ours = energy_j(demand, state, ours.bandwidth_hz)
        best_on_grid = grid_least_energy(demand, state, target_s, steps)
        assert e_ours <= best_on_grid * (1 + 1e-9)  # no grid point meeting the target beats it …
        assert best_on_grid <= e_ours * (1 + tol)  # … and the grid, refined, closes in on it
        assert makespan(demand, state, ours) <= target_s * (1 + 1e-9)


def test_device_powers_steer_the_split():
    """Two devices on the same channel: the one whose radio draws more gets more of the band."""
    demand, state = case(2, 0, "shannon", tokens=[4, 4])
    same = EnergyModel(np.zeros(2), np.full(2, RX_W), np.full(2, TX_W))
    hungry = EnergyModel(np.zeros(2), np.array([RX_W, 10 * RX_W]), np.array([TX_W, 10 * TX_W]))
    split = {
        name: EnergyAllocator(1.0, model).allocate(demand, state).bandwidth_hz
        for name, model in (("same", same), ("hungry", hungry))
    }
    assert split["hungry"][1] > split["same"][1]


def test_edge_cases():
    demand, state = case(4, 0, tokens=[0, 0, 0, 0])
    assert np.all(make_allocator("energy").allocate(demand, state).bandwidth_hz == 0)
    demand, state = case(4, 0, tokens=[0, 3, 0, 0])
    alloc = make_allocator("energy", slack=0.5).allocate(demand, state)
    np.testing.assert_allclose(alloc.bandwidth_hz, [0, state.bandwidth_hz, 0, 0])


@pytest.mark.parametrize("bad", [-0.1, math.nan, 101.0])
def test_bad_slack_names_the_field_and_range(bad):
    with pytest.raises(ConfigError, match=r"energy allocator slack = .* out of range; allowed: \[0, 100\]"):
        make_allocator("energy", slack=bad)
    with pytest.raises(ConfigError, match=r"sim.energy_slack = .* out of range; allowed: \[0, 100\]"):
        SimSettings(allocator="energy", energy_slack=bad)


def test_for_scenario_uses_the_cells_radios():
    scenario = load_scenario("paper", ["cell.device_power_dbm=20"])
    allocator = make_allocator("energy", **energy_params(scenario, 0.2))
    assert isinstance(allocator, EnergyAllocator)
    assert allocator.slack == 0.2 and allocator.energy is not None
    assert allocator.energy.rx_power_w.shape == (scenario.cell.num_devices,)
    np.testing.assert_allclose(allocator.energy.tx_power_w - allocator.energy.rx_power_w, 0.1)


# --- the report's "Energy against latency" section ------------------------------------------


def study_payload(slacks=(0.0, 0.1, 0.5)) -> dict:
    """A trade-off study file as benchmarks/energy_tradeoff.py writes it (values made up here)."""
    rows = [{"allocator": "minmax", "slack": None}] + [
        {"allocator": f"energy s={s:g}", "slack": s} for s in slacks
    ]
    for i, row in enumerate(rows):
        row |= {"n": 4, "latency_per_token_s_mean": 0.1 * (1 + i), "latency_per_token_s_stderr": 0.01}
        row |= {"energy_per_token_j_mean": 1.0 / (1 + i), "energy_per_token_j_stderr": 0.02}
    config = {"task": "arc_easy", "items": 2, "repeats": 2, "policy": "wdmoe", "theta": 0.1, "seed": 7}
    return {"study": "energy_tradeoff", "config": config | {"scenario": {"name": "paper"}}, "rows": rows}


def test_report_section_table_and_plot(tmp_path):
    import json

    from wdmoe.studies.report import ENERGY_PLOT_NAME, find_energy_files, write_report

    results = tmp_path / "energy_tradeoff.json"
    results.write_text(json.dumps(study_payload()))
    (tmp_path / "other.json").write_text(json.dumps({"study": "something else"}))
    assert find_energy_files(results) == [results]
    report = write_report([], tmp_path / "out", energy=find_energy_files(results))
    text = report.markdown.read_text()
    assert "## Energy against latency" in text and "seed 7" in text
    assert "| energy s=0.1 | 0.1 | 4 | 300.00 ± 10.00 | 0.3333 ± 0.0200 |" in text
    assert [p.name for p in report.plots] == [ENERGY_PLOT_NAME] and report.plots[0].stat().st_size > 0


def test_report_rejects_a_broken_study_file(tmp_path):
    import json

    from wdmoe.studies.report import write_report

    payload = study_payload()
    del payload["rows"][1]["energy_per_token_j_mean"]
    bad = tmp_path / "energy_tradeoff.json"
    bad.write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match=r"energy_tradeoff\.json: a row lacks energy_per_token_j_mean"):
        write_report([], tmp_path / "out", energy=[bad])


def test_simulation_builds_the_energy_allocator_from_its_cell():
    import torch

    from tiny import TINY, tiny_model
    from wdmoe.models.install import install
    from wdmoe.policies import make_policy
    from wdmoe.simulate import Simulation

    model = tiny_model("mixtral")
    scenario = load_scenario("paper", TINY)
    sim = Simulation(
        install(model, make_policy("topk")), scenario, SimSettings(allocator="energy", energy_slack=0.3)
    )
    assert isinstance(sim.allocator, EnergyAllocator) and sim.allocator.slack == 0.3
    assert sim.allocator.energy is not None
    assert sim.allocator.energy.tx_power_w.shape == (scenario.cell.num_devices,)
    with sim.attached():
        model(input_ids=torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0)))
    (record,) = sim.records
    assert record.energy_j is not None and record.energy_j > 0


def test_wdmoe_report_reads_the_study_file(tmp_path):
    import json

    from wdmoe.cli.report import report_cmd

    results = tmp_path / "energy_tradeoff.json"
    results.write_text(json.dumps(study_payload(), indent=2))  # pretty JSON, not JSON Lines
    report_cmd(results, tmp_path / "out", "energy")
    assert "| energy s=0.5 |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "energy_tradeoff.png").is_file()
