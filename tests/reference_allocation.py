"""Oracles for the minmax allocator: a generic convex solver (cvxpy) and a brute-force grid.

Both read the same demand and channel snapshot as the allocator but share none of its code:
rates are written out again from the SPEC formulas.
"""

import itertools
import math

import cvxpy as cp
import numpy as np

from wdmoe.channel.state import ChannelState, Link
from wdmoe.latency import LayerDemand

MHZ = 1e6
KBIT = 1e3


def _rate_mbps(link: Link, b_mhz: cp.Variable, active: np.ndarray, band_mhz: float) -> list:
    """R_u(B_u) in Mbit/s as cvxpy expressions (concave in B_u) for the active devices."""
    out = []
    for i, u in enumerate(np.flatnonzero(active)):
        gap, cap = link.snr_gap, link.max_se_bps_per_hz
        if link.power_band_hz is not None:  # fixed PSD: R = B·min(log2(1 + SNR/Γ), η)
            se = min(math.log2(1 + link.snr_hz[u] / link.power_band_hz / gap), cap)
            out.append(se * b_mhz[i])
            continue
        a_mhz = link.snr_hz[u] / gap / MHZ  # R = B·min(log2(1 + a/B), η), a = P·h/(N0·Γ)
        if a_mhz / band_mhz >= 2**cap - 1:  # capped for every B ≤ the band: R = η·B exactly
            out.append(cap * b_mhz[i])  # (and the exponential cone would be badly scaled)
            continue
        rate = -cp.rel_entr(b_mhz[i], b_mhz[i] + a_mhz) / math.log(2)  # the perspective B·log2(1 + a/B)
        out.append(rate if math.isinf(cap) else cp.minimum(rate, cap * b_mhz[i]))
    return out


def cvxpy_problem(demand: LayerDemand, channel: ChannelState) -> tuple[cp.Problem, cp.Variable, cp.Variable]:
    """min T [ms] s.t. t_u(B_u) ≤ T, Σ B_u ≤ B [MHz]: (problem, T, B) as cvxpy objects."""
    active = demand.active
    b_mhz = cp.Variable(int(active.sum()), nonneg=True)
    t_ms = cp.Variable()
    band_mhz = channel.bandwidth_hz / MHZ
    dl, ul = _rate_mbps(channel.dl, b_mhz, active, band_mhz), _rate_mbps(channel.ul, b_mhz, active, band_mhz)
    cons = [cp.sum(b_mhz) <= band_mhz]
    for i, u in enumerate(np.flatnonzero(active)):
        kbit_dl, kbit_ul = demand.downlink_bits[u] / KBIT, demand.uplink_bits[u] / KBIT
        airtime_ms = kbit_dl * cp.inv_pos(dl[i]) + kbit_ul * cp.inv_pos(ul[i])  # kbit / (Mbit/s) = ms
        cons.append(airtime_ms + demand.fixed_s[u] * 1e3 <= t_ms)
    return cp.Problem(cp.Minimize(t_ms), cons), t_ms, b_mhz


def cvxpy_minmax(demand: LayerDemand, channel: ChannelState) -> tuple[float, np.ndarray]:
    """The optimum by CLARABEL: (T* [s], B [Hz] per device, 0 for devices without work)."""
    problem, t_ms, b_mhz = cvxpy_problem(demand, channel)
    problem.solve(solver=cp.CLARABEL)
    bandwidth_hz = np.zeros(channel.num_devices)
    bandwidth_hz[demand.active] = b_mhz.value * MHZ
    return float(t_ms.value) / 1e3, bandwidth_hz


def shannon_time_s(demand: LayerDemand, channel: ChannelState, bandwidth_hz: np.ndarray) -> np.ndarray:
    """t_u(B_u) [..., U] written out from the SPEC formulas (broadcasts over grid points)."""
    out = np.array(demand.fixed_s, dtype=float) + 0.0 * bandwidth_hz
    for bits, link in ((demand.downlink_bits, channel.dl), (demand.uplink_bits, channel.ul)):
        band_p = link.power_band_hz if link.power_band_hz is not None else bandwidth_hz
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = link.snr_hz / band_p
            se = np.minimum(np.log2(1 + snr / link.snr_gap), link.max_se_bps_per_hz)
            out = out + np.where(bits > 0, bits / (bandwidth_hz * se), 0.0)
    return out


def grid_minmax(demand: LayerDemand, channel: ChannelState, steps: int) -> float:
    """min over a grid of splits of the band among the active devices of max_u t_u."""
    active = np.flatnonzero(demand.active)
    fractions = [c for c in itertools.product(range(1, steps), repeat=len(active) - 1) if sum(c) < steps]
    shares = np.array([[*c, steps - sum(c)] for c in fractions], dtype=float) / steps
    bandwidth_hz = np.zeros((len(shares), channel.num_devices))
    bandwidth_hz[:, active] = shares * channel.bandwidth_hz
    times = shannon_time_s(demand, channel, bandwidth_hz)
    return float(np.min(np.max(np.where(demand.active, times, 0.0), axis=-1)))
