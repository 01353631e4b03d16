"""`minmax`: the split of the band that minimises the slowest selected device's latency.

    minimise_B  max_{u active} t_u(B_u)   s.t.  Σ_u B_u ≤ B,  B_u ≥ 0;  inactive devices get 0.

t_u(B_u) = fixed_u + Σ_dir bits_u,dir / R_u,dir(B_u) is convex and decreasing in B_u, so at the
optimum every active device finishes at the same time T* with Σ_u B_u(T*) = B, where B_u(T) is
the least bandwidth that finishes u by T. Both levels are 1-D monotone root problems, solved by
Newton's method safeguarded by bisection (each step stays inside a bracket that shrinks):
    inner (vectorised over devices): y_u = 1/B_u solves comm_u(y) = T − fixed_u, where
        comm_u(y) = Σ_dir bits·y / η_dir(y) is increasing in y, with comm_u(0+) = the airtime
        floor of a device whose power is fixed (infinite bandwidth, finite SNR);
    outer (scalar T): F(T) = 1/Σ_u (1/y_u(T)) − 1/B = 0, increasing in T, bracketed by the
        unlimited-bandwidth floor max_u (fixed_u + comm_u(0+)) and the equal split's latency.
1/Σ 1/y is nearly linear in T (exactly for fixed spectral efficiencies), so Newton converges in
a few steps.
"""

import math
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
from numpy.typing import NDArray

from wdmoe.allocation.base import ALLOCATORS, Allocation, InfeasibleAllocationError
from wdmoe.channel.state import ChannelState, spectral_efficiency
from wdmoe.channel.units import BoolArray, FloatArray
from wdmoe.latency import LayerDemand

LN2 = float(np.log(2.0))
# Newton converges quadratically here: a relative step below STOP leaves an error of order STOP².
STOP = 1e-8
MAX_ITER = 200


@dataclass(frozen=True)
class _PowerTerm:
    """bits·y/η(y) of one fixed-power direction: SNR/Γ = β·y with β = snr_hz/Γ [Hz],
    η = min(log2(1 + β·y), η_max)."""

    bits: FloatArray
    beta_hz: FloatArray
    max_se: float

    def value_slope(self, y: FloatArray) -> tuple[FloatArray, FloatArray]:
        """bits·y/η and its derivative bits·(η − y·η')/η², η' = (β/ln2)/(1 + β·y) below the cap."""
        beta_y = self.beta_hz * y
        se = spectral_efficiency(beta_y, 1.0, self.max_se)
        y_dse = beta_y / ((1.0 + beta_y) * LN2)
        if math.isfinite(self.max_se):
            y_dse = np.where(se < self.max_se, y_dse, 0.0)
        return self.bits * y / se, self.bits * (se - y_dse) / se**2


@dataclass(frozen=True)
class _Airtime:
    """comm(y) [A] for the active devices: linear_s_hz·y (fixed-PSD directions) + power terms.

    floor_s: comm(0+) = Σ bits·ln2/β, the airtime with unlimited bandwidth;
    lower_slope: a slope s with comm(y) ≥ s·y for all y (η ≤ η_max), ``bounded`` if all s > 0.
    """

    linear_s_hz: FloatArray
    terms: tuple[_PowerTerm, ...]
    floor_s: FloatArray
    lower_slope: FloatArray
    bounded: bool

    @classmethod
    def of(cls, linear_s_hz: FloatArray, terms: tuple[_PowerTerm, ...]) -> "_Airtime":
        floor_s = sum((t.bits * LN2 / t.beta_hz for t in terms), np.zeros_like(linear_s_hz))
        lower_slope = linear_s_hz + sum((t.bits / t.max_se for t in terms), np.zeros_like(linear_s_hz))
        return cls(linear_s_hz, terms, floor_s, lower_slope, bool(np.all(lower_slope > 0)))

    def value_slope(self, y: FloatArray) -> tuple[FloatArray, FloatArray]:
        value, slope = self.linear_s_hz * y, self.linear_s_hz
        for term in self.terms:
            v, s = term.value_slope(y)
            value, slope = value + v, slope + s
        return value, slope


def _airtime(demand: LayerDemand, channel: ChannelState, active: BoolArray) -> _Airtime:
    linear = np.zeros(int(active.sum()))
    terms = []
    for bits, link in ((demand.downlink_bits, channel.dl), (demand.uplink_bits, channel.ul)):
        if link.power_band_hz is not None:  # fixed PSD: η does not depend on B_u
            linear = linear + bits[active] / link.spectral_efficiency(1.0)[active]
        else:
            terms.append(_PowerTerm(bits[active], link.snr_hz[active] / link.snr_gap, link.max_se_bps_per_hz))
    return _Airtime.of(linear, tuple(terms))


def _bracket_top(air: _Airtime, target_s: FloatArray) -> FloatArray:
    """A y_hi with comm(y_hi) > target for every device: just above target / lower slope when
    that slope is positive (comm(y) ≥ slope·y, with equality where η is capped, so the root may
    sit exactly at target / slope), else found by growing a guess."""
    slope = air.lower_slope
    if air.bounded:
        return np.asarray(target_s / slope * (1.0 + 1e-9))
    hi = np.where(slope > 0, target_s / np.maximum(slope, 1e-300), 1e-9)
    for _ in range(MAX_ITER):
        short = air.value_slope(hi)[0] < target_s
        if not short.any():
            return hi
        hi = np.where(short, hi * 4.0, hi)
    raise AssertionError(f"no upper bracket for targets {target_s}")


