"""The latency study's rows for the model presets (configs/models): router scores of an 8-expert
model widened to each preset's experts, priced at its dimensions."""

import torch

from wdmoe.config import load_scenario
from wdmoe.studies.latency_study import STUDY_PRESETS, render_presets, run_presets, wider_logits


def samples(count: int = 2, layers: int = 4, tokens: int = 6) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(tokens, 8, generator=gen) for _ in range(layers)] for _ in range(count)]


def test_every_preset_loads_with_its_dimensions():
    for name in STUDY_PRESETS:
        m = load_scenario("paper", [f"model={name}"]).model
        assert m.name == name and m.num_experts % 8 == 0 and 1 <= m.top_k <= m.num_experts


def test_wider_logits_are_sums_of_consecutive_layers_at_the_digits():
    sample = samples(count=1)[0]
    assert wider_logits(sample, 5, 8) is sample[1]
    wide = wider_logits(sample, 3, 128)  # 8·8·2: layers 3, 0, 1
    e = 8 * 8 * 1 + 8 * 5 + 2  # digits (2, 5, 1)
    assert torch.allclose(wide[:, e], sample[3][:, 2] + sample[0][:, 5] + sample[1][:, 1])


def test_preset_rows_have_topk_and_each_theta_per_allocator():
    presets = ("deepseek-v3", "gpt-oss-20b", "llama4-scout-17b-16e")
    res = run_presets(samples(), "paper", [], presets, thetas=(0.2,), allocators=("equal",), seed=0)
    assert list(res) == list(presets)
    for _, rows in res.values():
        assert [r.theta for r in rows] == [0.0, 0.2] and rows[1].mean_s <= rows[0].mean_s
    assert res["llama4-scout-17b-16e"][1][1].drop_rate == 0.0  # top-1: nothing to drop
    table = render_presets(res)
    assert (
        table.count("\n") == 1 + len(presets)
        and "| deepseek-v3 | 7168 | 2048 | 58 | 256 | 8 | equal |" in table
    )
