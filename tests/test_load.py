"""Latency under load, the pure part: arrivals, the figures of a run against hand-computed ones,
resumable results files, and the report's "Latency under load" section."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from test_report import synthetic
from wdmoe.cli.app import app
from wdmoe.errors import ConfigError
from wdmoe.serving.load import LoadRecord, poisson_arrivals, summarize, summarize_runs, trace_arrivals
from wdmoe.studies.load_io import (
    append_load_record,
    done_keys,
    is_load_file,
    read_load_records,
    record_to_json,
)
from wdmoe.studies.report import LOAD_PLOT_NAMES, find_load_files, write_report


def made_up(face="runtime", rate=2.0):
    """Five requests: three served (one of a single token), one refused, one failed."""
    return [
        LoadRecord(face, rate, 0, 0.0, 0.1, 0.5, 5, "ok", dropped_experts=2),
        LoadRecord(face, rate, 1, 1.0, 0.2, 1.8, 5, "ok", dropped_experts=0),
        LoadRecord(face, rate, 2, 2.0, 0.3, 2.3, 1, "ok"),
        LoadRecord(face, rate, 3, 2.5, None, None, 0, "refused", "RESOURCE_EXHAUSTED: full"),
        LoadRecord(face, rate, 4, 3.0, None, None, 0, "failed", "INTERNAL: boom"),
    ]


def test_tpot_is_the_time_after_the_first_token_per_further_token():
    r = made_up()
    assert r[0].tpot_s == pytest.approx(0.1)  # (0.5 − 0 − 0.1) / 4
    assert r[1].tpot_s == pytest.approx(0.15)  # (1.8 − 1 − 0.2) / 4
    assert r[2].tpot_s is None and r[3].tpot_s is None  # one token; never finished


def test_summary_matches_hand_computed_percentiles_throughput_and_drops():
    s = summarize(made_up())
    assert (s["n"], s["completed"], s["refused"], s["failed"]) == (5, 3, 1, 1)
    assert s["drop_rate"] == pytest.approx(0.4) and s["offered_rps"] == 2.0
    assert s["dropped_experts_mean"] == pytest.approx(1.0)  # (2 + 0) / 2; request 2's is unknown
    # TTFT over [0.1, 0.2, 0.3]: linear percentiles at ranks 1, 1.9, 1.98
    assert (s["ttft_p50"], s["ttft_p95"], s["ttft_p99"], s["ttft_mean"]) == pytest.approx(
        (0.2, 0.29, 0.298, 0.2)
    )
    # TPOT over [0.1, 0.15]
    assert (s["tpot_p50"], s["tpot_p95"], s["tpot_p99"]) == pytest.approx((0.125, 0.1475, 0.1495))
    # span 0 → 2.3 s: 11 tokens, 3 requests
    assert s["span_s"] == pytest.approx(2.3)
    assert s["tokens_per_s"] == pytest.approx(11 / 2.3) and s["requests_per_s"] == pytest.approx(3 / 2.3)


def test_a_run_where_nothing_completed_summarizes_to_nan_not_an_error():
    s = summarize([LoadRecord("sim", 8.0, i, 0.1 * i, None, None, 0, "refused") for i in range(3)])
    assert s["completed"] == 0 and s["drop_rate"] == 1.0
    assert all(math.isnan(s[k]) for k in ("ttft_p50", "tpot_p99", "tokens_per_s", "dropped_experts_mean"))
    with pytest.raises(ConfigError, match="no load records"):
        summarize([])


def test_runs_are_grouped_by_face_and_rate_and_a_trace_has_its_offered_rate():
    trace = [LoadRecord("sim", None, i, at, 0.1, at + 0.2, 2, "ok") for i, at in enumerate((0.0, 1.0, 3.0))]
    runs = summarize_runs([*made_up("runtime", 4.0), *trace, *made_up("sim", 2.0), *made_up("runtime", 1.0)])
    assert [(s["face"], s["rate_per_s"]) for s in runs] == [
        ("sim", 2.0),
        ("sim", None),
        ("runtime", 1.0),
        ("runtime", 4.0),
    ]
    assert runs[1]["offered_rps"] == pytest.approx(2 / 3)  # 2 gaps in 3 s


def test_poisson_gaps_have_mean_one_over_rate_and_repeat_per_seed():
    arrivals = poisson_arrivals(4.0, 20_000, seed=7)
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and np.all(gaps >= 0) and arrivals.size == 20_000
    assert abs(gaps.mean() - 0.25) < 0.05 * 0.25
    np.testing.assert_array_equal(arrivals, poisson_arrivals(4.0, 20_000, seed=7))
    assert not np.array_equal(arrivals, poisson_arrivals(4.0, 20_000, seed=8))
    np.testing.assert_allclose(poisson_arrivals(2.0, 50, seed=7), 2 * poisson_arrivals(4.0, 50, seed=7))
    with pytest.raises(ConfigError, match="positive"):
        poisson_arrivals(0.0, 3, seed=0)
    with pytest.raises(ConfigError, match="≥ 1"):
        poisson_arrivals(1.0, 0, seed=0)


@pytest.mark.parametrize(
    ("times", "message"),
    [
        ([0, "x"], "arrival 2 of the trace is not a number: 'x'"),
        ([0, 1, float("nan")], "arrival 3 .* finite time ≥ 0 s, got nan"),
        (["-1"], "arrival 1 .* got '-1'"),
        ([0, float("inf")], "arrival 2"),
        ([], "empty"),
    ],
)
def test_bad_traces_name_the_entry(times, message):
    with pytest.raises(ConfigError, match=message):
        trace_arrivals(times)


def test_a_trace_is_sorted():
    np.testing.assert_array_equal(trace_arrivals(["2", 0.5, 0, "1e-1"]), [0.0, 0.1, 0.5, 2.0])


def test_results_files_resume_and_survive_a_cut_short_line(tmp_path):
    path = tmp_path / "load.jsonl"
    assert read_load_records(path) == [] and done_keys(path) == set() and not is_load_file(path)
    records = made_up()
    for r in records[:3]:
        append_load_record(path, r)
    with path.open("a") as f:
        f.write(json.dumps(record_to_json(records[3]))[:40])  # a crash mid-write
    with pytest.warns(UserWarning, match="ignoring a truncated last line"):
        assert read_load_records(path) == records[:3] and is_load_file(path)
        assert done_keys(path) == {("runtime", "{}", 2.0, i) for i in range(3)}  # "{}": no config
    with pytest.warns(UserWarning, match="truncated"):
        append_load_record(path, records[3])
    assert read_load_records(path) == records[:4]
    path.write_text('{"face": "runtime"}\n')
    with pytest.raises(ConfigError, match="record 1 is not a load record: it lacks"):
        read_load_records(path)


def write_load_file(path, records):
    path.write_text("".join(json.dumps(record_to_json(r)) + "\n" for r in records))


def test_report_renders_the_load_section_from_a_made_up_file(tmp_path):
    records = [*made_up("runtime", 2.0), *made_up("sim", 2.0)]
    records = [replace(r, config={"seed": 3, "max_new_tokens": 5}) for r in records]
    report = write_report([], tmp_path / "out", load=records)
    text = report.markdown.read_text()
    assert "## Latency under load" in text and "### simulator" in text and "### runtime" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    for cell in (
        "| 5 | 3 | 20.0 | 20.0 |",
        "| 200.0 | 290.0 | 298.0 |",
        "| 125.0 | 147.5 | 149.5 |",
        "| 4.78 |",
    ):
        assert cell in row, (cell, row)
    assert "n = 5 requests per rate" in text and "max_new_tokens=5 · seed=3" in text
    for name in LOAD_PLOT_NAMES:
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in text


def test_report_cli_adds_the_load_section_beside_eval_results(tmp_path):
    results = tmp_path / "eval.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in synthetic()))
    write_load_file(tmp_path / "load.jsonl", made_up())
    assert find_load_files(results) == [tmp_path / "load.jsonl"]
    res = CliRunner().invoke(app, ["report", str(results), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "out" / "report.md").read_text()
    assert "### arc_easy" in text and "## Latency under load" in text and "| 200.0 | 290.0 |" in text
    res = CliRunner().invoke(app, ["report", str(tmp_path / "load.jsonl"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "o2" / "report.md").read_text()
    assert "## Latency under load" in text and "arc_easy" not in text


def test_records_of_different_settings_never_mix_in_a_run_a_resume_or_a_summary(tmp_path):
    """The same (face, λ, request) under two configurations: two series, each summarised alone."""
    path = tmp_path / "load.jsonl"
    a = [replace(r, config={"policy": "topk"}) for r in made_up()]
    b = [replace(r, config={"policy": "wdmoe", "params": {"theta": 0.1}}) for r in made_up()]
    for r in a + b:
        append_load_record(path, r)
    keys = done_keys(path)
    assert len(keys) == len(a) + len(b)  # the same requests under two settings: all kept apart
    runs = summarize_runs(read_load_records(path))
    assert len(runs) == 2 * len({r.rate_per_s for r in a})
    assert sorted(s["n"] for s in runs) == sorted(
        2 * [sum(r.rate_per_s == x for r in a) for x in {r.rate_per_s for r in a}]
    )
