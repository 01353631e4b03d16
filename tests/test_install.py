"""wdmoe installed with `topk` reproduces the unmodified transformers model exactly."""

import copy

import pytest
import torch

from tiny import FAMILIES, tiny_model
from wdmoe.errors import ConfigError, UnsupportedModelError
from wdmoe.models.install import install

TOL = 1e-5


def decode_logits(model: torch.nn.Module, ids: torch.Tensor, n_decode: int) -> torch.Tensor:
    """Prefill all but the last n_decode tokens, then feed them one by one through the KV cache."""
    out = model(ids[:, :-n_decode], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(ids.shape[1] - n_decode, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_equals_transformers_prefill_and_cached_decode(family):
    ref = tiny_model(family)
    model = copy.deepcopy(ref)
    wm = install(model)
    assert wm.adapter.name == family and len(wm.blocks) == 2
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    assert (model(ids).logits - ref(ids).logits).abs().max() <= TOL
    assert (decode_logits(model, ids, 4) - decode_logits(ref, ids, 4)).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_router_logits_still_recorded_by_transformers(family):
    ref, model = tiny_model(family), tiny_model(family)
    install(model)
    ids = torch.randint(0, 128, (1, 7))
    a = ref(ids, output_router_logits=True).router_logits
    b = model(ids, output_router_logits=True).router_logits
    assert len(a) == len(b) == 2
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_traces_expose_scores_candidates_and_selection():
    model = tiny_model("mixtral")
    wm = install(model)
    wm.recorder.enabled = True
    model(torch.randint(0, 128, (2, 5)))
    traces = wm.recorder.clear()
    assert [t.layer for t in traces] == [0, 1]
    for t in traces:
        assert t.logits.shape == (10, 8) and t.candidates.shape == (10, 2) and t.keep.all()
        assert torch.equal(t.candidates, t.logits.topk(2, dim=-1).indices)
        assert int(t.tokens_per_expert().sum()) == 20


def test_set_top_k_changes_candidates_and_is_validated():
    model = tiny_model("olmoe")
    wm = install(model)
    wm.set_top_k(3)
    wm.recorder.enabled = True
    model(torch.randint(0, 128, (1, 4)))
    assert wm.recorder.traces[0].candidates.shape == (4, 3)
    with pytest.raises(ConfigError, match=r"top_k must be in 1\.\.8"):
        wm.set_top_k(9)


def test_install_twice_and_dense_models_are_refused():
    model = tiny_model("mixtral")
    install(model)
    with pytest.raises(ConfigError, match="already installed"):
        install(model)
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(UnsupportedModelError, match=r"supported: deepseek_v2, .*mixtral, olmoe"):
        install(dense)
