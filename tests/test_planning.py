"""Expert placement by channel: optimal on small instances (brute force), memory errors that name
the numbers, the placement file, and the simulator, ``wdmoe cluster`` and ``wdmoe plan`` using it."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tiny import TINY, save_tiny_checkpoint, tiny_model
from wdmoe.cli import app
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError
from wdmoe.eval.results import config_key
from wdmoe.latency.devices import devices_for, effective_flops_per_s
from wdmoe.models.install import install
from wdmoe.planning.files import placement_dict, read_placement, write_placement
from wdmoe.planning.inputs import average_channel, plan_problem
from wdmoe.planning.optimise import (
    InfeasiblePlanError,
    Placement,
    brute_force,
    expected_layer_s,
    plan,
    round_robin_placement,
)
from wdmoe.simulate import SimSettings, Simulation
from wdmoe.studies.runner import EvalPoint

runner = CliRunner()


def small_scenario(devices: int, layers: int, experts: int, seed: int = 0):
    """The paper cell (random drops, 8 dB shadowing: unequal links) at tiny model dimensions."""
    dims = [*TINY, f"model.num_layers={layers}", f"model.num_experts={experts}", "model.top_k=1"]
    return load_scenario("paper", [*dims, f"cell.num_devices={devices}", f"seed={seed}"])


def small_problem(seed: int, devices: int = 3, layers: int = 2, experts: int = 3, capacity=None):
    rng = np.random.default_rng(seed)
    usage = rng.dirichlet(np.ones(experts), size=layers) * 2.0
    cap = np.array(capacity if capacity is not None else rng.integers(1, layers * experts, devices))
    if cap.sum() < layers * experts:
        cap[0] += layers * experts - cap.sum()
    scenario = small_scenario(devices, layers, experts, seed)
    return plan_problem(scenario, usage, cap, seed=seed, blocks=50, tokens=float(rng.integers(1, 100)))


def test_hot_expert_goes_to_the_fast_link_with_the_hand_computed_latency():
    """U = 2, one layer, two experts, one shard per device: the hot expert on the better link;
    J = max(t_fast(T·f_hot), t_slow(T·f_cold)), t_u = S/R_DL + n·F/C_u + S/R_UL, S = n·D·b + H."""
    scenario = small_scenario(2, 1, 2, seed=1)
    usage = np.array([[0.9, 0.1]])
    problem = plan_problem(scenario, usage, np.array([1, 1]), seed=1, blocks=50, tokens=10.0)
    ch = problem.view.channel
    band = np.full(2, ch.bandwidth_hz / 2)
    r_dl, r_ul = ch.dl.rate_bps(band), ch.ul.rate_bps(band)
    flops = effective_flops_per_s(devices_for(scenario.cell.device_classes, 2))
    m, w = scenario.model, scenario.wire

    def t(n: float, u: int) -> float:
        bits = n * m.hidden_size * w.bits_per_element + w.header_bits
        return bits / r_dl[u] + n * 6 * m.hidden_size * m.ffn_size / flops[u] + bits / r_ul[u]

    fast = int(np.argmin([t(1.0, 0), t(1.0, 1)]))
    placement = plan(problem)
    assert placement.primary.tolist() == [[fast, 1 - fast]]
    want = max(t(9.0, fast), t(1.0, 1 - fast))
    assert placement.expected_layer_s == pytest.approx(want, rel=1e-9)
    assert expected_layer_s(problem, np.array([[1 - fast, fast]])) >= want


@pytest.mark.parametrize("seed", range(12))
def test_plan_equals_brute_force_on_small_instances(seed):
    problem = small_problem(seed)
    best = brute_force(problem)
    got = plan(problem)
    assert got.expected_layer_s == pytest.approx(expected_layer_s(problem, best), rel=1e-9)
    assert np.all(np.bincount(got.primary.ravel(), minlength=3) <= problem.capacity)


def test_plan_equals_brute_force_with_four_devices_and_tight_memory():
    for seed in range(6):
        problem = small_problem(seed, devices=4, layers=2, experts=4, capacity=[2, 2, 2, 2])
        optimum = expected_layer_s(problem, brute_force(problem))
        assert plan(problem).expected_layer_s == pytest.approx(optimum, rel=1e-9)


def test_plan_is_never_worse_than_round_robin():
    problem = small_problem(5, devices=4, layers=3, experts=4, capacity=[3, 3, 3, 3])
    rr = expected_layer_s(problem, round_robin_placement(3, 4, 4))
    assert plan(problem).expected_layer_s <= rr


def test_infeasible_memory_budget_names_the_numbers():
    usage = np.full((2, 3), 0.5)
    with pytest.raises(
        InfeasiblePlanError,
        match=r"hold 4 shards in all \(per device \[1, 1, 2\]\) but 6 shards × 1 replica\(s\) = 6",
    ):
        plan_problem(small_scenario(3, 2, 3), usage, np.array([1, 1, 2]), blocks=10)
    problem = small_problem(0, capacity=[2, 2, 2])
    with pytest.raises(InfeasiblePlanError, match=r"6 shards × 2 replica\(s\) = 12"):
        plan(problem, replicas=2)


def test_replicas_go_to_distinct_devices_with_the_primary_first():
    problem = small_problem(2, capacity=[4, 4, 4])
    placement = plan(problem, replicas=2)
    single = plan(problem)
    for li, row in enumerate(placement.hosts):
        for e, hosts in enumerate(row):
            assert len(set(hosts)) == 2 and hosts[0] == placement.primary[li, e]
    assert sum(len(s) for s in placement.shards(3)) == 12
    assert all(len(s) <= 4 for s in placement.shards(3))
    assert placement.expected_layer_s == pytest.approx(single.expected_layer_s)


def test_average_channel_is_the_mean_gain_of_the_trace():
    from wdmoe.channel import generate_trace

    scenario = small_scenario(3, 1, 2)
    trace = generate_trace(scenario, 40, 0)
    mean = average_channel(trace)
    want = np.mean([trace.state(n).ul.gain for n in range(40)], axis=0)
    np.testing.assert_allclose(mean.ul.gain, want, rtol=1e-12)


def file_for(primary, layers, devices, tmp_path, name="p.json"):
    hosts = tuple(tuple((int(d),) for d in row) for row in primary)
    path = tmp_path / name
    write_placement(path, placement_dict(Placement(hosts, 0.0), layers, devices))
    return path


def test_placement_file_round_trips_and_bad_files_are_named(tmp_path):
    primary = np.array([[0, 1, 1], [2, 2, 0]])
    path = file_for(primary, [3, 5], 3, tmp_path)
    f = read_placement(path, 3, 2, 3)
    assert f.layers == (3, 5) and f.primary.tolist() == primary.tolist()
    assert f.shards[2] == ((5, 0), (5, 1))
    with pytest.raises(ConfigError, match="is for 3 devices, but this run has 4"):
        read_placement(path, num_devices=4)
    with pytest.raises(ConfigError, match="does not exist"):
        read_placement(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        read_placement(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    data["devices"][0]["shards"] = []
    (tmp_path / "lost.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="primary device 0, whose shard list does not hold it"):
        read_placement(tmp_path / "lost.json")


def test_simulator_prices_every_layer_on_its_planned_devices(tmp_path):
    """Layer 0 all on device 2, layer 1 all on device 5: only those devices get tokens."""
    primary = np.array([[2] * 8, [5] * 8])
    path = file_for(primary, [0, 1], 8, tmp_path)
    model = tiny_model("mixtral")
    wm = install(model)
    sim = Simulation(wm, load_scenario("paper", [*TINY, f"cell.placement={path}"]), SimSettings(seed=1))
    loads = []
    inner_run = sim.run

    def run(layer, inputs):
        out = inner_run(layer, inputs)
        loads.append((layer, sim.current.layers[-1].priced.device_tokens.copy()))
        return out

    sim.run = run  # type: ignore[method-assign]
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with sim.attached(), torch.no_grad():
        model(input_ids=ids)
    assert [layer for layer, _ in loads] == [0, 1]
    for layer, tokens in loads:
        busy = np.flatnonzero(tokens)
        assert busy.tolist() == [2 if layer == 0 else 5] and tokens.sum() == 7 * 2
    with pytest.raises(ConfigError, match="is for 8 devices, but this run has 4"):
        Simulation(wm, load_scenario("paper", [*TINY, "cell.num_devices=4", f"cell.placement={path}"]))


def test_a_records_key_follows_the_placement_files_contents(tmp_path):
    """Re-planning into the same file must not let a resumed eval reuse the old plan's records."""
    path = file_for(np.array([[2] * 8, [5] * 8]), [0, 1], 8, tmp_path)
    point = EvalPoint(overrides=(*TINY, f"cell.placement={path}"))
    cfg = point.load_scenario()
    before = config_key(point.resolved(cfg, 2), "arc_easy")
    assert config_key(point.resolved(cfg, 2), "arc_easy") == before
    file_for(np.array([[1] * 8, [5] * 8]), [0, 1], 8, tmp_path)  # same path, another plan
    assert config_key(point.resolved(cfg, 2), "arc_easy") != before
    bare = EvalPoint(overrides=TINY)
    assert "placement_sha256" not in bare.resolved(bare.load_scenario(), 2)  # older keys hold


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral")


