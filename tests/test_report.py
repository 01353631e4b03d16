"""`wdmoe report` over hand-made records, the Mixtral latency study on synthetic router scores, and a
`wdmoe reproduce` smoke run on a tiny checkpoint."""

import inspect
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from test_simulate import TINY
from tiny import save_tiny_checkpoint
from wdmoe.cli import app
from wdmoe.cli.report import reproduce_cmd
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError
from wdmoe.eval.results import read_records
from wdmoe.eval.tasks import default_data_dir
from wdmoe.policies import make_policy
from wdmoe.studies.latency_study import mixtral_route, price_requests, run_study
from wdmoe.studies.report import (
    PLOT_NAMES,
    baseline,
    compare,
    fronts,
    load_records,
    make_rows,
    pareto_front,
    policy_label,
    write_report,
)
from wdmoe.studies.reproduce import ReproduceSettings, command_line

runner = CliRunner()
DATA = default_data_dir()
L, U = 3, 4


def record(task="arc_easy", policy="topk", params=None, allocator="equal", seed=0, acc=0.5, mean_s=1.0, **kw):
    """A record of the `wdmoe eval` schema with made-up numbers."""
    overrides = kw.get("overrides", ["model=smollm2-moe8"])
    config = {
        "model": "default",
        "policy": {"name": policy, "params": params or {}},
        "top_k": 7,
        "scenario": {"name": "paper", "overrides": overrides, "resolved": {"cell": {"num_devices": U}}},
        "allocator": allocator,
        "csi": {"delay_blocks": 0, "error_std_db": 0.0},
        "seeds": {"channel": seed},
        "limit": 10,
    }
    drop = kw.get("drop_rate", 0.0)
    latency = {
        "requests": 40,
        "steps": 40,
        "mean_s": mean_s,
        "p50_s": 0.9 * mean_s,
        "p95_s": 1.5 * mean_s,
        "p99_s": 1.8 * mean_s,
        "ttft_s": mean_s,
        "tpot_s": None,
        "total_s": 40 * mean_s,
        "drop_rate": drop,
        "retained_mass": 1.0 - drop / 2,
        "experts_per_token": 7 * (1 - drop),
        "per_layer": {"waiting_s": [mean_s / L * 0.9] * L, "bs_s": [mean_s / L * 0.1] * L},
        "per_device": {
            "tokens": [10.0, 20.0, 30.0, 40.0],
            "dropped": [4 * drop, 3 * drop, 2 * drop, drop],
            "drop_rate": [0.4 * drop, 0.3 * drop, 0.2 * drop, 0.1 * drop],
            "downlink_s": [0.1 * mean_s] * U,
            "compute_s": [0.05 * mean_s] * U,
            "uplink_s": [0.3 * mean_s] * U,
            "snr_db_dl": [5.0, 10.0, 15.0, 20.0],
            "snr_db_ul": [-5.0, 0.0, 5.0, 10.0],
        },
    }
    if "per_request_s" in kw:  # proposed for latency_summary: every request's latency, for CDFs
        latency["per_request_s"] = kw["per_request_s"]
    key = f"{task}-{policy}-{json.dumps(params)}-{allocator}-{seed}-{overrides}"
    return {
        "key": key,
        "task": task,
        "kind": "multiple_choice",
        "n": 10,
        "config": config,
        "metrics": {"acc": acc, "acc_norm": acc},
        "stderr": {"acc": 0.05, "acc_norm": 0.05},
        "latency": latency,
        "wdmoe_version": "0.1.0",
        "timestamp": "2025-01-01T00:00:00+00:00",
    }


WD = {"theta": 0.2, "k_scaled": True}
BW = ["model=smollm2-moe8", "cell.bandwidth_hz=1e7"]


