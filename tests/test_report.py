"""`wdmoe report` over hand-made records, the Mixtral latency study on synthetic router scores, and a
`wdmoe reproduce` smoke run on a tiny checkpoint."""

import inspect
import json
import shlex

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
    NOTES,
    PLOT_NAMES,
    baseline,
    compare,
    fronts,
    load_records,
    make_rows,
    pareto_front,
    policy_label,
    render_tables,
    tail_note,
    write_report,
)
from wdmoe.studies.report.plots import device_panel
from wdmoe.studies.reproduce import Outcome, ReproduceSettings, command_line, plan, point_label

runner = CliRunner()
DATA = default_data_dir()
L, U = 3, 4


NO_OUTAGE = {
    "outage_requests": 0.0,
    "late_requests": 0.0,
    "lost_calls": 0.0,
    "late_calls": 0.0,
    "link_down_rate": 0.0,
    "per_device_outage": {name: [0.0] * U for name in ("link_down", "cut_down", "cut_late", "skipped")},
}


def record(task="arc_easy", policy="topk", params=None, allocator="equal", seed=0, acc=0.5, mean_s=1.0, **kw):
    """A record of the `wdmoe eval` schema with made-up numbers; ``outage``: the outage fields of
    its latency (None: an older record without them)."""
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
        "p50_s": kw.get("p50_s", 0.9 * mean_s),
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
    outage = kw.get("outage", NO_OUTAGE)
    if outage is not None:
        latency.update(outage)
        config.update({"deadline": {"mode": "drop", "slack": 3.0, "grace_s": 0.25}, "channel_moves": True})
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
        **({"outcomes": {"acc": kw["outcomes"]}} if "outcomes" in kw else {}),
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


# --- outage columns and heavy-tail notes --------------------------------------------------------


def outage(requests, late=0.0, link_down=(0.0,) * U):
    return {
        **NO_OUTAGE,
        "outage_requests": requests,
        "late_requests": late,
        "lost_calls": 2 * requests,
        "late_calls": late,
        "link_down_rate": float(np.mean(link_down)),
        "per_device_outage": {**NO_OUTAGE["per_device_outage"], "link_down": list(link_down)},
    }


def cells_of(text, start, allocator="equal"):
    line = next(x for x in text.splitlines() if x.startswith(f"| {start}") and f"| {allocator} |" in x)
    return [c.strip() for c in line.strip("|").split("|")]


def test_tables_show_outage_and_late_requests_and_a_dash_for_older_records():
    records = [
        record(mean_s=2.0, outage=outage(0.125, late=0.05)),
        record(policy="wdmoe", params=WD, outage=outage(0.0)),
        record(allocator="minmax", outage=None),  # written before outage was simulated
    ]
    rows = make_rows(records)
    text = render_tables(rows)
    assert "| outage req % | late req % |" in text
    assert cells_of(text, "topk")[-2:] == ["12.5", "5.0"]
    assert cells_of(text, "wdmoe")[-2:] == ["0.0", "0.0"]
    assert cells_of(text, "topk", "minmax")[-2:] == ["–", "–"]
    old = row_of(rows, allocator="minmax")
    assert old.outage_requests is None and old.per_device_outage == {} and tail_note(old) is None
    notes = " ".join(NOTES.split())
    assert "Outage and deadlines" in notes and "3GPP TS 38.214" in notes and "deadline" in notes


def test_delta_carries_its_paired_stderr_over_seeds_and_items_when_records_have_outcomes():
    base = [record(seed=0, acc=0.5, outcomes="1100"), record(seed=1, acc=0.5, outcomes="1010")]
    other = [
        record(policy="wdmoe", params=WD, seed=1, acc=0.75, outcomes="1110"),
        record(policy="wdmoe", params=WD, seed=0, acc=0.5, outcomes="1100"),
    ]
    rows = make_rows(base + other)
    wd = row_of(rows, policy="wdmoe")
    assert wd.outcomes == "11001110"  # seed 0's items, then seed 1's, whatever the record order
    c = compare(wd, baseline(wd, rows))
    # d = (0,0,0,0, 0,0,1,0): mean 1/8, sample var (7/64 + 49/64)/7 = 1/8 → se √(1/8 / 8) = 0.125
    assert c.delta == pytest.approx(12.5) and c.delta_se == pytest.approx(12.5)
    assert cells_of(render_tables(rows), "wdmoe")[13] == "+12.5 ± 12.5"
    assert cells_of(render_tables(rows), "topk")[13] == "+0.0"  # the baseline against itself: no ±
    older = make_rows([record(), record(policy="wdmoe", params=WD, outcomes="1")])  # base lacks them
    assert compare(older[1], older[0]).delta_se is None
    assert cells_of(render_tables(older), "wdmoe")[13] == "+0.0"