def test_cluster_hands_each_device_its_listed_shards(folder, tmp_path):
    from wdmoe.runtime.bs import RuntimeSettings
    from wdmoe.runtime.cluster import Cluster

    primary = np.array([[0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    path = file_for(primary, [0, 1], 2, tmp_path)
    with Cluster(
        str(folder), devices=2, placement=path, settings=RuntimeSettings(heartbeat_s=0.3)
    ) as cluster:
        want = read_placement(path).shards
        assert [tuple(d.hosted) for d in cluster.devices] == [tuple(s) for s in want]
        assert [sorted(cluster.bs.registry.devices[u].experts) for u in range(2)] == [list(s) for s in want]
        with torch.no_grad():
            cluster.wm.model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="exclude each other"):
        Cluster(str(folder), devices=2, placement=path, replicas=2)


def test_cli_plan_writes_a_placement_file_and_names_bad_budgets(folder, tmp_path):
    out = tmp_path / "plan.json"
    sets = [x for o in [*TINY, "cell.num_devices=3"] for x in ("--set", o)]
    args = ["plan", "--model", str(folder), *sets, "--calib-chunks", 2, "--chunk-tokens", 16]
    res = runner.invoke(app, [str(a) for a in [*args, "--blocks", 20, "--max-experts", 6, "--out", out]])
    assert res.exit_code == 0, res.output
    assert "round-robin" in res.output
    f = read_placement(out, 3, 2, 8)
    data = json.loads(out.read_text())
    assert data["expected_layer_s"] <= data["round_robin_layer_s"]
    assert all(len(s) <= 6 for s in f.shards)
    bad = runner.invoke(app, [str(a) for a in [*args, "--max-experts", 5, "--out", tmp_path / "x.json"]])
    assert bad.exit_code == 2 and "hold 15 shards" in bad.output and "16 shards" in bad.output
    missing = runner.invoke(
        app, ["eval", "--tasks", "arc_easy", "--model", str(folder), "--placement", str(tmp_path / "no.json")]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_the_dashboard_lists_each_devices_planned_shards(tmp_path):
    from wdmoe.dashboard.sim import hosted

    primary = np.array([[2] * 8, [5, 5, 5, 5, 2, 2, 2, 2]])
    path = file_for(primary, [0, 1], 8, tmp_path)
    wm = install(tiny_model("mixtral"))
    planned = Simulation(wm, load_scenario("paper", [*TINY, f"cell.placement={path}"]), SimSettings(seed=1))
    assert hosted(planned, 2) == [f"0:{e}" for e in range(8)] + ["1:4", "1:5", "1:6", "1:7"]
    assert hosted(planned, 5) == ["1:0", "1:1", "1:2", "1:3"] and hosted(planned, 0) == []
    plain = Simulation(wm, load_scenario("paper", TINY), SimSettings(seed=1))
    assert hosted(plain, 3) == ["*:3"]