def synthetic():
    return [
        record(seed=0, acc=0.5, mean_s=2.0),
        record(seed=1, acc=0.7, mean_s=4.0),
        record(policy="wdmoe", params=WD, seed=0, acc=0.5, mean_s=1.0, drop_rate=0.2),
        record(policy="wdmoe", params=WD, seed=1, acc=0.6, mean_s=2.0, drop_rate=0.3),
        record(allocator="minmax", acc=0.6, mean_s=10.0),  # another allocator: not the baseline above
        record(policy="wdmoe", params=WD, allocator="minmax", acc=0.62, mean_s=4.0, drop_rate=0.1),
        record(overrides=BW, acc=0.6, mean_s=8.0),  # another bandwidth: its own baseline
        record(policy="wdmoe", params=WD, overrides=BW, acc=0.6, mean_s=2.0, drop_rate=0.1),
        record(task="piqa", policy="wdmoe", params=WD, acc=0.7, mean_s=1.0, per_request_s=[0.5, 1.0, 1.5]),
    ]


def row_of(rows, task="arc_easy", policy="topk", allocator="equal", overrides=("model=smollm2-moe8",)):
    return next(
        r
        for r in rows
        if (r.task, r.policy, r.allocator, r.overrides) == (task, policy, allocator, tuple(overrides))
    )


def test_seeds_are_averaged_and_compared_with_the_matching_topk_row():
    rows = make_rows(synthetic())
    top, wd = row_of(rows), row_of(rows, policy="wdmoe")
    assert top.seeds == (0, 1) and wd.seeds == (0, 1)
    assert top.mean_s == pytest.approx(3.0) and top.value == pytest.approx(0.6)
    assert wd.mean_s == pytest.approx(1.5) and wd.value == pytest.approx(0.55)
    assert baseline(wd, rows) is top
    c = compare(wd, top)
    assert c.speedup == pytest.approx(3.0 / 1.5)
    assert c.reduction == pytest.approx(1 - 1.5 / 3.0)
    assert c.delta == pytest.approx((0.55 - 0.6) * 100)
    mm = row_of(rows, policy="wdmoe", allocator="minmax")
    assert compare(mm, baseline(mm, rows)).speedup == pytest.approx(10.0 / 4.0)
    bw = row_of(rows, policy="wdmoe", overrides=BW)
    assert baseline(bw, rows).mean_s == pytest.approx(8.0)
    assert compare(bw, baseline(bw, rows)).delta == pytest.approx(0.0)
    piqa = row_of(rows, task="piqa", policy="wdmoe")
    assert baseline(piqa, rows) is None and piqa.per_request_s == (0.5, 1.0, 1.5) and not top.per_request_s


