"""``Cluster`` and ``wdmoe cluster``: N device worker processes on loopback, always torn down."""

import pytest
import torch
from typer.testing import CliRunner

from tiny import save_tiny_checkpoint
from wdmoe.cli import app
from wdmoe.errors import ConfigError
from wdmoe.models.loading import load_checkpoint
from wdmoe.runtime.cluster import Cluster, ClusterError, DeviceProcess, alive, free_port, round_robin


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral")


def test_round_robin_places_expert_e_on_device_e_mod_n():
    keys = [(layer, e) for layer in range(2) for e in range(8)]
    placed = round_robin(keys, 3)
    assert sorted(k for ks in placed for k in ks) == keys
    assert all(e % 3 == u for u, ks in enumerate(placed) for (_, e) in ks)


def test_cluster_matches_in_process_survives_a_killed_device_and_uses_it_again(folder):
    ref_model, _ = load_checkpoint(str(folder))
    ids = torch.randint(4, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        ref_logits = ref_model(ids).logits
        ref_tokens = ref_model.generate(ids, **greedy)
    with Cluster(str(folder), devices=2, timeout_s=5) as cluster:
        pids = cluster.pids()
        assert len(pids) == 2 and all(alive(p) for p in pids)
        model = cluster.wm.model
        with torch.no_grad():
            assert (model(ids).logits - ref_logits).abs().max() <= 1e-4
            assert torch.equal(model.generate(ids, **greedy), ref_tokens)
            assert cluster.dispatcher.failures == []
            cluster.kill_device(1)
            logits = model(ids).logits  # the next forward completes without device 1
        assert torch.isfinite(logits).all() and (logits - ref_logits).abs().max() > 1e-4
        failed = {(f.layer, f.expert) for f in cluster.dispatcher.failures}
        assert failed and failed <= set(cluster.devices[1].hosted)
        rows = cluster.summary()
        assert [r.experts for r in rows] == [8, 8] and rows[1].failures == len(cluster.dispatcher.failures)
        assert rows[0].failures == 0 and rows[0].calls > 0 and rows[0].mean_compute_ms > 0
        cluster.restart_device(1)
        before = len(cluster.dispatcher.failures)
        with torch.no_grad():
            assert (model(ids).logits - ref_logits).abs().max() <= 1e-4  # device 1 is used again
        assert len(cluster.dispatcher.failures) == before
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


def test_cli_cluster_smoke_and_range_errors(folder):
    runner = CliRunner()
    args = ["cluster", "--model", str(folder), "--prompt", "what is a router", "--max-new-tokens", "4"]
    result = runner.invoke(app, [*args, "--devices", "2"])
    assert result.exit_code == 0, result.output
    assert "mean compute ms" in result.output and "127.0.0.1:" in result.output
    for n, says in ((0, "≥ 1"), (9, "1..8")):
        bad = runner.invoke(app, [*args, "--devices", str(n)])
        assert bad.exit_code == 2 and says in bad.output


def test_a_worker_that_cannot_start_is_named_with_its_stderr(tmp_path):
    cluster = Cluster("unused", devices=1)
    d = DeviceProcess(0, [tmp_path / "missing.safetensors"], [], free_port(), tmp_path / "device0.log")
    cluster.launch(d)
    try:
        with pytest.raises(ClusterError, match=r"device 0 \(127\.0\.0\.1:\d+\) exited(.|\n)*does not exist"):
            cluster.wait_ready(d)
    finally:
        cluster.devices = [d]
        cluster.close()
    assert d.process is not None and not alive(d.process.pid)
