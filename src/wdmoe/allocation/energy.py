"""`energy`: the split of the band that spends the least device energy within a latency target.

    minimise_B  Σ_{u active} E_u(B_u)
    s.t.        t_u(B_u) ≤ T_target = (1 + s)·T*   (u active),   Σ_u B_u ≤ B,   B_u ≥ 0,

with T* the `minmax` optimum of the layer (its least possible wait, s) and s ≥ 0 the slack;
inactive devices get 0. E_u is a device's energy for the layer (J, :mod:`wdmoe.latency.energy`):

    E_u(B_u) = n_u·F_tok·ε_u + P^rx_u·t^DL_u(B_u) + P^tx_u·t^UL_u(B_u),

so only the radio part depends on the split. Each airtime t^dir_u(B) = bits/R_u(B) is convex
and decreasing in B (R_u = B·η_u(B) is concave and increasing), so E_u is convex and decreasing:
the problem is convex, and the optimum uses the whole band. t_u is decreasing too, so the
latency target is a floor B_u ≥ b_u, the least bandwidth that finishes u by T_target (found as
`minmax` finds its B_u(T)). The KKT conditions give a water-filling form: with
m_u(B) = −dE_u/dB (J/Hz, decreasing in B: the energy one more Hz saves),

    B_u(λ) = max(b_u, m_u⁻¹(λ)),   λ > 0 such that Σ_u B_u(λ) = B.

Σ_u B_u(λ) is decreasing in λ, so λ is a 1-D monotone root, bracketed by max_u m_u(b_u) (every
device at its floor: Σ = Σ b ≤ B) and min_u m_u(b_u + R) (every device above its floor by the
rest R = B − Σ b). In y = 1/B (as in `minmax`), m_u = y²·(P^rx·dt^DL/dy + P^tx·dt^UL/dy), and
both levels are solved by vectorised regula falsi (Illinois) in log coordinates, where m is close
to linear (exactly, m ∝ y², for a fixed spectral efficiency). Slack 0 returns `minmax`'s split;
as s grows, devices whose radio costs the most per Hz take the band the others give up.
Powers P^rx_u, P^tx_u [U] (W) come from an :class:`~wdmoe.latency.energy.EnergyModel`
(:func:`energy_params`); without one, every device has the paper cell's radio:
P^rx = the LTE modem's β, P^tx = P^rx + 23 dBm radiated.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wdmoe.allocation.base import ALLOCATORS, Allocation
from wdmoe.allocation.minmax import _Airtime, _PowerTerm, inverse_bandwidth, layer_optimum
from wdmoe.channel.state import ChannelState, Link
from wdmoe.channel.units import BoolArray, FloatArray, dbm_to_w
from wdmoe.config import check_range
from wdmoe.latency import LayerDemand
from wdmoe.latency.devices import LTE_RX_W
from wdmoe.latency.energy import EnergyModel, radio_energy_j
from wdmoe.latency.model import transfer_s

if TYPE_CHECKING:
    from wdmoe.config import ScenarioConfig

MAX_SLACK = 100.0  # a target 101× the optimum: beyond it the floors b_u are all but 0
DEFAULT_TX_RADIATED_DBM = 23.0  # the paper cell's device power (configs/scenarios/paper.toml)
STOP = 1e-12  # relative width of a root's bracket (log coordinates) at which the search stops
BAND_TOL = 1e-10  # λ is found when Σ_u B_u(λ) is within this fraction of the band (then rescaled)
MAX_ITER = 200


def radio_energy_at(
    demand: LayerDemand, channel: ChannelState, bandwidth_hz: Any, energy: EnergyModel
) -> FloatArray:
    """E^radio [U] (J) of the layer at the split B [U]: P^rx·t^DL + P^tx·t^UL at the rates B gives."""
    downlink_s = transfer_s(demand.downlink_bits, channel.dl.rate_bps(bandwidth_hz))
    uplink_s = transfer_s(demand.uplink_bits, channel.ul.rate_bps(bandwidth_hz))
    return radio_energy_j(downlink_s, uplink_s, energy.rx_power_w, energy.tx_power_w)


def default_energy() -> EnergyModel:
    """Every device with the paper cell's radio (module doc); ε = 0 (compute is split-free)."""
    rx = np.asarray(LTE_RX_W)
    return EnergyModel(np.asarray(0.0), rx, rx + dbm_to_w(DEFAULT_TX_RADIATED_DBM))