def test_outage_is_averaged_over_seeds_and_unknown_when_a_seed_lacks_it():
    both = make_rows([record(seed=0, outage=outage(0.1)), record(seed=1, outage=outage(0.3))])[0]
    assert both.outage_requests == pytest.approx(0.2) and both.per_device_outage["link_down"] == (0.0,) * U
    partial = record(seed=1)
    del partial["latency"]["outage_requests"], partial["latency"]["per_device_outage"]
    mixed = make_rows([record(seed=0, outage=outage(0.1)), partial])[0]
    assert mixed.outage_requests is None and mixed.per_device_outage["link_down"] == ()


def test_heavy_tailed_rows_get_a_note_naming_their_outage_or_their_numbers():
    tail = {"mean_s": 4.2, "p50_s": 1.0}
    records = [
        record(policy="wdmoe", params=WD, **tail, outage=outage(0.12, link_down=(0.01, 0.02, 0.09, 0.03))),
        record(**tail, per_request_s=[1.0, 1.0, 0.9, 14.0], outage=outage(0.0, late=0.25)),  # no outage
        record(policy="wdmoe", params=WD, allocator="minmax", mean_s=2.0, p50_s=1.0),  # ratio 2: no note
        record(allocator="minmax", **tail, outage=None),  # an older record: outage unknown
    ]
    rows = make_rows(records)
    wd, top = row_of(rows, policy="wdmoe"), row_of(rows)
    assert tail_note(wd) == (
        "wdmoe θ=0.2 k-scaled · equal: mean/p50 = 4.2 — 12 % of requests lost an expert to outage; "
        "device 2's link was down 9.0 % of the time"
    )
    assert tail_note(top) == (
        "topk · equal: mean/p50 = 4.2 — heavy tail without outage: p50 1 s, p95 6.3 s, p99 7.56 s, "
        "slowest 14 s of 4 requests; 25 % of requests had a call cut late; device 0 takes longest "
        "(1.89 s per request, Σ layers)"
    )
    assert tail_note(row_of(rows, policy="wdmoe", allocator="minmax")) is None
    assert "outage not recorded (an older record): p50 1 s" in tail_note(row_of(rows, allocator="minmax"))
    text = render_tables(rows + make_rows([record(task="piqa")]))
    arc, piqa = text.split("### piqa")
    table_end = arc.rindex("|")
    notes = arc[table_end:]
    assert "Heavy tails (mean/p50 > 3):" in notes and f"- {tail_note(wd)}" in notes
    assert f"- {tail_note(top)}" in notes and notes.count("\n- ") == 3
    assert "Heavy tails" not in piqa


def test_device_panels_have_their_own_axes_a_log_scale_for_one_slow_device_and_link_outage():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slow = record(outage=outage(0.2, link_down=(0.0, 0.0, 0.25, 0.0)))
    slow["latency"]["per_device"]["uplink_s"] = [0.1, 0.1, 250.0, 0.1]  # one device deep in a fade
    rows = make_rows([slow, record(allocator="minmax", outage=None), record(task="piqa", mean_s=3.0)])
    fig, axes = plt.subplots(1, 3)
    for i, (ax, row) in enumerate(zip(axes, rows, strict=True)):
        device_panel(ax, row, row.label(), legend=i == 0)
    assert axes[0].get_yscale() == "log" and axes[1].get_yscale() == "linear"
    twins = [a for a in fig.axes if a not in axes]
    assert len(twins) == 2  # no outage markers for the older record
    assert twins[0].lines[0].get_ydata().tolist() == pytest.approx([0.0, 0.0, 25.0, 0.0])
    assert "link down %" in [t.get_text() for t in axes[0].get_legend().get_texts()]
    plt.close(fig)


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
    assert tuple(map(int, params["seeds"].default.split(","))) == d.seeds and d.task_limits == ()
    assert params["max_new_tokens"].default == d.max_new_tokens
    assert params["tasks"].default == ",".join(d.tasks)
    assert tuple(map(float, params["thetas"].default.split(","))) == d.thetas
    assert params["study_prompts"].default == d.study_prompts


