"""The channel against independent references: closed forms, distributions, Sionna."""

import math

import numpy as np
import pytest
from scipy import stats

from wdmoe.channel import generate_trace
from wdmoe.channel.fading import Rayleigh, Rician, complex_normal, doppler_hz, gauss_markov, jakes_rho
from wdmoe.channel.geometry import ConstantVelocity, RandomWaypoint, drop_annulus
from wdmoe.channel.pathloss import InH, Macro, UMa, UMi
from wdmoe.channel.state import Link, spectral_efficiency
from wdmoe.config import load_scenario

D = np.array([20.0, 50.0, 150.0, 400.0, 900.0])


def scenario(*overrides: str):
    return load_scenario("paper", list(overrides))


# --- path loss: closed-form values --------------------------------------------------------------


def test_macro_pathloss_closed_form():
    pl = Macro().pathloss_db(np.array([1000.0, 100.0, 300.0]), np.zeros(3, bool))
    # 128.1 + 37.6·log10(d_km): d = 1 km → 128.1; 0.1 km → 128.1 − 37.6; 0.3 km → 128.1 − 37.6·0.5228787
    np.testing.assert_allclose(pl, [128.1, 90.5, 108.439760], atol=1e-6)


def test_3gpp_pathloss_closed_form_values():
    # UMa LOS, 3.5 GHz, h_BS 25 m, h_UT 1.5 m, d_2D 50 m: d_3D = sqrt(50² + 23.5²) = 55.2471 m,
    # below d'_BP = 4·24·0.5·3.5e9/c = 560.4 m: 28 + 22·log10(55.2471) + 20·log10(3.5) = 77.2122 dB
    assert UMa(carrier_hz=3.5e9).pathloss_db(np.array([50.0]), np.array([True]))[0] == pytest.approx(
        77.2122, abs=1e-4
    )
    # UMa NLOS, 150 m: d_3D = 151.83; 13.54 + 39.08·log10(151.83) + 20·log10(3.5) = 109.6688 dB (> LOS 86.87)
    assert UMa(carrier_hz=3.5e9).pathloss_db(np.array([150.0]), np.array([False]))[0] == pytest.approx(
        109.6688, abs=1e-4
    )
    # UMi LOS beyond d'_BP = 4·9·0.5·3.5e9/c = 210.1 m, d_2D 400 m, h_BS 10 m: d_3D = 400.2266;
    # 32.4 + 40·log10(400.2266) + 20·log10(3.5) − 9.5·log10(210.1² + 8.5²) = 103.2331 dB
    assert UMi(carrier_hz=3.5e9).pathloss_db(np.array([400.0]), np.array([True]))[0] == pytest.approx(
        103.2331, abs=1e-4
    )
    # InH NLOS, 10 m, h 3 / 1 m: d_3D = 10.198;
    # max(LOS 60.73, 17.3 + 38.3·log10(10.198) + 24.9·log10(3.5)) = 69.4735
    assert InH(carrier_hz=3.5e9).pathloss_db(np.array([10.0]), np.array([False]))[0] == pytest.approx(
        69.4735, abs=1e-4
    )


def test_los_probability_closed_form():
    assert UMi().los_probability(np.array([10.0, 18.0]))[0] == 1.0
    # 18/100 + e^(−100/36)·(1 − 0.18)
    assert UMi().los_probability(np.array([100.0]))[0] == pytest.approx(0.18 + math.exp(-100 / 36) * 0.82)
    assert UMa().los_probability(np.array([100.0]))[0] == pytest.approx(0.18 + math.exp(-100 / 63) * 0.82)
    assert InH().los_probability(np.array([3.0]))[0] == pytest.approx(math.exp(-(3.0 - 1.2) / 4.7))
    tall = UMa(ut_height_m=22.5).los_probability(np.array([100.0]))[0]  # C'(h_UT) raises P_LOS above 13 m
    c = ((22.5 - 13) / 10) ** 1.5
    assert tall == pytest.approx((0.18 + math.exp(-100 / 63) * 0.82) * (1 + c * 1.25 * math.exp(-100 / 150)))


def test_nlos_is_never_below_los_and_shadowing_sigmas():
    for model in (UMa(), UMi(), InH()):
        assert np.all(model.pathloss_db(D, np.zeros(5, bool)) >= model.pathloss_db(D, np.ones(5, bool)))
    assert UMa().shadowing_std_db(np.array([True, False])).tolist() == [4.0, 6.0]
    assert UMi().shadowing_std_db(np.array([True, False])).tolist() == [4.0, 7.82]
    assert Macro(fixed_shadowing_std_db=3.0).shadowing_std_db(np.array([False])).tolist() == [3.0]


