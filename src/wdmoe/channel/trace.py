"""A replayable channel trace: N fading blocks × U devices, generated once from a seed.

Generation is separate from use: :func:`generate_trace` draws everything up front from
independent child streams of ``SeedSequence(seed)`` (geometry, mobility, LOS, shadowing, downlink
and uplink fading), so the same seed gives the same trace, the first n blocks do not depend on
how many are generated, and every policy can be replayed on the same channel. The trace hands
out immutable :class:`ChannelState` snapshots.

Per device u and block n (time n·T, T = ``channel.coherence_s``):
    PL[n, u]  path loss at the device's distance (LOS if a fixed uniform draw < P_LOS(d));
    X[n, u]   = σ(LOS)·z_u, z_u ~ N(0, 1) drawn once per device (log-normal shadowing);
    |g|²      block fading, correlated across blocks by ``channel.correlation`` ("jakes": sum of
              sinusoids, "ar1": Gauss-Markov, "iid"), independent per direction (FDD);
    h         = 10^(−(PL + X)/10)·|g|²;
    downlink  P_BS spread over the band B: SNR = (P_BS/B)·h/N0_dev;
    uplink    p_u on the device's own share: SNR = p_u·h/(N0_BS·B_u);
    N0        = −174 dBm/Hz + the receiver's noise figure.
"""

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from wdmoe.channel.fading import FADING, gauss_markov, jakes_rho, sum_of_sinusoids
from wdmoe.channel.fading import doppler_hz as doppler_of
from wdmoe.channel.geometry import MOBILITY, distance_m, drop_annulus
from wdmoe.channel.pathloss import PATHLOSS, PathLoss
from wdmoe.channel.state import ChannelState, Link
from wdmoe.channel.units import BoolArray, ComplexArray, FloatArray, db_to_linear, dbm_to_w

if TYPE_CHECKING:  # config validates names against the registries above, so it imports this package
    from wdmoe.config import CellConfig, ChannelConfig, ScenarioConfig

STREAMS = ("geometry", "mobility", "los", "shadowing", "fading_dl", "fading_ul")