def test_report_markdown_shows_the_numbers_and_all_plots_are_written(tmp_path):
    report = write_report(synthetic(), tmp_path)
    text = report.markdown.read_text()
    assert "### arc_easy (multiple_choice, acc)" in text and "### piqa" in text
    line = next(x for x in text.splitlines() if x.startswith("| wdmoe θ=0.2 k-scaled") and "| equal |" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == "0,1 (×2)" and cells[6] == "55.0 ± 5.0" and cells[7] == "1.5"
    assert cells[10:14] == ["2.00×", "2.00×", "50.0", "-5.0"]  # speed-up on means and on medians
    piqa = next(x for x in text.splitlines() if x.startswith("| wdmoe") and "| 70.0 ± 5.0 |" in x)
    assert "| – | – | – |" in piqa
    for name in PLOT_NAMES:
        png = tmp_path / name
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in text


def test_pareto_front_on_a_hand_example():
    latency = [1.0, 2.0, 3.0, 2.0, 4.0, 1.0]
    acc = [0.5, 0.6, 0.55, 0.4, 0.7, 0.5]
    assert pareto_front(latency, acc) == [True, True, False, False, True, True]  # equal twins both stay
    rows = make_rows(synthetic())
    front = fronts(rows)
    on = {(r.task, r.policy, r.allocator, r.overrides[-1]) for i, r in enumerate(rows) if front[i]}
    # arc_easy wdmoe: equal 1.5 s / 55 %, minmax 4 s / 62 %, 1e7 Hz 2 s / 60 %: all three trade off
    assert {x for x in on if x[:2] == ("arc_easy", "wdmoe")} == {
        ("arc_easy", "wdmoe", "equal", "model=smollm2-moe8"),
        ("arc_easy", "wdmoe", "minmax", "model=smollm2-moe8"),
        ("arc_easy", "wdmoe", "equal", "cell.bandwidth_hz=1e7"),
    }
    # arc_easy topk: equal 3 s / 60 %, minmax 10 s / 60 % (dominated), 1e7 Hz 8 s / 60 % (dominated)
    assert {x for x in on if x[:2] == ("arc_easy", "topk")} == {
        ("arc_easy", "topk", "equal", "model=smollm2-moe8")
    }


def test_policy_labels():
    assert policy_label("topk", {}) == "topk"
    assert policy_label("wdmoe", {"theta": 0.05, "k_scaled": True}) == "wdmoe θ=0.05 k-scaled"
    assert policy_label("budget", {"budget_s": 0.1, "exact": False}) == "budget budget_s=0.1"


@pytest.mark.filterwarnings("ignore:.*truncated last line")
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"task": "arc_easy"}\n', "the field 'n' is missing"),
        ("[1, 2]\n", "holds no complete record"),  # a bad last line reads as a cut-short write
        ("not json\n{}\n", "not a valid result record"),
    ],
)
def test_bad_results_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "r.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_records(path)
    res = runner.invoke(app, ["report", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and message in res.stderr


def test_records_without_a_known_metric_are_refused(tmp_path):
    bad = record()
    bad["metrics"] = {"bleu": 0.3}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ConfigError, match="hold none of acc"):
        load_records(path)


def test_report_cli_writes_the_report_and_prints_a_summary(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic()))
    res = runner.invoke(app, ["report", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "report.md").is_file() and "report.md" in res.stderr
    assert "4.00×" in res.stderr  # arc_easy's fastest: wdmoe at 1e7 Hz, 8 s → 2 s


# --- the Mixtral latency study ------------------------------------------------------------------


def samples(count=4, tokens=12, layers=3, experts=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(tokens, experts, generator=g) * 2 for _ in range(layers)] for _ in range(count)]


STATIC = ["channel.fading=none", "mobility.model=static"]


def test_mixtral_route_is_softmax_top2_renormalised():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    route = mixtral_route(logits, 2)
    assert route.candidates.tolist() == [[1, 2]]
    p = torch.softmax(logits, -1)[0].tolist()
    assert route.weights[0].tolist() == pytest.approx([p[1] / (p[1] + p[2]), p[2] / (p[1] + p[2])])
    assert route.importance[0].tolist() == pytest.approx([p[1], p[2]])


@pytest.mark.parametrize("overrides", [[], STATIC], ids=["rayleigh", "static"])
def test_study_theta_zero_is_topk_and_larger_theta_is_never_slower(overrides):
    data, scenario = samples(), load_scenario("paper", overrides)

    def totals(policy, allocator="equal"):
        return np.array([c.total_s for c in price_requests(data, scenario, policy, allocator, 0)])

    top = price_requests(data, scenario, make_policy("topk"), "equal", 0)
    assert all(c.retained_mass == pytest.approx(1.0) and c.dropped == 0 for c in top)
    assert totals(make_policy("wdmoe", theta=0.0)).tolist() == [c.total_s for c in top]
    # the same channel per request for every policy: dropping more never waits longer
    by_theta = np.stack([totals(make_policy("wdmoe", theta=t)) for t in (0.0, 0.1, 0.2, 0.3, 0.45)])
    assert np.all(np.diff(by_theta, axis=0) <= 1e-12) and by_theta[-1].mean() < by_theta[0].mean()
    for theta in (0.0, 0.3):
        equal, minmax = (
            totals(make_policy("wdmoe", theta=theta)),
            totals(make_policy("wdmoe", theta=theta), "minmax"),
        )
        assert np.all(minmax <= equal * (1 + 1e-6))