def test_shadowing_is_lognormal_with_configured_sigma():
    trace = generate_trace(scenario("cell.num_devices=20000", "channel.fading=none"), 1, seed=5)
    x_db = trace.shadowing_db[0]
    assert abs(x_db.mean()) < 4 * 8.0 / math.sqrt(x_db.size)
    assert x_db.std() == pytest.approx(8.0, rel=0.03)
    assert stats.kstest(x_db / 8.0, "norm").pvalue > 1e-3


# --- noise, SNR and rate ------------------------------------------------------------------------


def test_snr_closed_form_in_db():
    cfg = scenario(
        "cell.num_devices=1",
        "cell.positions_m=[[100.0, 0.0]]",
        "channel.fading=none",
        "channel.shadowing_std_db=0",
    )
    state = generate_trace(cfg, 1).state(0)
    # DL: 43 dBm over 20 MHz, PL 90.5 dB, N0 = −174 + 9 dB: 43 − 10·log10(20e6) − 90.5 + 174 − 9
    assert 10 * np.log10(state.dl.snr(2.5e6)[0]) == pytest.approx(43 - 73.0103 - 90.5 + 165, abs=1e-4)
    # UL: 23 dBm on the device's 2.5 MHz, N0 = −174 + 5 dB: 23 − 10·log10(2.5e6) − 90.5 + 174 − 5
    assert 10 * np.log10(state.ul.snr(2.5e6)[0]) == pytest.approx(23 - 63.9794 - 90.5 + 169, abs=1e-4)
    assert state.pathloss_db[0] == pytest.approx(90.5)


def test_rate_is_shannon_with_gap_and_cap():
    rng = np.random.default_rng(0)
    snr_hz, band_hz = rng.uniform(1e5, 1e9, 6), rng.uniform(1e5, 5e6, 6)
    for gap_db, cap in ((0.0, np.inf), (3.0, np.inf), (3.0, 6.0)):
        gap = 10 ** (gap_db / 10)
        link = Link(np.ones(6), snr_hz, None, gap, cap)
        expected = [b * min(math.log2(1 + s / b / gap), cap) for s, b in zip(snr_hz, band_hz, strict=True)]
        np.testing.assert_allclose(link.rate_bps(band_hz), expected, rtol=1e-12)
    psd = Link(np.ones(6), snr_hz, 20e6)  # PSD fixed: SNR does not depend on the share
    np.testing.assert_allclose(psd.snr(band_hz), snr_hz / 20e6)
    assert Link(np.ones(2), snr_hz[:2], None).rate_bps(np.zeros(2)).tolist() == [0.0, 0.0]
    assert spectral_efficiency(1e9, 1.0, 7.4) == 7.4


# --- small-scale fading --------------------------------------------------------------------------


def test_rayleigh_power_is_exponential_with_mean_one():
    g2 = Rayleigh().power(complex_normal((20000,), np.random.default_rng(1)), np.zeros(20000))
    assert abs(g2.mean() - 1.0) < 4 / math.sqrt(g2.size)  # Exp(1): std 1
    assert stats.kstest(g2, "expon").pvalue > 1e-3
    assert stats.kstest(g2, "expon", args=(0, 1.3)).pvalue < 1e-6  # the test can tell a wrong mean


@pytest.mark.parametrize("k_db", [0.0, 6.0, 10.0])
def test_rician_power_matches_noncentral_chi2(k_db):
    n, k = 20000, 10 ** (k_db / 10)
    rng = np.random.default_rng(2)
    g2 = Rician(k_db).power(complex_normal((n,), rng), rng.uniform(0, 2 * np.pi, n))
    assert abs(g2.mean() - 1.0) < 4 * math.sqrt((2 * k + 1) / (k + 1) ** 2 / n)
    # 2(K+1)|g|² ~ noncentral χ² with 2 degrees of freedom and noncentrality 2K
    assert stats.kstest(2 * (k + 1) * g2, "ncx2", args=(2, 2 * k)).pvalue > 1e-3
    gamma = g2.var() / g2.mean() ** 2  # moment estimate of K: sqrt(1−γ)/(1 − sqrt(1−γ))
    k_hat = math.sqrt(1 - gamma) / (1 - math.sqrt(1 - gamma)) if gamma < 1 else 0.0
    assert k_hat == pytest.approx(k, abs=0.1 + 0.08 * k)


def test_doppler_and_jakes_rho():
    assert doppler_hz(30.0, 2e9) == pytest.approx(30.0 * 2e9 / 299_792_458.0)  # 200.14 Hz
    assert jakes_rho(0.0, 0.01) == 1.0
    assert jakes_rho(2.404825557695773 / (2 * np.pi), 1.0) == pytest.approx(
        0.0, abs=1e-12
    )  # first zero of J0
    assert jakes_rho(10.0, 0.01) == pytest.approx(0.9037126, abs=1e-6)  # J0(0.2π) from tables


