"""Expert shards + BS part reassemble into the original model."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tiny import FAMILIES, tiny_model
from wdmoe.models.experts import run_expert
from wdmoe.models.split import BS_FILE, load_bs_part, load_expert_shard, load_shards_into, split_model


@pytest.mark.parametrize("family", FAMILIES)
def test_reassembled_model_equals_original(tmp_path, family):
    model = tiny_model(family)
    shards = split_model(model, tmp_path)
    assert len(shards) == 2 * 8 and (tmp_path / BS_FILE).is_file()
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path), dtype=torch.float32).eval()
    assert load_bs_part(fresh, tmp_path) == []
    load_shards_into(fresh, shards)
    ids = torch.randint(0, 128, (2, 9))
    assert (fresh(ids).logits - model(ids).logits).abs().max() <= 1e-6


def test_bs_part_holds_no_expert_and_shard_runs_alone(tmp_path):
    model = tiny_model("mixtral")
    split_model(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / BS_FILE), "pt") as f:
        names = list(f.keys())
    assert names and not any("experts" in n for n in names)
    assert any(n.endswith("gate.weight") for n in names)  # routers stay at the BS
    shard, w = load_expert_shard(tmp_path / "L001_E005.safetensors")
    assert (shard.layer, shard.expert) == (1, 5)
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(3, 32)
    ref = experts(x, torch.full((3, 1), 5), torch.ones(3, 1))
    assert torch.allclose(run_expert(w, x), ref, atol=1e-6)


def test_tied_embeddings_survive_the_split(tmp_path):
    model = tiny_model("mixtral")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    shards = split_model(model, tmp_path)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path), dtype=torch.float32).eval()
    assert load_bs_part(fresh, tmp_path) == []
    load_shards_into(fresh, shards)
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert (fresh(ids).logits - model(ids).logits).abs().max() <= 1e-6
