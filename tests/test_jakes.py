"""Jakes fading by a sum of sinusoids (Zheng–Xiao) against theory, next to the AR(1) model."""

import math

import numpy as np
import pytest
from scipy.special import j0

from wdmoe.channel import generate_trace
from wdmoe.channel.fading import SOS_SINUSOIDS, doppler_hz, gauss_markov, jakes_rho, sum_of_sinusoids
from wdmoe.config import ChannelConfig, load_scenario

LAGS = np.arange(21)


def scenario(*overrides: str):
    return load_scenario("paper", list(overrides))


def autocorrelation(w: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """E[w(n+m)·w*(n)] [len(lags)], averaged over devices and time origins n (w [N, U])."""
    return np.array([np.mean(w[m:] * np.conj(w[: len(w) - m])) for m in lags])


def reference_sos(doppler_hz: np.ndarray, block_s: float, num_blocks: int, rng, m: int) -> np.ndarray:
    """Zheng–Xiao written out with plain cosines, drawing θ [U, 1] then φ, ψ [U, 2, M] in order."""
    theta = rng.uniform(-np.pi, np.pi, (len(doppler_hz), 1))
    phase = rng.uniform(-np.pi, np.pi, (len(doppler_hz), 2, m))
    alpha = (2 * np.pi * np.arange(1, m + 1) - np.pi + theta) / (4 * m)  # [U, M]
    t_s = np.arange(num_blocks)[:, None, None] * block_s  # [N, 1, 1]
    w_d = 2 * np.pi * doppler_hz[:, None]  # [U, 1]
    x_c = np.sqrt(2 / m) * np.cos(w_d * t_s * np.cos(alpha) + phase[:, 0]).sum(-1)  # [N, U]
    x_s = np.sqrt(2 / m) * np.cos(w_d * t_s * np.sin(alpha) + phase[:, 1]).sum(-1)
    return (x_c + 1j * x_s) / np.sqrt(2)


def test_sum_of_sinusoids_equals_the_plain_cosine_formula():
    f_d = np.array([0.0, 3.0, 6.7, 200.0])
    for m in (1, 4, SOS_SINUSOIDS):
        fast = sum_of_sinusoids(f_d, 0.01, 300, np.random.default_rng(8), num_sinusoids=m)
        slow = reference_sos(f_d, 0.01, 300, np.random.default_rng(8), m)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-10)


def test_sum_of_sinusoids_autocorrelation_is_jakes_at_every_lag():
    # f_D·T = 0.05: J0(2π·0.05·m) crosses zero near m = 7.7 and m = 17.6 within the 20 lags
    w = sum_of_sinusoids(np.full(2000, 0.05), 1.0, 200, np.random.default_rng(1))
    jakes = j0(2 * np.pi * 0.05 * LAGS)
    acf = autocorrelation(w, LAGS)
    np.testing.assert_allclose(acf.real, jakes, atol=0.05)
    np.testing.assert_allclose(acf.imag, 0.0, atol=0.05)  # symmetric Doppler spectrum: real ACF
    # the AR(1) model with the same lag-1 correlation drifts away: ρ^10 = 0.78 where J0 = −0.30
    ar1 = autocorrelation(gauss_markov(np.full(2000, jakes[1]), 200, np.random.default_rng(1)), LAGS)
    assert np.max(np.abs(ar1.real - jakes)) > 0.5


def test_trace_power_autocorrelation_follows_jakes():
    # |g|² of a Gaussian process has corr(|g|²) = J0²; with M = 16 the fourth moments fall a bit
    # short of Gaussian (Zheng–Xiao, §III), so only the lag-1 value is pinned tightly.
    cfg = scenario("cell.num_devices=500", "channel.correlation=jakes")
    g2 = generate_trace(cfg, 400, seed=2).fading_dl
    rho = jakes_rho(doppler_hz(cfg.mobility.speed_mps, cfg.cell.carrier_hz), cfg.channel.coherence_s)
    lag1 = np.corrcoef(g2[1:].ravel(), g2[:-1].ravel())[0, 1]
    lag10 = np.corrcoef(g2[10:].ravel(), g2[:-10].ravel())[0, 1]
    assert lag1 == pytest.approx(rho**2, abs=0.02)
    assert lag10 < 0.2  # J0(2π f_D 10T)² = 0.14; the AR(1) model gives ρ^20 = 0.41


def test_sum_of_sinusoids_has_unit_power_and_near_rayleigh_kurtosis():
    w = sum_of_sinusoids(np.full(2000, 0.05), 1.0, 400, np.random.default_rng(3))
    power = np.abs(w) ** 2
    assert power.mean() == pytest.approx(1.0, abs=0.02)
    # E|w|⁴ = 2 − 3/(4M) for M sinusoids (2 for Rayleigh): 1.953 at M = 16; the estimate spreads
    # by 0.012 over seeds, so 0.05 is four standard deviations
    assert np.mean(power**2) == pytest.approx(2 - 3 / (4 * SOS_SINUSOIDS), abs=0.05)


