"""Bandwidth allocators: minmax against cvxpy and a brute-force grid, and its invariants."""

import numpy as np
import pytest

from reference_allocation import cvxpy_minmax, grid_minmax, shannon_time_s
from wdmoe.allocation import ALLOCATORS, InfeasibleAllocationError, make_allocator
from wdmoe.channel import generate_trace
from wdmoe.config import load_scenario
from wdmoe.errors import UnknownNameError
from wdmoe.latency import ExpertCost, device_time_s, layer_demand
from wdmoe.latency.devices import devices_for, effective_flops_per_s

LINKS = {  # Shannon; a 3 dB gap and a spectral-efficiency cap; the Wi-Fi-like lab (InH, Rician, cap)
    "shannon": ("paper", []),
    "gap+cap": ("paper", ["cell.snr_gap_db=3", "cell.max_se_bps_per_hz=5.0"]),
    "lab": ("lab", []),
}


def case(num_devices: int, seed: int, links: str = "shannon", tokens=None):
    """A random demand on a random channel snapshot: (demand, state)."""
    name, overrides = LINKS[links]
    cfg = load_scenario(name, [f"cell.num_devices={num_devices}", *overrides])
    state = generate_trace(cfg, 1, seed=seed).state(0)
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 6, num_devices) if tokens is None else np.asarray(tokens)
    flops = effective_flops_per_s(devices_for(cfg.cell.device_classes, num_devices))
    return layer_demand(n, flops, ExpertCost.from_config(cfg)), state


def makespan(demand, state, alloc) -> float:
    return float(device_time_s(demand, state, alloc.bandwidth_hz)[demand.active].max())


@pytest.mark.parametrize("links", list(LINKS))
@pytest.mark.parametrize("num_devices", [2, 3, 4, 8])
def test_minmax_equals_cvxpy(num_devices, links):
    for seed in range(3):
        demand, state = case(num_devices, seed, links)
        ours = makespan(demand, state, make_allocator("minmax").allocate(demand, state))
        theirs, theirs_hz = cvxpy_minmax(demand, state)
        assert ours == pytest.approx(theirs, rel=1e-6)
        assert ours <= float(shannon_time_s(demand, state, theirs_hz).max()) * (1 + 1e-9)  # never worse


@pytest.mark.parametrize("num_devices, steps, tol", [(2, 20000, 1e-3), (3, 400, 2e-2), (4, 80, 8e-2)])
def test_minmax_equals_brute_force_grid(num_devices, steps, tol):
    for seed in range(3):
        demand, state = case(num_devices, seed, "gap+cap")
        ours = makespan(demand, state, make_allocator("minmax").allocate(demand, state))
        best_on_grid = grid_minmax(demand, state, steps)
        assert ours <= best_on_grid * (1 + 1e-12)  # the optimum beats every grid point …
        assert best_on_grid <= ours * (1 + tol)  # … and the grid, refined, closes in on it


@pytest.mark.parametrize("links", list(LINKS))
def test_minmax_never_worse_than_equal_or_proportional(links):
    for seed in range(20):
        demand, state = case(8, seed, links, tokens=np.random.default_rng(seed).integers(0, 4, 8))
        if not demand.active.any():
            continue
        ours = makespan(demand, state, make_allocator("minmax").allocate(demand, state))
        for other in ("equal", "proportional"):
            assert ours <= makespan(demand, state, make_allocator(other).allocate(demand, state)) * (
                1 + 1e-12
            )
        equal_active = make_allocator("equal", active_only=True).allocate(demand, state)
        assert ours <= makespan(demand, state, equal_active) * (1 + 1e-12)


@pytest.mark.parametrize("num_devices", [3, 8, 64, 512])
def test_minmax_active_devices_finish_together_and_share_the_band(num_devices):
    tokens = np.random.default_rng(num_devices).integers(0, 4, num_devices)
    tokens[0] = 2
    demand, state = case(num_devices, 1, "gap+cap", tokens=tokens)
    alloc = make_allocator("minmax").allocate(demand, state)
    finish = device_time_s(demand, state, alloc.bandwidth_hz)[demand.active]
    assert finish.max() - finish.min() <= 1e-9 * finish.max()
    assert alloc.bandwidth_hz.sum() == pytest.approx(state.bandwidth_hz, rel=1e-12)
    assert np.all(alloc.bandwidth_hz[~demand.active] == 0.0)


def test_minmax_edge_cases():
    demand, state = case(4, 0, tokens=[0, 0, 0, 0])
    assert make_allocator("minmax").allocate(demand, state).bandwidth_hz.tolist() == [0.0] * 4
    demand, state = case(4, 0, tokens=[0, 3, 0, 0])
    assert make_allocator("minmax").allocate(demand, state).bandwidth_hz.tolist() == [0.0, 20e6, 0.0, 0.0]


def test_minmax_reports_infeasible_latency_targets():
    demand, state = case(4, 0, tokens=[2, 1, 3, 1])
    best = makespan(demand, state, make_allocator("minmax").allocate(demand, state))
    make_allocator("minmax", deadline_s=best * 1.01).allocate(demand, state)  # feasible: no error
    with pytest.raises(InfeasibleAllocationError, match=r"target .* is infeasible: the best split .* gives"):
        make_allocator("minmax", deadline_s=best * 0.9).allocate(demand, state)
    with pytest.raises(InfeasibleAllocationError, match=r"needs .* s with unlimited bandwidth"):
        make_allocator("minmax", deadline_s=1e-9).allocate(demand, state)


def test_equal_and_proportional():
    demand, state = case(4, 0, tokens=[2, 0, 1, 3])
    assert make_allocator("equal").allocate(demand, state).bandwidth_hz.tolist() == [5e6] * 4
    active = make_allocator("equal", active_only=True).allocate(demand, state).bandwidth_hz
    np.testing.assert_allclose(active, [20e6 / 3, 0.0, 20e6 / 3, 20e6 / 3])
    prop = make_allocator("proportional").allocate(demand, state).bandwidth_hz
    assert prop.sum() == pytest.approx(20e6) and prop[1] == 0.0
    need = [
        demand.downlink_bits[u] / state.dl.spectral_efficiency(np.full(4, 20e6 / 3))[u] for u in (0, 2, 3)
    ]
    need = [
        n + demand.uplink_bits[u] / state.ul.spectral_efficiency(np.full(4, 20e6 / 3))[u]
        for n, u in zip(need, (0, 2, 3), strict=True)
    ]
    np.testing.assert_allclose(prop[[0, 2, 3]], 20e6 * np.array(need) / sum(need))


def test_registry_names_and_unknown_allocator():
    assert ALLOCATORS.names() == ["energy", "equal", "minmax", "proportional"]
    with pytest.raises(UnknownNameError, match="unknown bandwidth allocator 'best'"):
        make_allocator("best")
