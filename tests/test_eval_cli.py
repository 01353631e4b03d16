"""`wdmoe eval` on a tiny checkpoint: one record per task, resume after a crash, clear errors."""

import json

import pytest
from typer.testing import CliRunner

from test_simulate import TINY
from wdmoe.cli import app
from wdmoe.errors import ConfigError
from wdmoe.eval.results import append_record, completed_keys, config_key, read_records
from wdmoe.eval.tasks import default_data_dir

DATA = default_data_dir()
runner = CliRunner()
needs_data = pytest.mark.skipif(
    not (DATA / "arc_easy.jsonl").is_file(), reason=f"benchmark data folder {DATA} is missing"
)


def run_eval(ckpt, out, *extra, tasks="arc_easy,piqa", data_dir=DATA, policy=("wdmoe", "--theta", 0.3)):
    args = ["eval", "--tasks", tasks, "--model", ckpt, "--data-dir", data_dir, "--limit", 3]
    args += ["--out", out, "--policy", *policy, "--seed", 1, *extra]
    for override in TINY:
        args += ["--set", override]
    return runner.invoke(app, [str(a) for a in args])


def without_time(records):
    return sorted(({k: v for k, v in r.items() if k != "timestamp"} for r in records), key=lambda r: r["key"])


@needs_data
def test_a_run_writes_one_record_per_task_with_metrics_latency_and_config(ckpt, tmp_path):
    res = run_eval(ckpt, tmp_path / "r.jsonl", "--json")
    assert res.exit_code == 0, res.output
    records = read_records(tmp_path / "r.jsonl")
    assert [r["task"] for r in records] == ["arc_easy", "piqa"]
    assert [json.loads(line) for line in res.stdout.splitlines()] == records
    for r in records:
        assert r["n"] == 3 and 0 <= r["metrics"]["acc"] <= 1 and "acc" in r["stderr"]
        hits = r["outcomes"]["acc"]  # each item's 0/1, so that two runs compare item by item
        assert len(hits) == 3 and set(hits) <= {"0", "1"} and hits.count("1") / 3 == r["metrics"]["acc"]
        lat = r["latency"]
        assert lat["requests"] >= 1 and lat["p50_s"] <= lat["p95_s"] <= lat["p99_s"]
        assert lat["mean_s"] > 0 and 0 <= lat["drop_rate"] < 1 and 0 < lat["retained_mass"] <= 1
        cfg = r["config"]
        assert cfg["policy"] == {"name": "wdmoe", "params": {"theta": 0.3}}
        assert cfg["scenario"]["name"] == "paper" and cfg["scenario"]["overrides"] == TINY
        assert cfg["seeds"] == {"channel": 1} and cfg["limit"] == 3 and cfg["allocator"] == "equal"
        assert cfg["data_dir"] == str(DATA.resolve()) and r["wdmoe_version"]


@needs_data
def test_a_rerun_with_the_same_config_skips_what_is_done(ckpt, tmp_path):
    out = tmp_path / "r.jsonl"
    assert run_eval(ckpt, out).exit_code == 0
    res = run_eval(ckpt, out)
    assert res.exit_code == 0, res.output
    assert "skipped" in res.stderr
    assert len(read_records(out)) == 2
    assert run_eval(ckpt, out, "--seed", 2).exit_code == 0  # another config: new records
    assert len(completed_keys(out)) == 4


@needs_data
def test_records_of_an_older_version_still_count_as_done(ckpt, tmp_path):
    """A version before placement and wire formats wrote configs without those fields (and hashed
    what it had); a version in between hashed them at their neutral values. Both resume."""
    out = tmp_path / "r.jsonl"
    assert run_eval(ckpt, out, tasks="arc_easy").exit_code == 0
    (record,) = read_records(out)
    resolved = record["config"]["scenario"]["resolved"]
    assert resolved["cell"]["placement"] is None and resolved["wire"]["format"] == "none"
    older = json.loads(json.dumps(record))
    del older["config"]["scenario"]["resolved"]["cell"]["placement"]
    for name in ("format", "adaptive_formats", "adaptive_snr_db"):
        del older["config"]["scenario"]["resolved"]["wire"][name]
    assert config_key(older["config"], "arc_easy") == record["key"]
    older["key"] = "hashed-otherwise"  # what the in-between version stored
    old = tmp_path / "old.jsonl"
    append_record(old, older)
    res = run_eval(ckpt, old, tasks="arc_easy")
    assert res.exit_code == 0 and "skipped" in res.stderr, res.output
    assert read_records(old) == [older]  # nothing recomputed, nothing appended
    assert config_key({**record["config"], "limit": 4}, "arc_easy") != record["key"]  # other fields count