def test_command_line_names_what_differs_from_the_defaults(tmp_path):
    s = ReproduceSettings(tasks=("arc_easy",), limit=None, overrides=("cell.bandwidth_hz=1e7",))
    assert command_line(s) == (
        "wdmoe reproduce --limit all --gsm8k-limit 2 --tasks arc_easy --set cell.bandwidth_hz=1e7"
    )
    s = ReproduceSettings(tasks=("boolq", "gsm8k"), seeds=(0, 1, 2), task_limits=(("boolq", 100),))
    assert command_line(s) == (
        "wdmoe reproduce --limit 20 --gsm8k-limit 2 --task-limit boolq=100 --tasks boolq,gsm8k --seeds 0,1,2"
    )
    with pytest.raises(ConfigError, match="--thetas"):
        ReproduceSettings(thetas=(0.0,))


def captured_settings(monkeypatch, argv):
    """The ReproduceSettings `wdmoe reproduce ARGV` would run (nothing runs)."""
    import wdmoe.studies.reproduce as reproduce_module

    seen = []
    monkeypatch.setattr(reproduce_module, "reproduce", lambda s, *_: seen.append(s) or Outcome())
    res = runner.invoke(app, ["reproduce", *map(str, argv)])
    assert res.exit_code == 0, res.output
    return seen[0]


def test_command_line_round_trips_through_the_cli(monkeypatch, tmp_path):
    settings = ReproduceSettings(
        tasks=("arc_easy", "boolq", "gsm8k"),
        thetas=(0.05, 0.3),
        allocators=("minmax",),
        k_scaled=False,
        overrides=("cell.bandwidth_hz=1e7", "channel.fading=none"),
        seeds=(3, 1),
        limit=None,
        task_limits=(("boolq", 100), ("gsm8k", 5)),
        out_dir=tmp_path / "out dir",
        data_dir=tmp_path,
        batch_size=4,
        study_prompts=0,
        study_thetas=(0.2,),
    )
    argv = shlex.split(command_line(settings))
    assert argv[:2] == ["wdmoe", "reproduce"]
    assert captured_settings(monkeypatch, argv[2:]) == settings
    assert captured_settings(monkeypatch, []) == ReproduceSettings()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,x"], "--seeds = '0,x' is not a comma-separated list of integers"),
        (["--seeds", "1,1"], "--seeds = [1, 1] is invalid; allowed: distinct integers ≥ 0"),
        (["--seeds", ""], "--seeds = [] is invalid"),
        (["--task-limit", "boolq"], "--task-limit 'boolq' is malformed; allowed: TASK=ITEMS"),
        (["--task-limit", "boolq=many"], "--task-limit 'boolq=many': 'many' is not a whole number"),
        (["--task-limit", "bolq=100"], "--task-limit bolq=100: 'bolq' is not one of --tasks"),
        (["--task-limit", "boolq=0"], "--task-limit boolq=0: 0 items is out of range"),
        (["--task-limit", "boolq=1", "--task-limit", "boolq=2"], "--task-limit names 'boolq' twice"),
    ],
)
def test_bad_seeds_and_task_limits_give_clear_errors(args, message):
    res = runner.invoke(app, ["reproduce", *args])
    assert res.exit_code == 2 and message in " ".join(res.stderr.split())
    assert "Traceback" not in res.output


def test_plan_runs_seed_then_task_then_allocator_then_policy():
    s = ReproduceSettings(
        tasks=("arc_easy", "gsm8k"), thetas=(0.2,), seeds=(5, 1), task_limits=(("gsm8k", 7),), limit=3
    )
    order = [(p.sim.seed, task, p.sim.allocator, p.policy.name) for task, p in plan(s)]
    assert order == [
        (seed, task, allocator, policy)
        for seed in (5, 1)
        for task in ("arc_easy", "gsm8k")
        for allocator in ("equal", "minmax")
        for policy in ("topk", "wdmoe")
    ]
    limits = {task: p.limit for task, p in plan(s)}
    assert limits == {"arc_easy": 3, "gsm8k": 7}
    assert s.limit_for("piqa") == 3 and ReproduceSettings().limit_for("gsm8k") == 2
    assert point_label("arc_easy", plan(s)[-1][1], 2) == "arc_easy · wdmoe θ=0.2 k-scaled · minmax · seed 1"