def build(cls: Any, **available: Any) -> Any:
    """Instantiate a registered dataclass with the keyword values it declares (None: its default)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in available.items() if k in names and v is not None})


def make_pathloss(cell: "CellConfig", channel: "ChannelConfig") -> PathLoss:
    cls = PATHLOSS.get(channel.pathloss)
    return build(
        cls,
        carrier_hz=cell.carrier_hz,
        bs_height_m=cell.bs_height_m,
        ut_height_m=cell.ut_height_m,
        fixed_shadowing_std_db=channel.shadowing_std_db,
    )


@dataclass(frozen=True)
class LinkBudget:
    """The constants that turn a gain into an SNR: powers [W], noise densities [W/Hz], Γ, η_max."""

    bandwidth_hz: float
    bs_power_w: float
    device_power_w: float
    device_noise_w_per_hz: float
    bs_noise_w_per_hz: float
    snr_gap: float
    max_se_bps_per_hz: float

    @classmethod
    def from_config(cls, cell: "CellConfig") -> "LinkBudget":
        return cls(
            bandwidth_hz=cell.bandwidth_hz,
            bs_power_w=float(dbm_to_w(cell.bs_power_dbm)),
            device_power_w=float(dbm_to_w(cell.device_power_dbm)),
            device_noise_w_per_hz=float(dbm_to_w(cell.noise_psd_dbm_per_hz + cell.device_noise_figure_db)),
            bs_noise_w_per_hz=float(dbm_to_w(cell.noise_psd_dbm_per_hz + cell.bs_noise_figure_db)),
            snr_gap=float(db_to_linear(cell.snr_gap_db)),
            max_se_bps_per_hz=cell.max_se_bps_per_hz,
        )

    def downlink(self, gain: FloatArray) -> Link:
        snr_hz = self.bs_power_w * gain / self.device_noise_w_per_hz
        return Link(gain, snr_hz, self.bandwidth_hz, self.snr_gap, self.max_se_bps_per_hz)

    def uplink(self, gain: FloatArray) -> Link:
        snr_hz = self.device_power_w * gain / self.bs_noise_w_per_hz
        return Link(gain, snr_hz, None, self.snr_gap, self.max_se_bps_per_hz)


@dataclass(frozen=True)
class ChannelTrace:
    """Arrays [N, U] (positions [N, U, 2]) of a generated trace; ``state(n)`` snapshots block n."""

    block_s: float
    budget: LinkBudget
    positions_m: FloatArray
    distance_m: FloatArray
    los: BoolArray
    pathloss_db: FloatArray
    shadowing_db: FloatArray
    fading_dl: FloatArray
    fading_ul: FloatArray

    @property
    def num_blocks(self) -> int:
        return int(self.distance_m.shape[0])

    def gain(self, fading: FloatArray) -> FloatArray:
        """h = 10^(−(PL + X)/10)·|g|² over the whole trace [N, U]."""
        return np.asarray(db_to_linear(-(self.pathloss_db + self.shadowing_db)) * fading)

    def state(self, n: int) -> ChannelState:
        """The immutable snapshot of block n (0 ≤ n < N)."""
        assert 0 <= n < self.num_blocks, f"block {n} outside the trace's {self.num_blocks} blocks"
        scale = db_to_linear(-(self.pathloss_db[n] + self.shadowing_db[n]))
        return ChannelState(
            time_s=n * self.block_s,
            positions_m=self.positions_m[n],
            distance_m=self.distance_m[n],
            los=self.los[n],
            pathloss_db=self.pathloss_db[n],
            shadowing_db=self.shadowing_db[n],
            dl=self.budget.downlink(scale * self.fading_dl[n]),
            ul=self.budget.uplink(scale * self.fading_ul[n]),
            bandwidth_hz=self.budget.bandwidth_hz,
        )

    def at(self, time_s: float) -> ChannelState:
        """The snapshot of the block that contains simulated time ``time_s``."""
        return self.state(min(int(time_s // self.block_s), self.num_blocks - 1))


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(STREAMS, children, strict=True)}


def _start_positions(cell: "CellConfig", rng: np.random.Generator) -> FloatArray:
    if cell.positions_m:
        return np.array(cell.positions_m, dtype=np.float64)
    return drop_annulus(cell.num_devices, cell.r_min_m, cell.r_max_m, rng)


def _los(mode: str, probability: FloatArray, uniform: FloatArray) -> BoolArray:
    """LOS per link: forced, or u < P_LOS(d) with a fixed uniform u per device (smooth in d)."""
    if mode == "random":
        return np.asarray(uniform < probability)
    return np.full(probability.shape, mode == "los")


def _diffuse(scenario: "ScenarioConfig", num_blocks: int, rng: np.random.Generator) -> ComplexArray:
    """The diffuse part w [N, U] of one direction, correlated as ``channel.correlation`` says."""
    u, channel = scenario.cell.num_devices, scenario.channel
    f_d_hz = np.full(u, doppler_of(scenario.mobility.speed_mps, scenario.cell.carrier_hz))
    if channel.correlation == "jakes":
        return sum_of_sinusoids(f_d_hz, channel.coherence_s, num_blocks, rng)
    rho = jakes_rho(f_d_hz, channel.coherence_s) if channel.correlation == "ar1" else np.zeros(u)
    return gauss_markov(rho, num_blocks, rng)


def _fading(scenario: "ScenarioConfig", num_blocks: int, rng: np.random.Generator) -> FloatArray:
    """|g|² [N, U] for one direction: LOS phases first, then the diffuse part."""
    los_phase = rng.uniform(0.0, 2.0 * np.pi, scenario.cell.num_devices)
    diffuse = _diffuse(scenario, num_blocks, rng)
    model = build(FADING.get(scenario.channel.fading), rician_k_db=scenario.channel.rician_k_db)
    return np.asarray(model.power(diffuse, los_phase))


def generate_trace(scenario: "ScenarioConfig", num_blocks: int, seed: int | None = None) -> ChannelTrace:
    """Draw a channel trace of ``num_blocks`` blocks for ``scenario`` (seed: the scenario's)."""
    assert num_blocks >= 1, f"num_blocks must be ≥ 1, got {num_blocks}"
    cell, channel, mob = scenario.cell, scenario.channel, scenario.mobility
    rng = _streams(scenario.seed if seed is None else seed)
    mobility = build(
        MOBILITY.get(mob.model), speed_mps=mob.speed_mps, r_min_m=cell.r_min_m, r_max_m=cell.r_max_m
    )
    positions_m = mobility.track(
        _start_positions(cell, rng["geometry"]), num_blocks, channel.coherence_s, rng["mobility"]
    )
    d_m = distance_m(positions_m)
    pathloss = make_pathloss(cell, channel)
    los = _los(channel.los, pathloss.los_probability(d_m), rng["los"].random(cell.num_devices))
    shadowing_db = pathloss.shadowing_std_db(los) * rng["shadowing"].standard_normal(cell.num_devices)
    return ChannelTrace(
        block_s=channel.coherence_s,
        budget=LinkBudget.from_config(cell),
        positions_m=positions_m,
        distance_m=d_m,
        los=los,
        pathloss_db=pathloss.pathloss_db(d_m, los),
        shadowing_db=shadowing_db,
        fading_dl=_fading(scenario, num_blocks, rng["fading_dl"]),
        fading_ul=_fading(scenario, num_blocks, rng["fading_ul"]),
    )
