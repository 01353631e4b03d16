"""`wdmoe sweep`: grid validation and expansion, parallel workers with one writer, resume, failures, Ray."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from test_simulate import TINY
from wdmoe.cli import app
from wdmoe.errors import ConfigError
from wdmoe.eval.results import read_records
from wdmoe.eval.tasks import default_data_dir
from wdmoe.studies.sweep import check_grid, expand, load_grid, parse_grid, plan, run_sweep

DATA = default_data_dir()
runner = CliRunner()
needs_data = pytest.mark.skipif(
    not (DATA / "arc_easy.jsonl").is_file(), reason=f"benchmark data folder {DATA} is missing"
)
FAILING = {"name": "topk", "top_k": [9]}  # the tiny model has 8 experts: fails only when it runs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_grid(ckpt, *extra_policies, **changes):
    """3 policy settings × 2 seeds = 6 points × 2 tasks on the tiny model, 2 items each."""
    data = {
        "model": str(ckpt),
        "tasks": ["arc_easy", "piqa"],
        "limit": 2,
        "data_dir": str(DATA),
        "overrides": TINY,
        "seeds": [0, 1],
        "policy": [{"name": "topk"}, {"name": "wdmoe", "theta": [0.1, 0.3]}, *extra_policies],
    }
    return data | changes


def write_grid(path, data):
    """A grid dict as TOML (JSON scalars and arrays are valid TOML values)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if k != "policy"]
    for entry in data["policy"]:
        lines += ["", "[[policy]]", *(f"{k} = {json.dumps(v)}" for k, v in entry.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep(data, out, **kwargs):
    grid = parse_grid(data)
    check_grid(grid)
    return run_sweep(plan(expand(grid), grid.tasks, out), out, **kwargs)


def without_time(records):
    return sorted(({k: v for k, v in r.items() if k != "timestamp"} for r in records), key=lambda r: r["key"])


@pytest.fixture(scope="module")
def whole(ckpt, tmp_path_factory):
    """The records of an uninterrupted one-process run: what every other run must end with."""
    out = tmp_path_factory.mktemp("whole") / "r.jsonl"
    results = sweep(tiny_grid(ckpt), out, workers=1)
    assert [r.error for r in results] == [None] * 6
    return without_time(read_records(out))


def test_expand_is_the_product_in_a_fixed_order():
    data = {
        "tasks": ["arc_easy"],
        "bandwidths_hz": [10e6, 20000000],
        "allocators": ["equal", "minmax"],
        "seeds": [0, 1],
        "top_k": [2, 4],
        "overrides": ["cell.num_devices=8"],
        "policy": [{"name": "topk", "top_k": [3]}, {"name": "wdmoe", "theta": [0, 0.2], "k_scaled": True}],
    }
    points = expand(parse_grid(data))
    assert (
        len(points) == (1 + 2 * 2) * 2 * 2 * 2
    )  # (topk at k=3 + 2 θ × 2 k) × bandwidths × allocators × seeds
    assert points == expand(parse_grid(data))
    first, second, third = points[:3]
    assert (first.policy.name, first.policy.top_k) == ("topk", 3)
    assert (first.sim.allocator, first.sim.seed) == ("equal", 0)
    assert first.overrides == ("cell.num_devices=8", "cell.bandwidth_hz=10000000.0")
    assert (second.sim.seed, third.sim.allocator) == (1, "minmax")
    assert points[4].overrides[-1] == "cell.bandwidth_hz=20000000.0"
    wdmoe = points[8:]
    assert [p.policy.params for p in wdmoe[::8]] == [
        {"theta": 0.0, "k_scaled": True},
        {"theta": 0.0, "k_scaled": True},
        {"theta": 0.2, "k_scaled": True},
        {"theta": 0.2, "k_scaled": True},
    ]
    assert [p.policy.top_k for p in wdmoe[::8]] == [2, 4, 2, 4]
    assert isinstance(wdmoe[0].policy.params["theta"], float)  # θ = 0 recorded as `wdmoe eval --theta 0` does


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"policy": [{"name": "nope"}]}, "policy #1: name: unknown policy 'nope'; choose one of: budget"),
        (
            {"policy": [{"name": "topk", "theta": [0.1]}]},
            "policy 'topk' has no parameter 'theta'; allowed: k",
        ),
        ({"policy": [{"name": "wdmoe", "theta": [0.1, 2]}]}, r"wdmoe.theta = 2.0 is out of range"),
        ({"policy": [{"name": "wdmoe", "theta": []}]}, "theta is an empty list"),
        ({"policy": [{"name": "topk", "top_k": [0]}]}, "top_k holds 0; allowed: integers ≥ 1"),
        ({"policy": []}, "no policy; add at least one"),
        ({"tasks": ["arc_easy", "nope"]}, "tasks: unknown task 'nope'"),
        ({"tasks": []}, "tasks is an empty list"),
        (
            {"scenarios": ["nowhere"]},
            "scenario = 'nowhere' is not a known preset or file; allowed: lab, paper",
        ),
        ({"allocators": ["fastest"]}, "allocators: unknown bandwidth allocator 'fastest'"),
        ({"seeds": []}, "seeds is an empty list"),
        ({"seeds": 3}, r"seeds must be a list of integers, e.g. seeds = \[0, 1\]"),
        ({"seeds": [0, "1"]}, "seeds holds '1'; allowed: integers only"),
        ({"seeds": [-1]}, "seeds holds -1"),
        ({"top_k": [2, 0]}, "top_k holds 0"),
        ({"bandwidths_hz": [-1e6]}, "cell.bandwidth_hz = -1000000.0 is out of range"),
        ({"overrides": ["cell.num_devices=lots"]}, "cell.num_devices"),
        ({"limit": "all"}, "limit = 'all'; allowed: an integer"),
        ({"limit": 0}, "limit must be ≥ 1"),
        ({"batch_size": 0}, "batch_size must be ≥ 1"),
        ({"csi_error_std_db": [-1]}, "sim.csi_error_std_db = -1.0 is out of range"),
        ({"thetas": [0.1]}, "'thetas' is not a grid field; allowed: allocators, bandwidths_hz"),
        ({"data_dir": "/nonexistent"}, "arc_easy.jsonl does not exist"),
        ({"model": "/no/such/model"}, "model = '/no/such/model' is not a checkpoint folder"),
    ],
)
@needs_data
def test_a_bad_grid_is_an_error_naming_the_field_before_anything_runs(ckpt, changes, message):
    with pytest.raises(ConfigError, match=message):
        check_grid(parse_grid(tiny_grid(ckpt, **changes)))