def test_beyond_adds_the_baselines_and_the_new_policy_after_the_papers_and_they_build():
    from wdmoe.policies import make_policy
    from wdmoe.studies.reproduce_page import command_line

    beyond = ("dynskip", "marginal")
    s = ReproduceSettings(tasks=("arc_easy",), thetas=(0.2,), allocators=("minmax",), beyond=beyond)
    points = [p.policy for _, p in plan(s)]
    assert [p.name for p in points] == ["topk", "wdmoe", "dynskip", "marginal"]
    for p in points[2:]:
        assert make_policy(p.name, **p.params).name == p.name  # the shipped calibration loads
    assert "--beyond dynskip,marginal" in command_line(s)
    with pytest.raises(ConfigError, match="--beyond nope: unknown; allowed: dynskip, capacity, marginal"):
        ReproduceSettings(beyond=("nope",))
    with pytest.raises(ConfigError, match="--beyond placement needs --placement FILE"):
        ReproduceSettings(beyond=("placement",))


def test_beyond_cell_variants_run_wdmoe_on_the_adaptive_format_and_a_planned_placement(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text("{}")
    s = ReproduceSettings(
        tasks=("arc_easy",), allocators=("minmax",), beyond=("adaptive", "placement"), placement=plan_file
    )
    variants = [(p.policy.name, dict(p.policy.params), p.overrides) for _, p in plan(s)][-2:]
    assert variants == [
        ("wdmoe", {"theta": 0.1, "k_scaled": True}, ("wire.format=adaptive",)),
        ("wdmoe", {"theta": 0.1, "k_scaled": True}, (f"cell.placement={plan_file}",)),
    ]


@pytest.mark.skipif(not (DATA / "arc_easy.jsonl").is_file(), reason=f"benchmark data {DATA} missing")
def test_reproduce_on_a_tiny_model_writes_results_readme_and_plots(tmp_path):
    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "ckpt")
    out = tmp_path / "repro"
    args = ["reproduce", "--model", ckpt, "--tasks", "arc_easy,piqa", "--limit", 2, "--thetas", "0.2,0.45"]
    args += ["--seeds", "0,1", "--allocators", "equal", "--task-limit", "piqa=1"]
    args += ["--study-prompts", 2, "--study-thetas", "0.3", "--out-dir", out, "--data-dir", DATA]
    for override in TINY:
        args += ["--set", override]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    records = read_records(out / "results.jsonl")
    assert len(records) == 2 * 2 * 3  # seeds × tasks × (topk + 2 θ)
    order = [(r["config"]["seeds"]["channel"], r["task"]) for r in records]
    assert order == [(seed, task) for seed in (0, 1) for task in ("arc_easy", "piqa") for _ in range(3)]
    assert {r["config"]["policy"]["params"].get("theta") for r in records} == {None, 0.2, 0.45}
    assert {r["task"]: r["n"] for r in records} == {"arc_easy": 2, "piqa": 1}
    assert all("outage_requests" in r["latency"] and r["config"]["channel_moves"] for r in records)
    readme = (out / "README.md").read_text()
    flat = " ".join(readme.split())
    assert (
        "wdmoe reproduce --limit 2 --gsm8k-limit 2 --task-limit piqa=1 --tasks arc_easy,piqa "
        "--thetas 0.2,0.45 --allocators equal"
        in readme
        and "--seeds 0,1" in readme
        and "--set model.num_layers=2" in readme
    )
    assert "channel seeds 0, 1 (a row averages its seeds; the latency study uses seed 0)" in flat
    assert "2 items per task (piqa: 1)" in flat
    assert "below 0.1523 bit/s/Hz" in flat and "3GPP TS 38.214 Table 5.2.2.1-2" in flat
    assert "slack·t̂ + grace = 3·t̂ + 0.25 s" in flat and "mode `drop`" in flat
    assert "The channel moves layer by layer" in flat
    assert "### arc_easy" in readme and "### piqa" in readme and "## Mixtral-8x7B latency study" in readme
    assert "| 0,1 (×2) |" in readme and "| outage req % | late req % |" in readme
    assert "| wdmoe θ=0.3 | equal |" in readme and "| arc_easy | 6 | 2 |" in readme
    assert "| piqa | 6 | 1 |" in readme and "Channel seed 0." in readme
    assert len(read_records(out / "timings.jsonl")) == 12
    assert json.loads((out / "mixtral_latency.json").read_text())["rows"][0]["policy"] == "topk"
    for name in PLOT_NAMES:
        assert (out / name).stat().st_size > 1000
    again = runner.invoke(app, [str(a) for a in args])
    assert again.exit_code == 0, again.output
    assert "0 points run, 12 resumed" in again.stderr and len(read_records(out / "results.jsonl")) == 12
    assert "| arc_easy | 6 | 2 |" in (out / "README.md").read_text()  # the first run's timings
