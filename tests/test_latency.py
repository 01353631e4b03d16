"""The vectorised latency model against plain Python loops and closed forms."""

import math

import numpy as np
import pytest

from wdmoe.channel import generate_trace
from wdmoe.config import load_scenario
from wdmoe.latency import (
    ExpertCost,
    bs_layer_flops,
    bs_seconds,
    device_time_s,
    device_times,
    expert_flops_per_token,
    forward_latency,
    layer_demand,
    lm_head_flops,
    payload_bits,
    waiting_s,
)
from wdmoe.latency.devices import devices_for, effective_flops_per_s


def test_payload_bits_and_expert_flops_closed_form():
    assert payload_bits(3, 4096, 16, 512) == 3 * 4096 * 16 + 512
    assert payload_bits(0, 4096, 16, 512) == 0  # no tokens, no message
    assert payload_bits(np.array([0, 1, 2]), 576, 8, 64).tolist() == [0, 576 * 8 + 64, 2 * 576 * 8 + 64]
    assert expert_flops_per_token(4096, 14336) == 2 * 3 * 4096 * 14336


def loop_latency(tokens, rate_dl, rate_ul, flops, cost, bs_s, head_s):
    """The SPEC §4 formulas, one token-layer-device at a time, in plain Python."""
    totals = []
    for s in range(tokens.shape[0]):
        total = head_s
        for layer in range(tokens.shape[1]):
            wait = 0.0
            for u in range(tokens.shape[2]):
                n = int(tokens[s, layer, u])
                if n == 0:
                    continue
                bits = n * cost.hidden_size * cost.bits_per_element + cost.header_bits
                t = bits / rate_dl[s, layer, u] + n * cost.flops_per_token / flops[u] + cost.overhead_s
                wait = max(wait, t + bits / rate_ul[s, layer, u])
            total += wait + bs_s[layer]
        totals.append(total)
    return np.array(totals)


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_latency_equals_loop_reference(seed):
    rng = np.random.default_rng(seed)
    steps, layers, devices = 3, 4, 6
    tokens = rng.integers(0, 4, (steps, layers, devices)) * (rng.random((steps, layers, devices)) < 0.7)
    tokens[0, 0] = 0  # a layer where no device has work
    rate_dl, rate_ul = rng.uniform(1e6, 1e8, (2, steps, layers, devices))
    flops = rng.uniform(1e11, 1e13, devices)
    cost = ExpertCost(
        int(rng.integers(64, 4096)), int(rng.choice([4, 8, 16])), 512, float(rng.uniform(1e6, 1e9)), 1e-4
    )
    bs_s, head_s = rng.uniform(1e-4, 1e-3, layers), 2e-3
    lat = forward_latency(tokens, rate_dl, rate_ul, flops, cost, bs_s, head_s)
    np.testing.assert_allclose(
        lat.total_s, loop_latency(tokens, rate_dl, rate_ul, flops, cost, bs_s, head_s), rtol=1e-12
    )
    assert lat.waiting_s[0, 0] == 0.0
    assert np.all(lat.devices.total_s[tokens == 0] == 0.0)


def test_waiting_is_the_slowest_device_with_work():
    total_s = np.array([[1.0, 5.0, 3.0], [2.0, 0.5, 9.0]])
    tokens = np.array([[1, 0, 2], [0, 0, 0]])
    assert waiting_s(total_s, tokens).tolist() == [3.0, 0.0]


def test_device_time_on_a_channel_matches_the_breakdown_and_shannon():
    cfg = load_scenario("paper")
    state = generate_trace(cfg, 1, seed=2).state(0)
    flops = effective_flops_per_s(devices_for(cfg.cell.device_classes, 8))
    cost = ExpertCost.from_config(cfg)
    tokens = np.array([3, 0, 1, 2, 0, 5, 1, 1])
    band_hz = np.full(8, 2.5e6)
    t = device_time_s(layer_demand(tokens, flops, cost), state, band_hz)
    parts = device_times(tokens, state.dl.rate_bps(band_hz), state.ul.rate_bps(band_hz), flops, cost)
    np.testing.assert_allclose(t, parts.total_s, rtol=1e-14)
    for u in range(8):  # written out: n·D·b + H over B·log2(1 + SNR) each way, plus n·6DF / C
        n = int(tokens[u])
        bits = n * 4096 * 16 + 512 if n else 0
        snr_dl = state.dl.snr_hz[u] / 20e6
        snr_ul = state.ul.snr_hz[u] / 2.5e6
        expected = (
            (bits / (2.5e6 * math.log2(1 + snr_dl)) + bits / (2.5e6 * math.log2(1 + snr_ul))) if n else 0.0
        )
        expected += n * 6 * 4096 * 14336 / flops[u]
        assert t[u] == pytest.approx(expected, rel=1e-12)


def test_bs_flops_closed_form():
    cfg = load_scenario("paper")
    m = cfg.model  # Mixtral: D = 4096, D_kv = 1024, E = 8, V = 32000
    one = bs_layer_flops(m, 1, 99)  # decode at context 99: the token attends to 100 positions
    assert one == 2 * (2 * 4096**2 + 2 * 4096 * 1024) + 4 * 4096 * 100 + 2 * 4096 * 8
    prompt = bs_layer_flops(m, 5, 0)  # prefill: token i attends to i + 1 positions
    attended = sum(i + 1 for i in range(5))
    assert prompt == 5 * 2 * (2 * 4096**2 + 2 * 4096 * 1024) + 4 * 4096 * attended + 5 * 2 * 4096 * 8
    assert lm_head_flops(m) == 2 * 4096 * 32000
    np.testing.assert_allclose(bs_seconds(m, 1, 99, 1e14), np.full(32, one / 1e14))


def test_prefill_sends_one_message_per_device_and_decode_one_per_step():
    cost = ExpertCost(4096, 16, 512, 1e9)
    rates, flops = np.full(2, 1e7), np.full(2, 1e12)
    prefill = forward_latency(np.array([[4, 4]]), rates, rates, flops, cost)  # [L=1, U=2]: 4 tokens each
    decode = forward_latency(np.ones((4, 1, 2)), rates, rates, flops, cost)  # 4 steps, 1 token each
    header_s = 2 * 512 / 1e7  # one header per hop saved by batching 4 tokens into a message
    assert decode.total_s.sum() - prefill.total_s == pytest.approx(3 * header_s)
