"""The in-process simulation: paired replay, WDMoE saves latency, minmax never loses to equal."""

import copy

import numpy as np
import pytest
import torch

from tiny import TINY, tiny_model
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError
from wdmoe.models.install import install
from wdmoe.policies import make_policy
from wdmoe.simulate import SimSettings, Simulation


def run(policy, allocator="equal", seed=3, steps=6):
    model = tiny_model("mixtral")
    wm = install(model, policy)
    sim = Simulation(wm, load_scenario("paper", TINY), SimSettings(allocator=allocator, seed=seed))
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with sim.attached():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )
    return sim.records


def test_prefill_then_decode_steps_are_recorded_and_time_advances():
    records = run(make_policy("topk"))
    assert [r.phase for r in records] == ["prefill"] + ["decode"] * 5
    assert records[0].new_tokens == 9 and all(r.new_tokens == 1 for r in records[1:])
    assert records[0].expert_tokens.shape == (2, 8) and records[0].expert_tokens.sum() == 2 * 9 * 2
    assert records[0].downlink_s.shape == (2, 8)
    starts = [r.start_s for r in records]
    assert all(
        b == pytest.approx(a + r.total_s) for a, b, r in zip(starts, starts[1:], records, strict=False)
    )
    assert all(r.retained_mass == pytest.approx(1.0) for r in records)


def test_same_seed_replays_identical_records():
    a, b = run(make_policy("wdmoe", theta=0.3)), run(make_policy("wdmoe", theta=0.3))
    for x, y in zip(a, b, strict=True):
        assert x.start_s == y.start_s and np.array_equal(x.expert_tokens, y.expert_tokens)
        assert np.array_equal(x.waiting_s, y.waiting_s)


def test_wdmoe_drops_experts_and_cuts_latency_on_the_same_trace():
    top = run(make_policy("topk"))
    wd = run(make_policy("wdmoe", theta=0.45))
    assert sum(r.dropped_tokens.sum() for r in wd) > 0
    assert sum(r.total_s for r in wd) < sum(r.total_s for r in top)
    assert all(r.retained_mass <= 1.0 for r in wd)


def test_minmax_waits_no_longer_than_equal_for_the_same_selection():
    eq, mm = run(make_policy("topk"), "equal"), run(make_policy("topk"), "minmax")
    for a, b in zip(eq, mm, strict=True):
        assert np.array_equal(a.expert_tokens, b.expert_tokens)
    assert np.all(mm[0].waiting_s <= eq[0].waiting_s * (1 + 1e-9))


def test_scenario_must_describe_the_model():
    wm = install(copy.deepcopy(tiny_model("mixtral")))
    with pytest.raises(ConfigError, match="2 × 8; use model=<preset>"):
        Simulation(wm, load_scenario("paper"))


