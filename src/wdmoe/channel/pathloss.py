"""Large-scale path loss, LOS probability and shadowing σ (registered by name).

Every model takes 2-D BS–device distances d_2D [...] in metres (clamped to ≥ 1 m) and a LOS mask
of the same shape, and returns path loss in dB (without shadowing). 3GPP models follow
TR 38.901 v17 Table 7.4.1-1 (path loss, shadowing σ) and Table 7.4.2-1 (LOS probability), with
d_3D = sqrt(d_2D² + (h_BS − h_UT)²) and f_c in GHz inside the logarithms.
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from wdmoe.channel.units import SPEED_OF_LIGHT_MPS, BoolArray, FloatArray
from wdmoe.registry import Factories

MIN_DISTANCE_M = 1.0


class PathLoss(Protocol):
    def pathloss_db(self, distance_m: FloatArray, los: BoolArray) -> FloatArray: ...

    def los_probability(self, distance_m: FloatArray) -> FloatArray: ...

    def shadowing_std_db(self, los: BoolArray) -> FloatArray: ...


PATHLOSS: Factories[PathLoss] = Factories("path-loss model")


def _sigma_db(los: BoolArray, los_db: float, nlos_db: float, override_db: float | None) -> FloatArray:
    """Shadowing σ per link: the standard's LOS/NLOS values unless the config fixes one σ."""
    if override_db is not None:
        return np.full(np.shape(los), override_db)
    return np.where(los, los_db, nlos_db)


@PATHLOSS.register("macro")
@dataclass(frozen=True)
class Macro:
    """PL = 128.1 + 37.6·log10(d_km) dB (3GPP TR 36.814 macro, 2 GHz); always NLOS; σ = 8 dB."""

    fixed_shadowing_std_db: float | None = None  # one σ for every link instead of the model's

    def pathloss_db(self, distance_m: FloatArray, los: BoolArray) -> FloatArray:
        return 128.1 + 37.6 * np.log10(np.maximum(distance_m, MIN_DISTANCE_M) / 1000.0)

    def los_probability(self, distance_m: FloatArray) -> FloatArray:
        return np.zeros(np.shape(distance_m))

    def shadowing_std_db(self, los: BoolArray) -> FloatArray:
        return _sigma_db(los, 8.0, 8.0, self.fixed_shadowing_std_db)


@dataclass(frozen=True)
class _Outdoor3gpp:
    """Shared geometry of UMa/UMi: heights, d_3D and the breakpoint distance.

    d'_BP = 4·h'_BS·h'_UT·f_c / c with h' = h − h_E and h_E = 1 m (exact for UMi, and for UMa
    when h_UT ≤ 13 m; above that TR 38.901 draws h_E at random, which is not modelled here).
    """

    carrier_hz: float = 3.5e9
    bs_height_m: float = 25.0
    ut_height_m: float = 1.5
    fixed_shadowing_std_db: float | None = None  # one σ for every link instead of the model's

    def distance_3d_m(self, distance_m: FloatArray) -> FloatArray:
        d2_m = np.maximum(distance_m, MIN_DISTANCE_M)
        return np.asarray(np.hypot(d2_m, self.bs_height_m - self.ut_height_m))

    def breakpoint_m(self) -> float:
        return (
            4.0 * (self.bs_height_m - 1.0) * (self.ut_height_m - 1.0) * self.carrier_hz / SPEED_OF_LIGHT_MPS
        )

    def _los_db(
        self, distance_m: FloatArray, intercept_db: float, slope1: float, bp_coef: float
    ) -> FloatArray:
        """Two-slope LOS: PL1 = A + s1·log10 d3 + 20 log10 f below d'_BP,
        PL2 = A + 40·log10 d3 + 20 log10 f − c·log10(d'_BP² + (h_BS − h_UT)²) beyond."""
        d3_m, f_ghz, bp_m = self.distance_3d_m(distance_m), self.carrier_hz / 1e9, self.breakpoint_m()
        pl1 = intercept_db + slope1 * np.log10(d3_m) + 20.0 * np.log10(f_ghz)
        pl2 = (
            intercept_db
            + 40.0 * np.log10(d3_m)
            + 20.0 * np.log10(f_ghz)
            - bp_coef * np.log10(bp_m**2 + (self.bs_height_m - self.ut_height_m) ** 2)
        )
        return np.where(np.maximum(distance_m, MIN_DISTANCE_M) < bp_m, pl1, pl2)


