"""The MoE families added for issue 13 (DeepSeek-V2/V3, GPT-OSS, Qwen3-Next, GLM-4.5, ERNIE-4.5,
Granite(-Shared), PhiMoE, Llama 4 text, FlexOlmo): wdmoe with `topk` equals plain transformers, the
router semantics each policy sees are the model's, and a split model served by device workers on
loopback equals the in-process one."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lab import Lab
from test_install import decode_logits
from tiny import NEW_FAMILIES, tiny_model, tiny_tokenizer
from wdmoe.errors import ConfigError, UnsupportedModelError
from wdmoe.generate import generate
from wdmoe.models.adapters import adapter_for, moe_blocks
from wdmoe.models.experts import run_expert, run_fused
from wdmoe.models.install import install
from wdmoe.models.split import load_bs_part, load_expert_shard, load_shards_into, split_model
from wdmoe.policies.base import mask_selection
from wdmoe.runtime.cluster import shard_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5
IDS = torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(1))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 9 and 5 tokens, left-padded with id 3, and their attention mask."""
    ids = IDS[:, :9].clone()
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 3, 0
    return ids, mask


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_topk_equals_transformers_prefill_cached_decode_and_padded_batch(family):
    ref = tiny_model(family)
    model = copy.deepcopy(ref)
    wm = install(model)
    dense = len(model.model.layers) - len(wm.blocks)
    assert wm.num_experts == 8 and dense == int(family in DENSE_FIRST)
    assert (model(IDS).logits - ref(IDS).logits).abs().max() <= TOL
    assert (decode_logits(model, IDS, 4) - decode_logits(ref, IDS, 4)).abs().max() <= TOL
    ids, mask = padded_batch()
    got = model(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() <= TOL


DENSE_FIRST = {"deepseek_v2", "deepseek_v3", "glm4_moe", "qwen3_next", "ernie4_5_moe", "llama4_text"}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_text_through_generate_equals_transformers(family):
    ref, tok = tiny_model(family), tiny_tokenizer()
    wm = install(copy.deepcopy(ref))
    prompt = "what is the router of the base station"
    got = generate(wm, tok, prompt, max_new_tokens=8, chat=False)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = ref.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        top_k=None,
    )
    assert got.text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert got.new_tokens == out.shape[1] - ids.shape[1]


# How each family's combine treats a dropped candidate, as its own router would (module doc of
# wdmoe.models.adapters): True = the survivors are rescaled to the token's total weight.
RENORMALIZES = {
    "deepseek_v2": False,  # softmax × scale, never renormalised
    "deepseek_v3": True,  # norm_topk_prob
    "glm4_moe": True,  # norm_topk_prob
    "gpt_oss": True,  # softmax over the top-k logits
    "qwen3_next": True,  # norm_topk_prob
    "ernie4_5_moe": True,  # divides by the top-k sum
    "granitemoe": True,  # softmax over the top-k logits
    "granitemoeshared": True,
    "phimoe": False,  # sparsemixer: one masked softmax per slot
    "llama4_text": False,  # sigmoid scores scale the input
    "flex_olmo": False,  # norm_topk_prob=False in the tiny config
}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_route_has_the_models_candidates_weights_and_renormalisation(family):
    ref = tiny_model(family)
    wm = install(copy.deepcopy(ref))
    wm.recorder.enabled = True
    wm.model(IDS)
    trace = wm.recorder.clear()[0]
    block = wm.blocks[trace.layer]
    assert block.renormalize is RENORMALIZES[family]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    route = block.route(x)
    imp = route.importance
    assert torch.all(imp[:, :-1] >= imp[:, 1:]) and torch.all(imp.sum(-1) <= 1 + 1e-6)  # best first
    own = block.spec.read_router(block.router_module, block.router_module(x))
    for t in range(5):  # the same (candidate, weight) pairs as the model's own router, reordered
        mine = dict(zip(route.candidates[t].tolist(), route.weights[t].tolist(), strict=True))
        theirs = dict(zip(own[2][t].tolist(), own[1][t].tolist(), strict=True))
        assert mine == theirs


def test_gpt_oss_dropping_a_candidate_is_a_softmax_over_the_survivors():
    wm = install(tiny_model("gpt_oss"))
    route = wm.blocks[0].route(torch.randn(6, 32, generator=torch.Generator().manual_seed(3)))
    keep = torch.tensor([True, False]).expand(6, 2)
    sel = mask_selection(route, keep)
    assert torch.allclose(sel.weights[:, 0], torch.ones(6))  # softmax over one logit
    wm3 = install(tiny_model("deepseek_v3"))
    route = wm3.blocks[1].route(torch.randn(6, 32, generator=torch.Generator().manual_seed(3)))
    sel = mask_selection(route, torch.tensor([True, True, False]).expand(6, 3))
    scale = wm3.model.config.routed_scaling_factor
    assert torch.allclose(sel.weights.sum(-1), torch.full((6,), scale))  # renormalised, then × scale


def test_phimoe_top_k_is_fixed_and_unsupported_types_say_why():
    wm = install(tiny_model("phimoe"))
    with pytest.raises(ConfigError, match="always 2"):
        wm.set_top_k(3)
    for model_type, why in (("jetmoe", "attention is itself a mixture"), ("llama4", "text model alone")):
        fake = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
        with pytest.raises(UnsupportedModelError, match=why):
            adapter_for(fake)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Every new family split into a BS part and shards: {family: (model, folder, {key: path})}."""
    out = {}
    for family in NEW_FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        model = tiny_model(family)
        out[family] = (model, folder, {shard_key(p): p for p in split_model(model, folder)})
    return out


def experts_module_output(experts, layout, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a fused module run by the module's own forward (weight 1)."""
    if not hasattr(experts, "_apply_gate"):  # Llama 4: the module runs every expert on its rows
        rows = torch.zeros(experts.num_experts, *x.shape)
        rows[e] = x
        return experts(rows.reshape(-1, x.shape[-1])).reshape(rows.shape)[e]
    return experts(x, torch.full((len(x), 1), e), torch.ones(len(x), 1))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_split_shards_run_like_the_model_and_reassemble_it(splits, family):
    model, folder, by_key = splits[family]
    adapter = adapter_for(model)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    blocks = dict(moe_blocks(model))
    for (layer, e), path in list(by_key.items())[::5]:
        _, w = load_expert_shard(path)
        experts = blocks[layer].experts
        layout = adapter.layout(experts)
        want = experts_module_output(experts, layout, e, x)
        assert (run_expert(w, x) - want).abs().max() <= 1e-6
        assert (run_fused(experts, layout, e, x) - want).abs().max() <= 1e-6
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    assert load_bs_part(fresh, folder) == []
    load_shards_into(fresh, by_key.values())
    assert (fresh(IDS).logits - model(IDS).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_distributed_equals_in_process_with_device_workers(splits, family):
    lab = Lab(family, splits[family][2], devices=3)
    try:
        got, want = lab.wm.model(IDS).logits, lab.ref.model(IDS).logits
        assert (got - want).abs().max().item() <= 1e-4
        rows = lab.bs.summary()["devices"]
        assert all(r["calls"] > 0 and not r["failures"] for r in rows), rows
        block = next(iter(lab.wm.blocks.values()))
        assert block.experts.down_proj.numel() == 0  # the BS holds no expert weights
    finally:
        lab.close()