def _direction(bits: FloatArray, link: Link, active: BoolArray) -> _Airtime:
    """The airtime t(y) [A] of one direction alone, y = 1/B_u (`minmax`'s representation)."""
    if link.power_band_hz is not None:  # fixed PSD: t = bits·y/η, η independent of B_u
        return _Airtime.of(bits[active] / link.spectral_efficiency(1.0)[active], ())
    term = _PowerTerm(bits[active], link.snr_hz[active] / link.snr_gap, link.max_se_bps_per_hz)
    return _Airtime.of(np.zeros(int(active.sum())), (term,))


@dataclass(frozen=True)
class _Radio:
    """The active devices' radio energy as a function of y = 1/B [A]: both directions' airtimes and
    the powers [A] (W) that turn airtime into energy (:func:`radio_energy_j`)."""

    dl: _Airtime
    ul: _Airtime
    rx_w: FloatArray
    tx_w: FloatArray

    def saving(self, y: FloatArray) -> FloatArray:
        """m(y) = −dE/dB = y²·dE/dy [A] (J/Hz): dE/dy is radio_energy_j of the airtime slopes."""
        slope_dl, slope_ul = self.dl.value_slope(y)[1], self.ul.value_slope(y)[1]
        return np.asarray(y**2 * radio_energy_j(slope_dl, slope_ul, self.rx_w, self.tx_w))


def illinois(
    fn: Callable[[FloatArray], FloatArray],
    lo: FloatArray,
    hi: FloatArray,
    f_lo: FloatArray,
    f_hi: FloatArray,
    f_tol: float = 0.0,
) -> FloatArray:
    """Roots [A] of an increasing ``fn`` (vectorised, elementwise) with fn(lo) ≤ 0 ≤ fn(hi):
    regula falsi with the Illinois halving, and a bisection where two steps did not halve a bracket
    (so each bracket at least halves in three steps, whatever the rounding of ``fn``), until each
    bracket is narrower than STOP·(1 + |x|) or |fn(x)| ≤ f_tol."""
    lo, hi, f_lo, f_hi = (np.array(a, dtype=np.float64) for a in (lo, hi, f_lo, f_hi))
    side = np.zeros(lo.shape, dtype=np.int8)  # −1: lo kept last step, +1: hi kept last step
    x, widths = lo.copy(), [hi - lo, hi - lo]
    for _ in range(MAX_ITER):
        width = hi - lo
        open_ = (width > STOP * (1.0 + np.abs(lo))) & (f_lo < 0) & (f_hi > 0)
        if not open_.any():
            return np.where(f_lo >= 0, lo, np.where(f_hi <= 0, hi, x))
        denom = np.where(open_, f_hi - f_lo, 1.0)
        slow = width > 0.5 * widths[0]
        guess = np.where(slow, lo + 0.5 * width, np.clip(lo - f_lo * width / denom, lo, hi))
        widths = [widths[1], np.where(slow, np.inf, width)]  # after a bisection: two free steps
        x = np.where(open_, guess, x)
        fx = fn(x)
        up = open_ & (fx > 0)
        down = open_ & (fx <= 0)
        fx = np.where(np.abs(fx) <= f_tol, 0.0, fx)  # close enough: a root (kept as lo, f_lo = 0)
        f_lo = np.where(up & (side == 1), 0.5 * f_lo, f_lo)  # Illinois: halve the stale end
        f_hi = np.where(down & (side == -1), 0.5 * f_hi, f_hi)
        hi, f_hi = np.where(up, x, hi), np.where(up, fx, f_hi)
        lo, f_lo = np.where(down, x, lo), np.where(down, fx, f_lo)
        side = np.where(up, 1, np.where(down, -1, side)).astype(np.int8)
    raise AssertionError(f"regula falsi did not converge: brackets [{lo}, {hi}]")


def _shares_hz(radio: _Radio, floor_hz: FloatArray, rest_hz: float, log_lambda: float) -> FloatArray:
    """B_u(λ) = max(b_u, m_u⁻¹(λ)) [A], clipped at b_u + R; solved for ln y at ln m(y) = ln λ."""
    lo, hi = -np.log(floor_hz + rest_hz), -np.log(floor_hz)  # ln y over [b_u, b_u + R]

    def excess(log_y: FloatArray) -> FloatArray:
        return np.log(radio.saving(np.exp(log_y))) - log_lambda

    log_y = illinois(excess, lo, hi, excess(lo), excess(hi))
    return np.asarray(np.clip(np.exp(-log_y), floor_hz, floor_hz + rest_hz))