@pytest.mark.parametrize("fading", ["rayleigh", "rician"])
def test_trace_fading_has_unit_mean_power(fading):
    # 2 × 2000 realisations × 200 blocks: the mean's spread over seeds is ≈ 0.003
    trace = generate_trace(scenario("cell.num_devices=2000", f"channel.fading={fading}"), 200, seed=5)
    assert trace.fading_dl.mean() == pytest.approx(1.0, abs=0.02)
    assert trace.fading_ul.mean() == pytest.approx(1.0, abs=0.02)


def test_rician_k_factor_is_recovered_on_the_sum_of_sinusoids():
    k = 10 ** (6 / 10)
    cfg = scenario("cell.num_devices=2000", "channel.fading=rician", "channel.rician_k_db=6")
    trace = generate_trace(cfg, 200, seed=6)
    g2 = np.concatenate([trace.fading_dl, trace.fading_ul], axis=1)
    gamma = g2.var() / g2.mean() ** 2  # moment estimate: K = sqrt(1−γ)/(1 − sqrt(1−γ))
    k_hat = math.sqrt(1 - gamma) / (1 - math.sqrt(1 - gamma))
    # Expected γ with the SoS diffuse part: E|g|⁴ − 1 = ν⁴ + 4ν²σ² + (2 − 3/(4M))σ⁴ − 1
    # (ν² = K/(K+1), σ² = 1/(K+1)), i.e. K̂ ≈ 4.01 rather than 3.98; over 20 seeds K̂ spreads by
    # 0.03, so 0.12 is four standard deviations.
    nu2, s2 = k / (k + 1), 1 / (k + 1)
    gamma_sos = nu2**2 + 4 * nu2 * s2 + (2 - 3 / (4 * SOS_SINUSOIDS)) * s2**2 - 1
    k_sos = math.sqrt(1 - gamma_sos) / (1 - math.sqrt(1 - gamma_sos))
    assert k_sos == pytest.approx(k, abs=0.05)
    assert k_hat == pytest.approx(k_sos, abs=0.12)


def test_sum_of_sinusoids_is_prefix_stable():
    f_d = np.array([0.0, 6.7, 50.0])
    long = sum_of_sinusoids(f_d, 0.01, 5000, np.random.default_rng(4))
    for n in (1, 5, 127, 128, 129, 1000):  # either side of the internal 128-block split
        np.testing.assert_array_equal(sum_of_sinusoids(f_d, 0.01, n, np.random.default_rng(4)), long[:n])
    cfg = scenario("channel.correlation=jakes", "channel.fading=rician")
    short, longer = generate_trace(cfg, 300, seed=7), generate_trace(cfg, 3000, seed=7)
    np.testing.assert_array_equal(short.fading_dl, longer.fading_dl[:300])
    np.testing.assert_array_equal(short.fading_ul, longer.fading_ul[:300])


@pytest.mark.parametrize("correlation", ["jakes", "ar1"])
def test_static_surroundings_give_a_constant_channel(correlation):
    cfg = scenario("cell.num_devices=1000", "mobility.speed_mps=0", f"channel.correlation={correlation}")
    trace = generate_trace(cfg, 50, seed=8)
    for g2 in (trace.fading_dl, trace.fading_ul):
        assert np.all(np.isfinite(g2))
        np.testing.assert_array_equal(g2, np.broadcast_to(g2[0], g2.shape))
        assert g2[0].mean() == pytest.approx(1.0, abs=0.1)  # still Exp(1)-like across devices


def test_ar1_is_still_available_with_lag10_correlation_rho_to_the_tenth():
    cfg = scenario("cell.num_devices=2000", "channel.correlation=ar1")
    rho = jakes_rho(doppler_hz(cfg.mobility.speed_mps, cfg.cell.carrier_hz), cfg.channel.coherence_s)
    w = gauss_markov(np.full(2000, rho), 400, np.random.default_rng(9))
    assert autocorrelation(w, np.array([10]))[0].real == pytest.approx(rho**10, abs=0.02)  # 0.64
    g2 = generate_trace(cfg, 400, seed=9).fading_dl
    lag10 = np.corrcoef(g2[10:].ravel(), g2[:-10].ravel())[0, 1]
    assert lag10 == pytest.approx(rho**20, abs=0.03)  # Rayleigh: corr(|g|²) = ρ^20 = 0.41


def test_jakes_is_the_default_correlation():
    assert ChannelConfig().correlation == "jakes"
    assert load_scenario("paper").channel.correlation == "jakes"
    assert load_scenario("lab").channel.correlation == "jakes"