def inverse_bandwidth(
    air: _Airtime, target_s: FloatArray, start: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """y [A] with comm(y) = target (target > floor), and comm'(y): Newton from ``start``,
    safeguarded by bisection on [0, y_hi], vectorised over devices."""
    lo: FloatArray | float = 0.0
    hi = _bracket_top(air, target_s)
    y = np.where((start > lo) & (start < hi), start, 0.5 * hi)
    for _ in range(MAX_ITER):
        value, slope = air.value_slope(y)
        excess = value - target_s
        step = y - excess / slope
        done = np.abs(step - y) <= STOP * y
        if done.all():
            return step, slope
        below = excess < 0
        lo, hi = np.where(below, y, lo), np.where(below, hi, y)
        y = np.where(((step > lo) & (step < hi)) | done, step, 0.5 * (lo + hi))
    raise AssertionError(f"inverse bandwidth did not converge for targets {target_s}")


@dataclass(frozen=True)
class _Solution:
    finish_s: float
    bandwidth_hz: FloatArray  # [A]


def solve_minmax(air: _Airtime, fixed_s: FloatArray, band_hz: float) -> _Solution:
    """The common finish time T* and the active devices' bandwidths B_u(T*), Σ = band.

    Starts from the equal split (y = A/B), whose latency bounds T* from above.
    """
    y = np.full(fixed_s.shape, fixed_s.size / band_hz)
    airtime_s, slope_y = air.value_slope(y)
    t_lo, t_hi = float(np.max(fixed_s + air.floor_s)), float(np.max(fixed_s + airtime_s))
    t = t_hi
    for _ in range(MAX_ITER):
        y, slope_y = inverse_bandwidth(air, t - fixed_s, y)
        inv_total = 1.0 / np.sum(1.0 / y)
        excess = inv_total - 1.0 / band_hz
        t_lo, t_hi = (t, t_hi) if excess < 0 else (t_lo, t)
        step = t - excess / (inv_total**2 * np.sum(1.0 / (y**2 * slope_y)))  # F'(T) = (Σ y'/y²)/G²
        if abs(step - t) <= STOP * t:
            y = inverse_bandwidth(air, step - fixed_s, y + (step - t) / slope_y)[0]
            return _Solution(step, (band_hz / np.sum(1.0 / y)) / y)
        nxt = step if t_lo < step < t_hi else 0.5 * (t_lo + t_hi)
        y, t = y + (nxt - t) / slope_y, nxt  # predict y(T) along its tangent: dy/dT = 1/comm'(y)
    raise AssertionError(f"minmax did not converge: T in [{t_lo}, {t_hi}]")


@dataclass(frozen=True)
class LayerOptimum:
    """A layer's min–max optimum: its active devices [U], their air time and fixed seconds [A], and
    the common finish T* with the bandwidths B_u(T*) [A]."""

    active: BoolArray
    air: _Airtime
    fixed_s: FloatArray
    solution: _Solution


def layer_optimum(demand: LayerDemand, channel: ChannelState) -> LayerOptimum | None:
    """The min–max optimum of one layer's demand on ``channel`` (None: no device is active)."""
    active = demand.active
    if not active.any():
        return None
    air, fixed_s = _airtime(demand, channel, active), demand.fixed_s[active]
    return LayerOptimum(active, air, fixed_s, solve_minmax(air, fixed_s, channel.bandwidth_hz))


@ALLOCATORS.register("minmax")
@dataclass(frozen=True)
class MinMax:
    """Optimal min–max split; with ``deadline_s`` set, raise InfeasibleAllocationError when even
    the optimum misses it."""

    deadline_s: float | None = None
    name: str = "minmax"

    def allocate(self, demand: LayerDemand, channel: ChannelState) -> Allocation:
        bandwidth_hz = np.zeros(channel.num_devices)
        opt = layer_optimum(demand, channel)
        if opt is None:
            return Allocation(bandwidth_hz, self.name)
        finish_s = opt.solution.finish_s
        if self.deadline_s is not None and finish_s > self.deadline_s * (1 + 1e-9):
            self._infeasible(finish_s, opt.fixed_s + opt.air.floor_s, np.flatnonzero(opt.active))
        bandwidth_hz[opt.active] = opt.solution.bandwidth_hz
        return Allocation(bandwidth_hz, self.name)

    def _infeasible(self, finish_s: float, floor_s: FloatArray, devices: NDArray[np.intp]) -> NoReturn:
        assert self.deadline_s is not None
        worst = int(np.argmax(floor_s))
        if floor_s[worst] >= self.deadline_s:
            raise InfeasibleAllocationError(
                f"minmax: latency target {self.deadline_s:.6g} s is infeasible: device {devices[worst]} "
                f"needs {floor_s[worst]:.6g} s with unlimited bandwidth (compute + power-limited air time)"
            )
        raise InfeasibleAllocationError(
            f"minmax: latency target {self.deadline_s:.6g} s is infeasible: the best split of the band gives "
            f"{finish_s:.6g} s; raise the target, widen the band or select fewer experts"
        )