def least_energy_split(radio: _Radio, floor_hz: FloatArray, band_hz: float) -> FloatArray:
    """The optimal B [A] given the floors b [A] (Σ b ≤ band): λ found on ln λ (module doc), then
    the parts above the floors scaled so that Σ B = band exactly."""
    rest_hz = float(band_hz - floor_hz.sum())
    if rest_hz <= STOP * band_hz or floor_hz.size == 1:
        return floor_hz + max(rest_hz, 0.0) / floor_hz.size
    log_top = float(np.log(radio.saving(1.0 / floor_hz)).max())
    log_bottom = float(np.log(radio.saving(1.0 / (floor_hz + rest_hz))).min())

    def shortfall(log_lambda: FloatArray) -> FloatArray:  # increasing in λ: band − Σ_u B_u(λ)
        return np.array([band_hz - _shares_hz(radio, floor_hz, rest_hz, float(z)).sum() for z in log_lambda])

    lo, hi = np.array([log_bottom]), np.array([log_top])
    f_lo, f_hi = shortfall(lo), shortfall(hi)
    log_lambda = float(illinois(shortfall, lo, hi, f_lo, f_hi, BAND_TOL * band_hz)[0])
    extra_hz = _shares_hz(radio, floor_hz, rest_hz, log_lambda) - floor_hz
    if extra_hz.sum() <= 0:  # λ at the top of its bracket: no device wants more than its floor
        return floor_hz + rest_hz / floor_hz.size
    return np.asarray(floor_hz + extra_hz * (rest_hz / extra_hz.sum()))


def energy_params(scenario: "ScenarioConfig", slack: float) -> dict[str, object]:
    """``make_allocator("energy", **energy_params(scenario, slack))``: the slack and the scenario's
    device radios (:meth:`EnergyModel.from_scenario`)."""
    return {"slack": slack, "energy": EnergyModel.from_scenario(scenario, scenario.cell.num_devices)}


@ALLOCATORS.register("energy")
@dataclass(frozen=True)
class EnergyAllocator:
    """Least radio energy with every active device done by (1 + slack)·T*; ``energy``: the
    devices' powers [U] (None: the paper cell's radio on every device, module doc)."""

    slack: float = 0.1
    energy: EnergyModel | None = None
    name: str = "energy"

    def __post_init__(self) -> None:
        check_range("energy allocator slack", self.slack, 0.0, MAX_SLACK)

    def allocate(self, demand: LayerDemand, channel: ChannelState) -> Allocation:
        bandwidth_hz = np.zeros(channel.num_devices)
        opt = layer_optimum(demand, channel)
        if opt is None:
            return Allocation(bandwidth_hz, self.name)
        active, air, fixed_s, optimum = opt.active, opt.air, opt.fixed_s, opt.solution
        if self.slack == 0.0:
            bandwidth_hz[active] = optimum.bandwidth_hz
            return Allocation(bandwidth_hz, self.name)
        target_s = (1.0 + self.slack) * optimum.finish_s
        y = inverse_bandwidth(air, target_s - fixed_s, 1.0 / optimum.bandwidth_hz)[0]
        floor_hz = np.minimum(1.0 / y, optimum.bandwidth_hz)  # b_u ≤ minmax's B_u: Σ b ≤ B
        bandwidth_hz[active] = least_energy_split(
            self._radio(demand, channel, active), floor_hz, channel.bandwidth_hz
        )
        return Allocation(bandwidth_hz, self.name)

    def _radio(self, demand: LayerDemand, channel: ChannelState, active: BoolArray) -> _Radio:
        energy = self.energy if self.energy is not None else default_energy()
        power = lambda w: np.broadcast_to(np.asarray(w, dtype=np.float64), active.shape)[active]  # noqa: E731
        dl = _direction(demand.downlink_bits, channel.dl, active)
        ul = _direction(demand.uplink_bits, channel.ul, active)
        return _Radio(dl, ul, power(energy.rx_power_w), power(energy.tx_power_w))