@needs_data
def test_a_truncated_last_line_is_ignored_and_resume_matches_an_uninterrupted_run(ckpt, tmp_path):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    assert run_eval(ckpt, whole).exit_code == 0
    assert run_eval(ckpt, resumed, tasks="arc_easy").exit_code == 0  # killed before piqa finished…
    with resumed.open("a") as f:
        f.write(whole.read_text().splitlines()[1][:57])  # …while writing piqa's line
    with pytest.warns(UserWarning, match="truncated last line"):
        res = run_eval(ckpt, resumed)
    assert res.exit_code == 0, res.output
    assert without_time(read_records(resumed)) == without_time(read_records(whole))
    assert resumed.read_text().endswith("\n") and len(resumed.read_text().splitlines()) == 2


def test_a_bad_line_before_the_end_is_an_error_naming_it(tmp_path):
    out = tmp_path / "r.jsonl"
    append_record(out, {"key": "a"})
    with out.open("a") as f:
        f.write("{not json\n")
    with pytest.warns(UserWarning, match="truncated last line"):
        append_record(out, {"key": "b"})  # the bad line was the tail when this was appended: cut off
    assert completed_keys(out) == {"a", "b"}
    out.write_text('{"key": "a"}\n{oops\n{"key": "b"}\n')
    with pytest.raises(ConfigError, match=r"r.jsonl:2"):
        read_records(out)


@pytest.mark.parametrize(
    ("extra", "tasks", "message"),
    [
        ((), "arc_easy,nope", "unknown task 'nope'"),
        (("--set", "cell.num_devices=lots"), "arc_easy", "cell.num_devices"),
        (("--policy", "topk", "--theta", "0.2"), "arc_easy", "does not take"),
        (("--allocator", "energy", "--energy-slack", "-1"), "arc_easy", "sim.energy_slack"),
    ],
)
@needs_data
def test_bad_inputs_give_clear_errors(ckpt, tmp_path, extra, tasks, message):
    res = run_eval(ckpt, tmp_path / "r.jsonl", *extra, tasks=tasks)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_a_data_dir_without_the_file_is_a_clear_error(ckpt, tmp_path):
    res = run_eval(ckpt, tmp_path / "r.jsonl", tasks="piqa", data_dir=tmp_path)
    assert res.exit_code == 2, res.output
    assert "piqa.jsonl does not exist" in res.stderr and "--data-dir" in res.stderr


@needs_data
def test_latency_is_per_request_whatever_the_batch_size(ckpt, tmp_path):
    small, big = tmp_path / "b1.jsonl", tmp_path / "b8.jsonl"
    still = ("--set", "channel.fading=none")  # rows of a forward share its start time: fix the channel
    assert run_eval(ckpt, small, "--batch-size", 1, *still, tasks="arc_easy", policy=["topk"]).exit_code == 0
    assert run_eval(ckpt, big, "--batch-size", 8, *still, tasks="arc_easy", policy=["topk"]).exit_code == 0
    (a,), (b,) = read_records(small), read_records(big)
    assert a["metrics"] == b["metrics"]
    assert a["latency"]["requests"] == b["latency"]["requests"] == 12  # 3 items × 4 choices
    assert a["latency"]["mean_s"] == pytest.approx(b["latency"]["mean_s"], rel=1e-9)
    devices = b["latency"]["per_device"]
    assert len(devices["tokens"]) == 8 and len(devices["snr_db_dl"]) == 8
    assert sum(devices["tokens"]) > 0 and devices["drop_rate"] == [0.0] * 8  # topk drops nothing
    assert b["latency"]["experts_per_token"] == pytest.approx(2.0)  # the tiny model's top-2
    assert len(b["latency"]["per_layer"]["waiting_s"]) == 2


@needs_data
def test_policy_parameters_reach_the_policy_and_the_record(ckpt, tmp_path):
    out = tmp_path / "p.jsonl"
    res = run_eval(ckpt, out, "--param", "k_scaled=true", tasks="arc_easy")
    assert res.exit_code == 0, res.output
    (record,) = read_records(out)
    assert record["config"]["policy"]["params"] == {"theta": 0.3, "k_scaled": True}
    bad = run_eval(ckpt, tmp_path / "q.jsonl", "--param", "k_scaled", tasks="arc_easy")
    assert bad.exit_code == 2 and "'k_scaled' is not NAME=VALUE" in bad.stderr
    unknown = run_eval(ckpt, tmp_path / "r.jsonl", "--param", "colour=red", tasks="arc_easy")
    assert unknown.exit_code == 2 and "colour" in unknown.stderr


@needs_data
def test_stale_and_noisy_csi_reach_the_record_and_bad_values_are_named(ckpt, tmp_path):
    out = tmp_path / "c.jsonl"
    res = run_eval(ckpt, out, "--csi-delay-blocks", 3, "--csi-error-db", 2.5, tasks="arc_easy")
    assert res.exit_code == 0, res.output
    (record,) = read_records(out)
    assert record["config"]["csi"] == {"delay_blocks": 3, "error_std_db": 2.5}
    bad = run_eval(ckpt, tmp_path / "d.jsonl", "--csi-error-db", -1, tasks="arc_easy")
    assert bad.exit_code == 2 and "csi_error_std_db" in bad.stderr and "-1" in bad.stderr
    assert not (tmp_path / "d.jsonl").exists()
