"""`wdmoe generate` on tiny local checkpoints, and a clear error for each bad input."""

import json

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