def test_a_grid_file_that_is_not_toml_names_the_file(tmp_path):
    (tmp_path / "g.toml").write_text("tasks = [arc_easy\n")
    with pytest.raises(ConfigError, match=r"g.toml: not valid TOML"):
        load_grid(tmp_path / "g.toml")


@needs_data
def test_two_workers_write_one_record_per_point_and_task_as_one_worker_does_and_failures_stay_local(
    ckpt, whole, tmp_path
):
    out = tmp_path / "r.jsonl"
    results = sweep(tiny_grid(ckpt, FAILING), out, workers=2)
    assert len(results) == 8
    failed = sorted((r.job.index, r.job.point.sim.seed) for r in results if r.error)
    assert failed == [(6, 0), (7, 1)]  # the two topk-9 points, after the others
    assert all("top_k must be in 1..8" in r.error for r in results if r.error)
    assert sum(r.written for r in results) == 12
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line) for line in lines)  # whole lines, none interleaved
    assert without_time(read_records(out)) == whole


@needs_data
def test_a_sweep_resumed_after_a_kill_ends_with_the_same_records_and_no_duplicates(ckpt, whole, tmp_path):
    out = tmp_path / "r.jsonl"
    sweep(tiny_grid(ckpt, policy=[{"name": "topk"}]), out, workers=1)  # the first points were done…
    missing = next(r for r in whole if r["key"] not in {x["key"] for x in read_records(out)})
    with out.open("a") as f:
        f.write(json.dumps(missing)[:70])  # …and the next record was cut short by the kill
    grid = parse_grid(tiny_grid(ckpt))
    with pytest.warns(UserWarning, match="truncated last line"):
        jobs = plan(expand(grid), grid.tasks, out)
    assert [j.index for j in jobs] == [2, 3, 4, 5]  # the 2 topk points are skipped up front
    with pytest.warns(UserWarning, match="truncated last line"):
        run_sweep(jobs, out, workers=1)
    records = read_records(out)
    assert len({r["key"] for r in records}) == len(records) == 12
    assert without_time(records) == whole
    assert plan(expand(grid), grid.tasks, out) == []  # a third run has nothing to do


@needs_data
def test_a_killed_sweep_process_restarted_gives_the_uninterrupted_file(ckpt, whole, tmp_path):
    grid, out = write_grid(tmp_path / "g.toml", tiny_grid(ckpt)), tmp_path / "r.jsonl"
    cli = [sys.executable, "-c", "from wdmoe.cli import main; main()"]
    cmd = [*cli, "sweep", str(grid), "--out", str(out), "--workers", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120  # the import alone takes seconds on busy cores
        while not (out.exists() and out.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            assert proc.poll() is None, "the sweep ended before it wrote a record"
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = len(read_records(out))
    assert 1 <= before < 12
    res = runner.invoke(app, ["sweep", str(grid), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    if before >= 2:  # the first point (2 tasks, run in order) was complete before the kill
        assert "points already in" in res.stderr
    assert without_time(read_records(out)) == whole


@needs_data
def test_cli_dry_run_prints_the_points_and_runs_nothing(ckpt, tmp_path):
    grid, out = write_grid(tmp_path / "g.toml", tiny_grid(ckpt)), tmp_path / "r.jsonl"
    res = runner.invoke(app, ["sweep", str(grid), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "6 points × 2 tasks = 12 records; 6 points to run (12 records)" in res.stdout
    assert "wdmoe theta=0.3" in res.stdout and "model's" in res.stdout
    assert not out.exists()
    bad = write_grid(tmp_path / "bad.toml", tiny_grid(ckpt, allocators=["fastest"]))
    res = runner.invoke(app, ["sweep", str(bad), "--out", str(out)])
    assert res.exit_code == 2 and "unknown bandwidth allocator 'fastest'" in res.stderr
    assert not out.exists()


@needs_data
def test_cli_sweep_reports_a_failing_point_with_its_config_and_exits_non_zero(ckpt, whole, tmp_path):
    grid, out = write_grid(tmp_path / "g.toml", tiny_grid(ckpt, FAILING)), tmp_path / "r.jsonl"
    res = runner.invoke(app, ["sweep", str(grid), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 1, res.output
    assert "failed point 7: policy topk · top-k 9" in res.stderr and "top_k must be in 1..8" in res.stderr
    assert "6 points run, 0 skipped, 2 failed" in res.stderr
    assert without_time(read_records(out)) == whole


@needs_data
def test_ray_runs_the_points_on_a_local_cluster_with_the_same_records(ckpt, whole, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'wdmoe[ray]')")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        out = tmp_path / "r.jsonl"
        results = sweep(tiny_grid(ckpt, FAILING), out, ray_address="auto")
        assert sum(r.error is not None for r in results) == 2
    finally:
        ray.shutdown()
    assert without_time(read_records(out)) == whole