def test_study_rows_and_speedups():
    rows = run_study(
        samples(count=3), load_scenario("paper", STATIC), thetas=(0.3,), allocators=("equal", "minmax")
    )
    assert [(r.policy, r.allocator) for r in rows] == [
        ("topk", "equal"),
        ("wdmoe θ=0.3", "equal"),
        ("topk", "minmax"),
        ("wdmoe θ=0.3", "minmax"),
    ]
    assert (
        rows[0].speedup == 1.0 and rows[0].drop_rate == 0 and rows[0].experts_per_token == pytest.approx(2.0)
    )
    assert rows[1].speedup == pytest.approx(rows[0].mean_s / rows[1].mean_s) and rows[1].speedup >= 1
    assert rows[3].speedup_vs_equal == pytest.approx(rows[0].mean_s / rows[3].mean_s)
    assert rows[1].retained_mass < 1 and rows[1].drop_rate > 0


def test_study_refuses_scores_with_another_number_of_experts():
    with pytest.raises(ConfigError, match="6 experts but mixtral-8x7b has 8"):
        run_study(samples(count=1, experts=6), load_scenario("paper"), thetas=(0.2,), allocators=("equal",))


# --- wdmoe reproduce ----------------------------------------------------------------------------


def test_cli_defaults_match_the_settings_defaults():
    params = inspect.signature(reproduce_cmd).parameters
    d = ReproduceSettings()
    assert params["limit"].default == str(d.limit) and params["gsm8k_limit"].default == str(d.gsm8k_limit)
    assert params["max_new_tokens"].default == d.max_new_tokens
    assert params["tasks"].default == ",".join(d.tasks)
    assert tuple(map(float, params["thetas"].default.split(","))) == d.thetas
    assert params["study_prompts"].default == d.study_prompts


def test_command_line_names_what_differs_from_the_defaults(tmp_path):
    s = ReproduceSettings(tasks=("arc_easy",), limit=None, overrides=("cell.bandwidth_hz=1e7",))
    assert command_line(s) == (
        "wdmoe reproduce --limit all --gsm8k-limit 2 --tasks arc_easy --set cell.bandwidth_hz=1e7"
    )
    with pytest.raises(ConfigError, match="--thetas"):
        ReproduceSettings(thetas=(0.0,))


@pytest.mark.skipif(not (DATA / "arc_easy.jsonl").is_file(), reason=f"benchmark data {DATA} missing")
def test_reproduce_on_a_tiny_model_writes_results_readme_and_plots(tmp_path):
    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "ckpt")
    out = tmp_path / "repro"
    args = ["reproduce", "--model", ckpt, "--tasks", "arc_easy,piqa", "--limit", 2, "--thetas", "0.2,0.45"]
    args += ["--study-prompts", 2, "--study-thetas", "0.3", "--out-dir", out, "--data-dir", DATA]
    for override in TINY:
        args += ["--set", override]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    records = read_records(out / "results.jsonl")
    assert len(records) == 2 * 2 * 3  # tasks × allocators × (topk + 2 θ)
    assert {r["config"]["policy"]["params"].get("theta") for r in records} == {None, 0.2, 0.45}
    readme = (out / "README.md").read_text()
    assert (
        "wdmoe reproduce --limit 2 --gsm8k-limit 2 --tasks arc_easy,piqa --thetas 0.2,0.45" in readme
        and "--set model.num_layers=2" in readme
    )
    assert "### arc_easy" in readme and "### piqa" in readme and "## Mixtral-8x7B latency study" in readme
    assert "| wdmoe θ=0.3 | minmax |" in readme and "| arc_easy | 6 | 2 |" in readme
    assert len(read_records(out / "timings.jsonl")) == 12
    assert json.loads((out / "mixtral_latency.json").read_text())["rows"][0]["policy"] == "topk"
    for name in PLOT_NAMES:
        assert (out / name).stat().st_size > 1000
    again = runner.invoke(app, [str(a) for a in args])
    assert again.exit_code == 0, again.output
    assert "0 points run, 12 resumed" in again.stderr and len(read_records(out / "results.jsonl")) == 12
    assert "| arc_easy | 6 | 2 |" in (out / "README.md").read_text()  # the first run's timings
