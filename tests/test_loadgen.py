"""The load generator against a real BS on loopback (tiny model, in-process devices), and
`wdmoe load` in both faces (the simulator's through a stand-in until wdmoe.serving exists)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from lab import TOKEN
from wdmoe.cli.app import app
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.loadgen import LoadTarget, run_load
from wdmoe.serving.load import LoadRecord, poisson_arrivals, summarize, trace_arrivals
from wdmoe.studies.load_io import append_load_record, read_load_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_runtime_load_at_two_rates_times_every_request(lab_factory, tmp_path):
    lab = lab_factory(devices=4)
    target = LoadTarget(lab.server.address, TOKEN, max_new_tokens=3, config={"seed": 1})
    out = tmp_path / "load.jsonl"
    for rate in (5.0, 20.0):
        arrivals = poisson_arrivals(rate, 3, seed=1)
        records = run_load(
            target, arrivals, ["what is the router"], rate, on_record=lambda r: append_load_record(out, r)
        )
        assert [r.request for r in records] == [0, 1, 2]
        for r, at_s in zip(records, arrivals, strict=True):
            assert r.status == "ok" and r.error == "" and r.face == "runtime", r
            assert r.rate_per_s == rate and r.config == {"seed": 1}
            assert r.new_tokens == 3 and r.dropped_experts >= 0  # known (0 unless a call ran late)
            assert r.arrival_s >= at_s - 1e-3 and r.arrival_s < at_s + 0.5  # sent on time
            assert r.ttft_s is not None and r.finished_s is not None
            assert 0 < r.ttft_s <= r.finished_s - r.arrival_s
            assert r.tpot_s is not None and r.tpot_s >= 0 and r.predicted_token_s is not None
        s = summarize(records)
        assert (s["n"], s["completed"], s["drop_rate"]) == (3, 3, 0.0) and s["tokens_per_s"] > 0
    assert sorted((r.rate_per_s, r.request) for r in read_load_records(out)) == [  # in the order they ended
        (rate, i) for rate in (5.0, 20.0) for i in range(3)
    ]


def test_a_full_bs_refuses_simultaneous_arrivals_and_earlier_records_stay(lab_factory, tmp_path):
    out = tmp_path / "load.jsonl"
    earlier = LoadRecord("runtime", 1.0, 0, 0.0, 0.1, 0.5, 3, "ok", dropped_experts=0)
    append_load_record(out, earlier)
    settings = RuntimeSettings(max_active=1, max_queue=0, mode="wait", max_wait_s=5.0)
    lab = lab_factory(devices=2, settings=settings, delays={0: 0.02})  # each request takes a while
    target = LoadTarget(lab.server.address, TOKEN, max_new_tokens=12)
    records = run_load(
        target,
        trace_arrivals([0, 0, 0, 0, 0]),
        ["what is the router"],
        on_record=lambda r: append_load_record(out, r),
    )
    statuses = [r.status for r in records]
    assert sorted(r.request for r in records) == [0, 1, 2, 3, 4]
    assert statuses.count("ok") >= 1 and statuses.count("refused") >= 1 and "failed" not in statuses
    for r in records:
        if r.status == "refused":
            assert "RESOURCE_EXHAUSTED" in r.error and r.finished_s is None and r.new_tokens == 0
        else:
            assert r.new_tokens == 12
    stored = read_load_records(out)
    assert stored[0] == earlier and sorted(stored[1:], key=lambda r: r.request) == records
    s = summarize(records)
    assert s["refused"] == statuses.count("refused") and s["drop_rate"] == pytest.approx(s["refused"] / 5)


def test_load_cli_against_a_bs_writes_resumable_records(lab_factory, tmp_path):
    lab = lab_factory(devices=2)
    out = tmp_path / "load.jsonl"
    args = [
        "load",
        "--bs",
        lab.server.address,
        "--token",
        TOKEN,
        "--rates",
        "10,40",
        "--requests",
        "2",
        "--max-new-tokens",
        "2",
        "--seed",
        "3",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    first = read_load_records(out)
    assert len(first) == 4 and all(r.status == "ok" for r in first)
    assert first[0].config["seed"] == 3 and first[0].config["bs"] == lab.server.address
    assert "TTFT" in res.stdout and "40" in res.stdout
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert read_load_records(out) == first  # everything was there: nothing sent again
    assert "already" in res.stderr


def test_load_cli_names_bad_input(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["load", "--token", "t", "--rates", "1,x"])
    assert res.exit_code == 2 and "--rates" in res.stderr
    res = runner.invoke(app, ["load", "--token", "t", "--rates", "0"])
    assert res.exit_code == 2 and "positive" in res.stderr
    trace = tmp_path / "trace.txt"
    trace.write_text("0\n0.5\n-1\n")
    res = runner.invoke(app, ["load", "--token", "t", "--trace", str(trace)])
    assert res.exit_code == 2 and "arrival 3" in res.stderr
    res = runner.invoke(app, ["load", "--token", "t", "--trace", str(tmp_path / "none.txt")])
    assert res.exit_code == 2 and "none.txt" in res.stderr


def fake_simulate_load(calls):
    """A stand-in for wdmoe.serving.simulate_load: one ok record per arrival, 10 ms per token."""

    def simulate_load(
        wm,
        tok,
        scenario,
        sim_settings,
        *,
        prompts,
        arrivals_s,
        max_new_tokens,
        max_batch,
        max_queue,
        rate_per_s,
        on_record,
    ):
        calls.append(
            {
                "n": len(arrivals_s),
                "rate": rate_per_s,
                "seed": sim_settings.seed,
                "prompts": prompts,
                "max_new_tokens": max_new_tokens,
                "max_batch": max_batch,
                "wm": wm,
            }
        )
        out = []
        for i, at_s in enumerate(arrivals_s):
            r = LoadRecord(
                "sim",
                rate_per_s,
                i,
                float(at_s),
                0.05,
                float(at_s) + 0.05 + 0.01 * (max_new_tokens - 1),
                max_new_tokens,
                "ok",
                dropped_experts=1,
                predicted_token_s=0.01,
            )
            on_record(r)
            out.append(r)
        return out

    return simulate_load


def simulate_args(ckpt, out):
    from test_simulate import TINY

    args = [
        "load",
        "--simulate",
        "--model",
        str(ckpt),
        "--scenario",
        "lab",
        "--rates",
        "2,8",
        "--requests",
        "3",
        "--max-new-tokens",
        "2",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    for override in TINY:
        args += ["--set", override]
    return args


def test_load_cli_simulate_plumbing_through_a_stand_in(ckpt, tmp_path, monkeypatch):
    calls: list[dict] = []
    sim_load = pytest.importorskip("wdmoe.serving.sim_load", reason="wdmoe.serving not built yet")
    monkeypatch.setattr(sim_load, "simulate_load", fake_simulate_load(calls))
    out = tmp_path / "load_sim.jsonl"
    res = CliRunner().invoke(app, simulate_args(ckpt, out))
    assert res.exit_code == 0, res.output
    assert [(c["n"], c["rate"], c["seed"], c["max_new_tokens"]) for c in calls] == [
        (3, 2.0, 5, 2),
        (3, 8.0, 5, 2),
    ]
    assert calls[0]["wm"].num_experts == 8 and calls[0]["prompts"]
    records = read_load_records(out)
    assert len(records) == 6 and {r.face for r in records} == {"sim"}
    assert records[0].config["policy"] == "topk" and records[0].config["seed"] == 5
    np.testing.assert_allclose([r.tpot_s for r in records], 0.01)
    res = CliRunner().invoke(app, simulate_args(ckpt, out))
    assert res.exit_code == 0 and len(calls) == 2 and len(read_load_records(out)) == 6  # resumed


def test_load_cli_simulate_face(ckpt, tmp_path):
    out = tmp_path / "load_sim.jsonl"
    res = CliRunner().invoke(app, simulate_args(ckpt, out))
    assert res.exit_code == 0, res.output
    records = read_load_records(out)
    assert len(records) == 6 and all(r.face == "sim" and r.status == "ok" for r in records)
    for r in records:
        assert (
            r.ttft_s is not None and r.finished_s is not None and 0 < r.ttft_s <= r.finished_s - r.arrival_s
        )
