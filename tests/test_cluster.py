"""``Cluster`` and ``wdmoe cluster``: a BS and N device worker processes on loopback, always torn down."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tiny import save_tiny_checkpoint
from wdmoe.cli import app
from wdmoe.errors import ConfigError
from wdmoe.models.loading import load_checkpoint
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.cluster import Cluster, ClusterError, DeviceProcess, alive, free_port, round_robin


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral")


def test_round_robin_places_expert_e_on_device_e_mod_n_and_replicas_on_the_next():
    keys = [(layer, e) for layer in range(2) for e in range(8)]
    placed = round_robin(keys, 3)
    assert sorted(k for ks in placed for k in ks) == keys
    assert all(e % 3 == u for u, ks in enumerate(placed) for (_, e) in ks)
    twice = round_robin(keys, 3, replicas=2)
    assert all(sum(k in ks for ks in twice) == 2 for k in keys)
    assert all((u - e) % 3 in (0, 1) for u, ks in enumerate(twice) for (_, e) in ks)


def test_default_model_over_8_device_processes_matches_in_process_and_survives_a_kill():
    """The default model with 8 device worker processes: logits as in process; a device killed
    mid-generation → the answer completes, the drops are recorded; restarted → used again."""
    ref, _ = load_checkpoint("default")
    ids = torch.randint(100, 5000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    del ref
    with Cluster("default", devices=8, settings=RuntimeSettings(heartbeat_s=0.3)) as cluster:
        pids = cluster.pids()
        assert len(pids) == 8 and all(alive(p) for p in pids)
        with torch.no_grad():
            got = cluster.wm.model(ids).logits
        assert (got - want).abs().max().item() <= 1e-4
        assert all(r["calls"] > 0 and not r["failures"] for r in cluster.stats()["devices"])
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)
            if len(pieces) == 3:
                cluster.kill_device(3)

        m = cluster.client.generate(api.GenerateRequest("What is a router?", max_new_tokens=16), on_text)
        assert m["new_tokens"] == 16 and m["dropped"] > 0
        row = cluster.stats()["devices"][3]
        assert not row["usable"] and sum(row["failures"].values()) >= 1
        cluster.restart_device(3)
        answered = cluster.stats()["devices"][3]["answered"]
        with torch.no_grad():
            assert (cluster.wm.model(ids).logits - want).abs().max().item() <= 1e-4  # device 3 is back
        assert cluster.stats()["devices"][3]["answered"] > answered
        pids = cluster.pids()
    assert not any(alive(p) for p in pids)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_workers_are_stopped_when_the_body_raises(folder, error):
    pids = []
    with pytest.raises(error, match="boom"), Cluster(str(folder), devices=1) as cluster:
        pids = cluster.pids()
        assert pids and alive(pids[0])
        raise error("boom")
    assert pids and not any(alive(p) for p in pids)


def test_device_count_out_of_range_is_a_clear_error(folder):
    with pytest.raises(ConfigError, match="≥ 1"):
        Cluster(str(folder), devices=0)
    with pytest.raises(ConfigError, match=r"1\.\.8"), Cluster(str(folder), devices=9):
        pass


def test_cli_cluster_smoke_and_range_errors(folder, tmp_path):
    runner = CliRunner()
    args = ["cluster", "--model", str(folder), "--prompt", "what is a router", "--max-new-tokens", "4"]
    log = tmp_path / "m.jsonl"
    result = runner.invoke(app, [*args, "--devices", "2", "--metrics-log", str(log)])
    assert result.exit_code == 0, result.output
    assert "BS summary" in result.output and "127.0.0.1:" in result.output and "4 tokens" in result.output
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events.count("device_up") == 2 and "request" in events and events[-1] == "summary"
    for n, says in ((0, "≥ 1"), (9, "1..8")):
        bad = runner.invoke(app, [*args, "--devices", str(n)])
        assert bad.exit_code == 2 and says in bad.output


def test_a_worker_that_cannot_start_is_named_with_its_stderr(tmp_path):
    cluster = Cluster("unused", devices=1)
    cluster.bs_address = "127.0.0.1:1"
    d = DeviceProcess(0, [tmp_path / "missing.safetensors"], [], free_port(), tmp_path / "device0.log")
    cluster.devices = [d]
    cluster.launch(d)
    try:
        assert d.process is not None
        d.process.wait(timeout=60)
        with pytest.raises(ClusterError, match=r"device 0 \(127\.0\.0\.1:\d+\) exited(.|\n)*is not a file"):
            cluster.check_alive()
    finally:
        cluster.close()
    assert d.process is not None and not alive(d.process.pid)


def test_devices_are_warm_when_they_register(tmp_path):
    """An activation that is not silu/relu used to be imported from transformers on a device's first
    call (~2 s in a fresh process): every call of the first request missed its deadline and the
    cluster printed wrong text with exit 0. Devices now run each expert once before registering."""
    gelu = save_tiny_checkpoint("mixtral", tmp_path / "gelu", hidden_act="gelu_pytorch_tanh")
    log = tmp_path / "m.jsonl"
    args = ["cluster", "--model", str(gelu), "--devices", "2", "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, [*args, "--metrics-log", str(log)])
    assert result.exit_code == 0, result.output
    request = next(json.loads(line) for line in log.read_text().splitlines() if '"request"' in line)
    assert request["expert_calls"] > 0 and request["dropped"] == 0, request


def test_cluster_warns_about_a_degraded_answer_and_fails_a_lost_one(capsys):
    from wdmoe.cli.common import answer_was_served

    assert answer_was_served({"expert_calls": 100, "dropped": 0})
    assert "warning" not in capsys.readouterr().err
    assert answer_was_served({"expert_calls": 100, "dropped": 30})
    assert "30 of 100 expert calls (30 %) were dropped" in capsys.readouterr().err
    assert not answer_was_served({"expert_calls": 100, "dropped": 100})
    assert "every one of the 100 expert calls" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--port", "-5"], "--port must be in 0..65535"),
        (["--inject-delay-ms", "-5"], "--inject-delay-ms must be in 0..3600000"),
        (["--inject-delay-ms", "nan"], "--inject-delay-ms must be in 0..3600000"),
        (["--slot", "-1"], "--slot must be ≥ 0"),
        (["--data-port", "70000"], "--data-port must be in 0..65535"),
    ],
)
def test_device_flags_out_of_range_are_one_line_errors(folder, capsys, flags, says):
    from wdmoe.runtime.device import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--shards", str(folder / "config.json"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err and "usage:" not in err


def test_device_shards_that_are_missing_or_not_safetensors_are_named(tmp_path, capsys):
    from wdmoe.runtime.device import main

    text = tmp_path / "notes.txt"
    text.write_text("not a shard")
    for path, says in ((tmp_path / "L000_E000.safetensors", "is not a file"), (text, "notes.txt")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--shards", str(path), "--token", "t"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and says in err and "usage:" not in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_serve_bs_refuses_a_port_out_of_range():
    result = CliRunner().invoke(app, ["serve-bs", "--port", "70000", "--token", "t"])
    assert result.exit_code == 2 and "--port must be in 0..65535" in result.output


def test_the_data_plane_is_a_checked_setting_that_reaches_a_bs_process():
    from wdmoe.runtime.cluster import settings_args

    with pytest.raises(ConfigError, match="data_plane = 'pigeon' is not allowed; choose one of: stream"):
        RuntimeSettings(data_plane="pigeon")
    args = settings_args(RuntimeSettings(data_plane="grpc"))
    assert args[args.index("--data-plane") + 1] == "grpc"
    for cmd in (["serve-bs", "--token", "t"], ["cluster"]):
        result = CliRunner().invoke(app, [*cmd, "--data-plane", "pigeon"])
        assert result.exit_code == 2 and "data_plane" in result.output, result.output