def test_gauss_markov_consecutive_block_correlation():
    rho = np.full(2000, 0.9)
    w = gauss_markov(rho, 500, np.random.default_rng(3))
    lag1 = np.mean(w[1:] * np.conj(w[:-1]))
    # 1e6 pairs, but AR(1)-correlated: var ≈ (1 + ρ²)/(1 − ρ²)/n → std ≈ 0.003
    assert abs(lag1 - 0.9) < 0.012
    assert np.mean(np.abs(w[-1]) ** 2) == pytest.approx(1.0, abs=0.15)  # stationary: unit power at every time
    g2 = np.abs(w) ** 2
    power_corr = np.corrcoef(g2[1:].ravel(), g2[:-1].ravel())[0, 1]
    assert power_corr == pytest.approx(0.81, abs=0.012)  # Rayleigh: corr(|g|²) = |ρ|²


@pytest.mark.parametrize("correlation", ["jakes", "ar1"])
def test_trace_fading_follows_configured_doppler(correlation):
    cfg = scenario(
        "cell.num_devices=200",
        "mobility.speed_mps=3",
        "channel.coherence_s=0.005",
        f"channel.correlation={correlation}",
    )
    trace = generate_trace(cfg, 400, seed=4)
    rho = jakes_rho(doppler_hz(3.0, 2e9), 0.005)  # J0(2π·20 Hz·5 ms) ≈ 0.904 at lag 1 in both models
    power_corr = np.corrcoef(trace.fading_dl[1:].ravel(), trace.fading_dl[:-1].ravel())[0, 1]
    assert power_corr == pytest.approx(rho**2, abs=0.03)
    iid = generate_trace(scenario("cell.num_devices=200", "channel.correlation=iid"), 400, seed=4)
    assert abs(np.corrcoef(iid.fading_dl[1:].ravel(), iid.fading_dl[:-1].ravel())[0, 1]) < 0.02


# --- geometry and mobility -----------------------------------------------------------------------


def test_annulus_drop_is_uniform_in_area():
    r = np.hypot(*drop_annulus(20000, 10.0, 300.0, np.random.default_rng(6)).T)
    assert r.min() >= 10.0 and r.max() <= 300.0
    cdf = lambda x: (x**2 - 10.0**2) / (300.0**2 - 10.0**2)  # noqa: E731
    assert stats.kstest(r, cdf).pvalue > 1e-3
    assert stats.kstest(r, lambda x: (x - 10.0) / 290.0).pvalue < 1e-6  # uniform in radius is rejected


def test_mobility_models_keep_speed_and_cell():
    rng = np.random.default_rng(7)
    start = drop_annulus(50, 10.0, 300.0, rng)
    for model in (ConstantVelocity(5.0, 10.0, 300.0), RandomWaypoint(5.0, 10.0, 300.0)):
        track = model.track(start, 300, 0.5, rng)
        steps = np.hypot(*(track[1:] - track[:-1]).T)
        assert np.all(steps <= 2.5 + 1e-9) and np.mean(steps) > 1.5
        assert np.all(np.hypot(*track.T) <= 300.0 + 1e-9)
    track = ConstantVelocity(5.0, 10.0, 300.0).track(start, 300, 0.5, rng)
    assert np.hypot(*track.T).min() >= 10.0 - 1e-9  # it never enters the inner disc …
    offset = track - start  # [N, U, 2]
    far = offset[np.argmax(np.linalg.norm(offset, axis=-1), axis=0), np.arange(50)]  # [U, 2]
    cross = offset[..., 0] * far[:, 1] - offset[..., 1] * far[:, 0]
    assert np.allclose(cross, 0.0, atol=1e-6)  # … and paces one straight chord


def test_random_waypoint_is_prefix_stable_and_walks_legs_at_speed():
    start = drop_annulus(5, 10.0, 300.0, np.random.default_rng(1))
    model = RandomWaypoint(2.0, 10.0, 300.0)
    long = model.track(start, 4000, 1.0, np.random.default_rng(2))
    short = model.track(start, 100, 1.0, np.random.default_rng(2))
    np.testing.assert_array_equal(short, long[:100])
    steps = np.hypot(*(long[1:] - long[:-1]).T)
    assert np.median(steps) == pytest.approx(2.0)  # straight legs: a full step per block
    assert np.all(steps <= 2.0 + 1e-9) and np.ptp(long[:, 0, 0]) > 100  # it turns at waypoints and roams


# --- the trace -----------------------------------------------------------------------------------