def test_split_rows_accounts_each_unpadded_row_as_the_request_it_would_be_alone():
    model = tiny_model("mixtral")
    wm = install(model, make_policy("topk"))
    cfg = load_scenario("paper", [*TINY, "channel.fading=none"])  # a channel constant in time
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 128, (n,), generator=gen) for n in (7, 4, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for r, seq in enumerate(rows):
        ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
    batched = Simulation(wm, cfg, SimSettings(seed=2, split_rows=True))
    with batched.attached(), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    alone = Simulation(wm, cfg, SimSettings(seed=2))
    with alone.attached(), torch.no_grad():
        for seq in rows:
            alone.new_request()
            model(input_ids=seq[None], use_cache=False)
    assert [r.phase for r in batched.records] == ["prefill"] * 3
    assert [r.new_tokens for r in batched.records] == [7, 4, 5]
    for b, a in zip(batched.records, alone.records, strict=True):
        np.testing.assert_array_equal(b.expert_tokens, a.expert_tokens)  # padding is not routed work
        assert b.total_s == pytest.approx(a.total_s)
        assert b.device_tokens.sum() == b.expert_tokens.sum() and b.snr_db_dl.shape == (8,)
    # the rows arrive together and travel as one batch: the clock moves on by the batch's time,
    # more than any row's alone (bigger messages, every row's BS compute), less than their sum
    assert [r.start_s for r in batched.records] == [0.0] * 3
    alone_s = [r.total_s for r in alone.records]
    assert max(alone_s) < batched.time_s < sum(alone_s)


def test_split_rows_prices_every_row_on_the_channel_its_batch_met():
    model = tiny_model("mixtral")
    wm = install(model, make_policy("wdmoe", theta=0.3))
    cfg = load_scenario("paper", TINY)
    ids = torch.randint(1, 128, (6, 5), generator=torch.Generator().manual_seed(4))
    sim = Simulation(wm, cfg, SimSettings(seed=5, allocator="minmax", split_rows=True))
    with sim.attached(), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    first = sim.records[0]
    for r in sim.records:
        np.testing.assert_array_equal(r.snr_db_dl, first.snr_db_dl)  # one channel snapshot


def test_shared_contexts_count_each_context_in_full_in_every_request():
    """A context run once for two continuations (the scorer's two passes) is accounted as the two
    (context + continuation) requests, each priced as it would be alone (a channel constant in
    time), starting when the context pass did."""
    from wdmoe.eval.multiple_choice import score_on_shared_contexts

    model = tiny_model("mixtral")
    wm = install(model, make_policy("topk"))
    cfg = load_scenario("paper", [*TINY, "channel.fading=none"])
    gen = torch.Generator().manual_seed(3)
    ctx = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (6, 4)]
    conts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (2, 3, 1)]
    parents = [0, 0, 1]
    shared = Simulation(wm, cfg, SimSettings(seed=2, split_rows=True))
    with shared.attached(), torch.no_grad():
        score_on_shared_contexts(model, ctx, conts, parents, pad_id=0)
    alone = Simulation(wm, cfg, SimSettings(seed=2))
    with alone.attached(), torch.no_grad():
        for c, p in zip(conts, parents, strict=True):
            alone.new_request()
            model(input_ids=torch.tensor([ctx[p] + c]), use_cache=False)
    assert [r.new_tokens for r in shared.records] == [8, 9, 5]
    assert [r.start_s for r in shared.records] == [0.0] * 3
    for s, a in zip(shared.records, alone.records, strict=True):
        np.testing.assert_array_equal(s.expert_tokens, a.expert_tokens)  # padding is not work
        assert s.total_s == pytest.approx(a.total_s)
    assert shared.contexts is None and shared.time_s > 0


def test_a_continuation_pass_decides_on_the_channel_its_context_pass_ran_on():
    """Each (context + continuation) is one request priced on the context pass's channel, so the
    policy must see, layer by layer, the very snapshots the context pass ran on — not the later
    channel of the continuation pass's own clock (the channel moves between the passes)."""
    from wdmoe.eval.multiple_choice import score_on_shared_contexts
    from wdmoe.policies.base import Stateless

    views: list[object] = []

    class Spy(Stateless):
        name = "spy"

        def select(self, route, view=None):
            views.append(view)
            return make_policy("topk").select(route)

    model = tiny_model("mixtral")
    wm = install(model, Spy())
    cfg = load_scenario("paper", [*TINY, "channel.coherence_s=1e-6"])  # a new block every layer
    sim = Simulation(wm, cfg, SimSettings(seed=2))
    gen = torch.Generator().manual_seed(3)
    ctx = [torch.randint(1, 128, (6,), generator=gen).tolist()]
    conts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (2, 3)]
    with sim.attached(), torch.no_grad():
        score_on_shared_contexts(model, ctx, conts, [0, 0], pad_id=0)
    layers = len(wm.blocks)
    assert len(views) == 2 * layers
    assert all(views[layers + i] is views[i] for i in range(layers))
    later = sim.cell.snapshot(sim.time_s).view  # the clock moved on: the channel did too
    assert not np.array_equal(later.channel.dl.gain, views[-1].channel.dl.gain)
