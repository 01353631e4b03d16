"""MoEfication on a tiny dense Llama: balanced partitions, exact dense equivalence, router fitting."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from wdmoe.models.default import moefy
from wdmoe.models.install import install
from wdmoe.models.moefy import balanced_kmeans, expert_output_norms, fit_ridge, partition_layer


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_balanced_kmeans_gives_equal_clusters_and_is_deterministic():
    pts = np.random.default_rng(0).normal(size=(96, 5))
    a = balanced_kmeans(pts, 8, np.random.default_rng(1))
    b = balanced_kmeans(pts, 8, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert np.bincount(a, minlength=8).tolist() == [12] * 8


def test_balanced_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 3)) * 20
    pts = np.concatenate([c + rng.normal(size=(10, 3)) for c in centres])
    labels = balanced_kmeans(pts, 4, np.random.default_rng(2))
    for c in range(4):
        assert len(set(labels[c * 10 : (c + 1) * 10])) == 1


def test_moefied_with_all_experts_equals_dense_and_drops_change_it():
    dense = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    ref = dense(ids).logits
    orders = [partition_layer(layer.mlp.gate_proj.weight, 8, i) for i, layer in enumerate(dense.model.layers)]
    moefy(dense, orders, num_experts=8, top_k=8)
    assert (dense(ids).logits - ref).abs().max() <= 1e-5
    wm = install(dense)
    assert wm.adapter.name == "moefied" and not wm.blocks[0].renormalize
    assert (dense(ids).logits - ref).abs().max() <= 1e-5
    wm.set_top_k(4)
    assert (dense(ids).logits - ref).abs().max() > 1e-3


def test_expert_norms_match_a_loop_and_ridge_recovers_a_linear_map():
    dense = tiny_llama()
    moefy(dense, [torch.arange(64)] * 2, num_experts=4, top_k=4)
    experts = dense.model.layers[0].mlp.experts
    x = torch.randn(5, 32)
    loop = torch.stack(
        [
            torch.stack(
                [
                    experts.expert(e).down
                    @ (
                        torch.nn.functional.silu(experts.expert(e).gate_up[:16] @ x[t])
                        * (experts.expert(e).gate_up[16:] @ x[t])
                    )
                    for e in range(4)
                ]
            ).norm(dim=-1)
            for t in range(5)
        ]
    )
    assert torch.allclose(expert_output_norms(experts, x), loop, atol=1e-5)
    w_true, b_true = torch.randn(3, 32), torch.randn(3)
    xs = torch.randn(500, 32)
    w, b = fit_ridge(xs, xs @ w_true.T + b_true, l2=0.0)
    assert torch.allclose(w, w_true, atol=1e-4) and torch.allclose(b, b_true, atol=1e-4)
