"""Link outage and call deadlines: the core rule on hand-computed cases, and what the simulator
does with it (perfect CSI drops nothing for lateness, stale CSI does; modes; a moving channel)."""

import math

import numpy as np
import pytest
import torch

from tiny import TINY, tiny_model
from wdmoe.channel.state import ChannelState, Link
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError
from wdmoe.latency.deadline import LOWEST_CQI_SE_BPS_PER_HZ, DeadlineRule, link_up, settle
from wdmoe.models.install import install
from wdmoe.policies import make_policy
from wdmoe.simulate import SimSettings, Simulation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def channel(snr_at_share: list[float], bandwidth_hz: float = 1e6) -> ChannelState:
    """U devices whose SNR at the equal share B/U is ``snr_at_share`` in both directions."""
    u = len(snr_at_share)
    share = bandwidth_hz / u
    snr = np.asarray(snr_at_share, dtype=float)
    z = np.zeros(u)
    dl = Link(gain=snr, snr_hz=snr * bandwidth_hz, power_band_hz=bandwidth_hz)  # PSD over the band
    ul = Link(gain=snr, snr_hz=snr * share, power_band_hz=None)  # its power on its share
    return ChannelState(0.0, np.zeros((u, 2)), z + 10, np.ones(u, bool), z, z, dl, ul, bandwidth_hz)


def test_a_link_is_down_below_the_lowest_cqi():
    # η = log2(1 + SNR) = 0.1523 at SNR = 2^0.1523 − 1 = 0.11134 (−9.53 dB)
    edge = 2**LOWEST_CQI_SE_BPS_PER_HZ - 1
    assert edge == pytest.approx(0.11134, abs=1e-5)
    up = link_up(channel([edge * 0.99, edge * 1.01, 10.0, 1e-6]), LOWEST_CQI_SE_BPS_PER_HZ)
    assert up.tolist() == [False, True, True, False]
    assert link_up(channel([1e-6]), 0.0).tolist() == [True]  # η_min = 0: outage off


def test_call_budgets_follow_the_runtime_rule():
    rule = DeadlineRule(slack=3.0, grace_s=0.25, max_wait_s=30.0)
    # 3·0.1 + 0.25 = 0.55; 3·10 + 0.25 > 30: capped; an unpriceable t̂: max_wait
    np.testing.assert_allclose(rule.budgets_s([0.1, 10.0, math.inf]), [0.55, 30.0, 30.0])
    np.testing.assert_allclose(rule.budgets_s([0.1], time_scale=0.5), [0.4])  # 0.5·3·0.1 + 0.25
    np.testing.assert_allclose(DeadlineRule(mode="wait").budgets_s([0.1, 1.0]), [30.0, 30.0])
    with pytest.raises(ConfigError, match="mode = 'late' is not allowed"):
        DeadlineRule(mode="late")
    with pytest.raises(ConfigError, match="slack"):
        DeadlineRule(slack=0.5)


def test_settling_a_layer_by_hand():
    true = [0.1, 0.5, 0.2, 0.9]
    budget = [0.3, 0.3, 0.3, 0.3]
    tokens = [1, 2, 3, 0]  # device 3 has no work: never waited for
    up = [True, True, False, False]
    s = settle(true, budget, tokens, up)
    assert s.waited_s.tolist() == [0.1, 0.3, 0.3, 0.0]  # on time; cut late; lost to outage; idle
    assert s.late.tolist() == [False, True, False, False]
    assert s.down.tolist() == [False, False, True, False]
    assert float(s.layer_s) == 0.3 and s.cut.tolist() == [False, True, True, False]
    # a request priced after its batch is cut with the batch, whatever its own times
    as_batch = settle(true, budget, tokens, up, late=[True, False, False, False], down=[False] * 4)
    assert as_batch.waited_s.tolist() == [0.3, 0.5, 0.2, 0.0]
    assert as_batch.late.tolist() == [True, False, False, False]


def run(settings: SimSettings, overrides=(), policy="topk", steps=4):
    model = tiny_model("mixtral")
    wm = install(model, make_policy(policy))
    cfg = load_scenario("paper", [*TINY, "cell.bandwidth_hz=2e5", *overrides])
    sim = Simulation(wm, cfg, settings)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with sim.attached():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )
    return sim


def test_perfect_csi_cuts_nothing_for_lateness_stale_csi_does():
    perfect = run(SimSettings(seed=1))
    assert not any(r.cut_late.any() for r in perfect.records)
    stale = run(SimSettings(seed=1, csi_delay_blocks=200, deadline=DeadlineRule(slack=1.0, grace_s=0.0)))
    assert any(r.cut_late.any() for r in stale.records)
    for r in stale.records:  # a cut call costs exactly its budget: no layer waits past it
        assert (r.waiting_s <= (r.downlink_s + r.compute_s + r.uplink_s).max(-1) + 1e-12).all()


def test_outage_skips_the_experts_the_bs_sees_down_and_counts_them():
    # a far cell edge with a tiny band: some links fall below the lowest CQI
    edge = ["cell.r_min_m=800", "cell.r_max_m=1500", "cell.bandwidth_hz=2e6"]
    sim = run(SimSettings(seed=2), edge)
    down = np.concatenate([r.link_down for r in sim.records])
    assert 0 < down.mean() < 1
    skipped = sum(r.skipped_tokens.sum() for r in sim.records)
    assert skipped > 0
    for r in sim.records:  # nothing was sent to a device whose link the BS saw down
        assert (r.device_tokens[r.skipped_tokens > 0] == 0).all()
        assert r.dropped_tokens.sum() >= r.skipped_tokens.sum()
    off = run(SimSettings(seed=2), [*edge, "cell.min_se_bps_per_hz=0"])
    assert not any(r.link_down.any() for r in off.records)


def test_fallback_keeps_every_expert_and_waits_like_drop():
    stale = dict(seed=1, csi_delay_blocks=200)
    drop = run(SimSettings(**stale, deadline=DeadlineRule(slack=1.0, grace_s=0.0)))
    fallback = run(SimSettings(**stale, deadline=DeadlineRule("fallback", slack=1.0, grace_s=0.0)))
    first_drop, first_fallback = drop.records[0], fallback.records[0]
    assert first_drop.cut_late.any()
    assert first_fallback.dropped_tokens.sum() == 0  # the BS ran the cut experts itself
    assert first_drop.dropped_tokens.sum() > 0
    np.testing.assert_allclose(first_fallback.waiting_s, first_drop.waiting_s)


def test_the_channel_moves_during_a_forward_unless_told_not_to():
    slow = ["channel.coherence_s=1e-4"]  # blocks far shorter than a layer
    moving = run(SimSettings(seed=3), slow, steps=1)
    frozen = run(SimSettings(seed=3, channel_moves=False), slow, steps=1)
    a, b = moving.records[0], frozen.records[0]
    np.testing.assert_array_equal(a.expert_tokens, b.expert_tokens)  # topk: same work
    assert not np.allclose(a.uplink_s[1], b.uplink_s[1])  # layer 1 met another channel
    np.testing.assert_allclose(a.uplink_s[0], b.uplink_s[0])  # layer 0: both at the start
