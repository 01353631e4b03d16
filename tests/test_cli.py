"""`wdmoe generate` on tiny local checkpoints, and a clear error for each bad input; the demo's
per-device table on made-up records."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from wdmoe.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_streams_text_and_reports_status(ckpt):
    res = run("generate", "hello what is the router", "--model", ckpt, "--max-new-tokens", 6)
    assert res.exit_code == 0, res.output
    assert "mixtral · 2 MoE layers · 8 experts · top-2 · policy topk" in res.stderr
    assert "6 new tok" in res.stderr and "2.00 experts/token/layer" in res.stderr
    assert len(res.stdout.split()) >= 1  # tiny random model: words, but some


def test_generate_sampling_is_seeded_and_top_k_applies(ckpt):
    args = (
        "generate",
        "once upon a time",
        "--model",
        ckpt,
        "--no-chat",
        "--temperature",
        "1.0",
        "--max-new-tokens",
        8,
    )
    a, b = run(*args, "--seed", 5), run(*args, "--seed", 5)
    assert a.exit_code == 0 and a.stdout == b.stdout
    k3 = run("generate", "hello", "--model", ckpt, "--top-k", 3, "--max-new-tokens", 2)
    assert k3.exit_code == 0 and "top-3" in k3.stderr and "3.00 experts/token/layer" in k3.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "hi", "--model", "/no/such/model"), "checkpoint '/no/such/model' not found"),
        (("generate", "   ", "--model", "{ckpt}"), "the prompt is empty"),
        (
            ("generate", "hello " * 200, "--model", "{ckpt}", "--no-chat"),
            "exceeds the model's context of 128 tokens",
        ),
        (("generate", "hi", "--model", "{ckpt}", "--policy", "fastest"), "unknown policy 'fastest'"),
        (("generate", "hi", "--model", "{ckpt}", "--top-k", 9), "top_k must be in 1..8"),
        (("generate", "hi", "--model", "{ckpt}", "--max-new-tokens", 0), "--max-new-tokens must be ≥ 1"),
    ],
)
def test_bad_inputs_give_clear_errors(ckpt, args, message):
    res = run(*(str(a).format(ckpt=ckpt) for a in args))
    assert res.exit_code == 2
    assert message in " ".join(res.stderr.split())
    assert "Traceback" not in res.output


def test_unsupported_checkpoint_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    res = run("generate", "hi", "--model", tmp_path)
    assert res.exit_code == 2
    assert "model type 'llama' is not a supported MoE" in " ".join(res.stderr.split())


def test_folder_without_config_is_named(tmp_path):
    res = run("generate", "hi", "--model", tmp_path)
    assert res.exit_code == 2 and "has no config.json" in res.stderr


# --- wdmoe demo: the per-device table -----------------------------------------------------------


def step(phase, down, lost, late, layers=2, experts=8):
    """A made-up StepRecord: link_down / cut_down / cut_late [L, U] as given, one token per expert,
    11 ms per layer."""
    from wdmoe.simulate import StepRecord

    devices = len(down[0])
    per_device, per_expert = np.zeros((layers, devices)), np.zeros((layers, experts))
    names = ("device_tokens", "device_dropped", "downlink_s", "compute_s", "uplink_s", "skipped_tokens")
    zero = dict.fromkeys(names, per_device)
    return StepRecord(
        phase=phase,
        start_s=0.0,
        new_tokens=1,
        expert_tokens=per_expert + 1,
        dropped_tokens=per_expert,
        retained_mass=1.0,
        snr_db_dl=np.zeros(devices),
        snr_db_ul=np.zeros(devices),
        waiting_s=np.full(layers, 0.01),
        bs_s=np.full(layers, 0.001),
        head_s=0.0,
        link_down=np.asarray(down, dtype=bool),
        cut_late=np.asarray(late, dtype=bool),
        cut_down=np.asarray(lost, dtype=bool),
        **zero,
    )


def test_demo_device_table_shows_each_links_outage(capsys, monkeypatch):
    from wdmoe.cli.demo import print_demo_summary
    from wdmoe.config import load_scenario
    from wdmoe.studies.demo import summarise

    cfg = load_scenario("paper", ["model=smollm2-moe8"])
    u = cfg.cell.num_devices
    up, down = [0] * u, [1] + [0] * (u - 1)
    late = [0, 1] + [0] * (u - 2)
    records = [
        step("prefill", [down, up], [down, up], [up, late]),
        step("decode", [up, up], [up, up], [up, up]),
    ]
    runs = [summarise("topk", ["a"], records, 2.0), summarise("wdmoe-0.1", ["b"], records[:1], 1.5)]
    assert runs[0].down_per_device[:2] == (0.25, 0.0) and runs[0].lost_per_device[:2] == (1, 0)
    assert runs[0].late_per_device[:2] == (0, 1) and runs[1].down_per_device[0] == 0.5
    monkeypatch.setenv("COLUMNS", "300")
    print_demo_summary(runs, cfg, 0)
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "topk outage" in out and "wdmoe-0.1 outage" in out and "calls lost to outage / cut late" in flat
    device0 = next(line for line in out.splitlines() if line.strip(" │").startswith("0 "))
    assert "25.0% · 1/0" in device0 and "50.0% · 1/0" in device0
    device1 = next(line for line in out.splitlines() if line.strip(" │").startswith("1 "))
    assert "0.0% · 0/1" in device1