def test_trace_is_replayable_and_prefix_stable():
    cfg = load_scenario("lab")  # random waypoint, Rician, InH: every random stream in use
    a, b = generate_trace(cfg, 30, seed=11), generate_trace(cfg, 30, seed=11)
    long = generate_trace(cfg, 60, seed=11)
    for name in ("positions_m", "los", "pathloss_db", "shadowing_db", "fading_dl", "fading_ul"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(getattr(a, name), getattr(long, name)[:30])
    assert not np.array_equal(a.fading_dl, generate_trace(cfg, 30, seed=12).fading_dl)


def test_channel_state_is_an_immutable_snapshot():
    trace = generate_trace(scenario(), 10, seed=1)
    state = trace.state(3)
    assert state.time_s == pytest.approx(0.03) and trace.at(0.0349).time_s == state.time_s
    np.testing.assert_allclose(state.dl.gain, trace.gain(trace.fading_dl)[3])
    with pytest.raises(ValueError):
        state.dl.gain[0] = 1.0
    with pytest.raises(AttributeError):
        state.time_s = 1.0  # type: ignore[misc]


# --- Sionna (PyTorch) as the reference for TR 38.901 ---------------------------------------------


@pytest.fixture(scope="module")
def sionna_tr38901():
    return pytest.importorskip(
        "sionna.phy.channel.tr38901", reason="sionna-no-rt is not installed (pip install sionna-no-rt)"
    )


def _sionna_scenario(tr, kind: str, fc_hz: float, h_bs_m: float, h_ut_m: float, los: bool):
    import torch

    ant = tr.Antenna(
        polarization="single", polarization_type="V", antenna_pattern="omni", carrier_frequency=fc_hz
    )
    kwargs = {"enable_shadow_fading": False, "precision": "double"}
    if kind == "inh":
        sc = tr.InHScenario(fc_hz, "mixed", ant, ant, "downlink", **kwargs)
    else:
        sc = {"uma": tr.UMaScenario, "umi": tr.UMiScenario}[kind](
            fc_hz, "low", ant, ant, "downlink", **kwargs
        )
    d = torch.tensor(D if kind != "inh" else D / 20, dtype=torch.float64)
    ut = torch.stack([d, torch.zeros_like(d), torch.full_like(d, h_ut_m)], -1)[None]
    bs = torch.tensor([[[0.0, 0.0, h_bs_m]]], dtype=torch.float64)
    zeros = torch.zeros_like(ut)
    indoor = torch.full((1, 5), kind == "inh")  # InH: every UT indoors; UMa/UMi: outdoors (no O2I loss)
    sc.set_topology(ut, bs, zeros, torch.zeros(1, 1, 3, dtype=torch.float64), zeros, indoor, los)
    return sc, d.numpy()


@pytest.mark.parametrize("kind", ["uma", "umi", "inh"])
@pytest.mark.parametrize("fc_hz", [2e9, 3.5e9, 28e9])
def test_3gpp_pathloss_and_los_probability_match_sionna(sionna_tr38901, kind, fc_hz):
    ours = {"uma": UMa, "umi": UMi, "inh": InH}[kind](carrier_hz=fc_hz)
    for los in (True, False):
        sc, d_m = _sionna_scenario(sionna_tr38901, kind, fc_hz, ours.bs_height_m, ours.ut_height_m, los)
        expected = sc.basic_pathloss.squeeze().numpy()
        np.testing.assert_allclose(ours.pathloss_db(d_m, np.full(5, los)), expected, atol=1e-6)
    np.testing.assert_allclose(ours.los_probability(d_m), sc.los_probability.squeeze().numpy(), atol=1e-9)


def test_rayleigh_matches_sionna_block_fading(sionna_tr38901):
    import sionna.phy
    from sionna.phy.channel import RayleighBlockFading

    sionna.phy.config.seed = 8
    h, _ = RayleighBlockFading(num_rx=1, num_rx_ant=1, num_tx=1, num_tx_ant=1, precision="double")(20000, 1)
    theirs = np.abs(h.numpy().ravel()) ** 2
    ours = Rayleigh().power(complex_normal((20000,), np.random.default_rng(8)), np.zeros(20000))
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    assert theirs.mean() == pytest.approx(1.0, abs=0.03)


def test_gauss_markov_equals_its_recursion():
    rho = np.array([0.9, 0.5, 0.9, 0.0, 1.0, -0.3])
    w = gauss_markov(rho, 40, np.random.default_rng(9))
    e = complex_normal((40, 6), np.random.default_rng(9))  # the same innovations, in the same order
    ref = np.empty_like(e)
    ref[0] = e[0]
    for n in range(1, 40):
        for u in range(6):
            ref[n, u] = rho[u] * ref[n - 1, u] + math.sqrt(1 - rho[u] ** 2) * e[n, u]
    np.testing.assert_allclose(w, ref, rtol=1e-12, atol=1e-14)