@PATHLOSS.register("uma")
@dataclass(frozen=True)
class UMa(_Outdoor3gpp):
    """3GPP TR 38.901 Urban Macro; σ = 4 dB (LOS), 6 dB (NLOS)."""

    def pathloss_db(self, distance_m: FloatArray, los: BoolArray) -> FloatArray:
        pl_los = self._los_db(distance_m, 28.0, 22.0, 9.0)
        d3_m, f_ghz = self.distance_3d_m(distance_m), self.carrier_hz / 1e9
        pl_nlos = 13.54 + 39.08 * np.log10(d3_m) + 20.0 * np.log10(f_ghz) - 0.6 * (self.ut_height_m - 1.5)
        return np.where(los, pl_los, np.maximum(pl_los, pl_nlos))

    def los_probability(self, distance_m: FloatArray) -> FloatArray:
        """P = [18/d + e^(−d/63)(1 − 18/d)]·[1 + C'(h_UT)·5/4·(d/100)³·e^(−d/150)], 1 for d ≤ 18 m."""
        d_m = np.maximum(distance_m, MIN_DISTANCE_M)
        c = 0.0 if self.ut_height_m <= 13.0 else ((self.ut_height_m - 13.0) / 10.0) ** 1.5
        p = (18.0 / d_m + np.exp(-d_m / 63.0) * (1.0 - 18.0 / d_m)) * (
            1.0 + c * 1.25 * (d_m / 100.0) ** 3 * np.exp(-d_m / 150.0)
        )
        return np.where(d_m <= 18.0, 1.0, p)

    def shadowing_std_db(self, los: BoolArray) -> FloatArray:
        return _sigma_db(los, 4.0, 6.0, self.fixed_shadowing_std_db)


@PATHLOSS.register("umi")
@dataclass(frozen=True)
class UMi(_Outdoor3gpp):
    """3GPP TR 38.901 Urban Micro street canyon; σ = 4 dB (LOS), 7.82 dB (NLOS)."""

    bs_height_m: float = 10.0

    def pathloss_db(self, distance_m: FloatArray, los: BoolArray) -> FloatArray:
        pl_los = self._los_db(distance_m, 32.4, 21.0, 9.5)
        d3_m, f_ghz = self.distance_3d_m(distance_m), self.carrier_hz / 1e9
        pl_nlos = 22.4 + 35.3 * np.log10(d3_m) + 21.3 * np.log10(f_ghz) - 0.3 * (self.ut_height_m - 1.5)
        return np.where(los, pl_los, np.maximum(pl_los, pl_nlos))

    def los_probability(self, distance_m: FloatArray) -> FloatArray:
        """P = 18/d + e^(−d/36)(1 − 18/d), 1 for d ≤ 18 m."""
        d_m = np.maximum(distance_m, MIN_DISTANCE_M)
        return np.where(d_m <= 18.0, 1.0, 18.0 / d_m + np.exp(-d_m / 36.0) * (1.0 - 18.0 / d_m))

    def shadowing_std_db(self, los: BoolArray) -> FloatArray:
        return _sigma_db(los, 4.0, 7.82, self.fixed_shadowing_std_db)


@PATHLOSS.register("inh")
@dataclass(frozen=True)
class InH(_Outdoor3gpp):
    """3GPP TR 38.901 Indoor Hotspot, mixed office; σ = 3 dB (LOS), 8.03 dB (NLOS).

    PL_LOS = 32.4 + 17.3·log10 d3 + 20·log10 f; PL_NLOS = max(PL_LOS, 17.3 + 38.3·log10 d3 + 24.9·log10 f).
    """

    bs_height_m: float = 3.0
    ut_height_m: float = 1.0

    def pathloss_db(self, distance_m: FloatArray, los: BoolArray) -> FloatArray:
        d3_m, f_ghz = self.distance_3d_m(distance_m), self.carrier_hz / 1e9
        pl_los = 32.4 + 17.3 * np.log10(d3_m) + 20.0 * np.log10(f_ghz)
        pl_nlos = 17.3 + 38.3 * np.log10(d3_m) + 24.9 * np.log10(f_ghz)
        return np.where(los, pl_los, np.maximum(pl_los, pl_nlos))

    def los_probability(self, distance_m: FloatArray) -> FloatArray:
        """1 (d ≤ 1.2 m); e^(−(d−1.2)/4.7) (d < 6.5 m); 0.32·e^(−(d−6.5)/32.6) beyond."""
        d_m = np.maximum(distance_m, MIN_DISTANCE_M)
        near = np.exp(-(d_m - 1.2) / 4.7)
        far = 0.32 * np.exp(-(d_m - 6.5) / 32.6)
        return np.where(d_m <= 1.2, 1.0, np.where(d_m < 6.5, near, far))

    def shadowing_std_db(self, los: BoolArray) -> FloatArray:
        return _sigma_db(los, 3.0, 8.03, self.fixed_shadowing_std_db)
