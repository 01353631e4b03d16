"""The immutable channel snapshot every decision reads, and the Shannon rate of a link.

One direction of every device's link is a :class:`Link`; the SNR a device sees depends on the
share B_u of the band it is given:
    SNR_u(B_u) = P·h_u / (N0·B_P),  B_P = the band P is spread over (BS downlink: the whole band B,
                                     a fixed power spectral density), or B_P = B_u (a device
                                     spending its whole power p_u on its own share: uplink);
    R_u(B_u)   = B_u·min(log2(1 + SNR_u/Γ), η_max)   [bit/s],
with Γ ≥ 1 the SNR gap (1: Shannon) and η_max the highest MCS's spectral efficiency.
"""

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from wdmoe.channel.units import BoolArray, FloatArray


def spectral_efficiency(snr: Any, snr_gap: float = 1.0, max_se_bps_per_hz: float = np.inf) -> Any:
    """η = min(log2(1 + SNR/Γ), η_max) [bit/s/Hz]; SNR linear, Γ linear."""
    return np.minimum(np.log1p(np.divide(snr, snr_gap)) / np.log(2.0), max_se_bps_per_hz)


def _freeze(obj: object) -> None:
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            value.setflags(write=False)


@dataclass(frozen=True)
class Link:
    """One direction of U links at one time. Arrays are [U] (read-only).

    gain:   h_u = 10^(−(PL_u + X_u)/10)·|g_u|², linear (path loss PL, shadowing X, fading g).
    snr_hz: P·h_u / N0 [Hz]; the SNR over a band B_P is snr_hz / B_P.
    power_band_hz: B_P when the transmit power is spread over a fixed band (a PSD), or None when
        each device puts its whole power on its own share (B_P = B_u).
    """

    gain: FloatArray
    snr_hz: FloatArray
    power_band_hz: float | None
    snr_gap: float = 1.0
    max_se_bps_per_hz: float = np.inf

    def __post_init__(self) -> None:
        _freeze(self)

    def snr(self, bandwidth_hz: Any) -> FloatArray:
        """Linear SNR [U] (or broadcast shape) when device u gets B_u Hz."""
        band_hz = bandwidth_hz if self.power_band_hz is None else self.power_band_hz
        return np.asarray(self.snr_hz / np.asarray(band_hz, dtype=np.float64))

    def spectral_efficiency(self, bandwidth_hz: Any) -> FloatArray:
        """η_u(B_u) [bit/s/Hz]."""
        return np.asarray(spectral_efficiency(self.snr(bandwidth_hz), self.snr_gap, self.max_se_bps_per_hz))

    def rate_bps(self, bandwidth_hz: Any) -> FloatArray:
        """R_u = B_u·η_u(B_u) [bit/s]; 0 where B_u = 0."""
        band_hz = np.asarray(bandwidth_hz, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            rate = band_hz * self.spectral_efficiency(np.maximum(band_hz, 1e-300))
        return np.asarray(np.where(band_hz > 0, rate, 0.0))


@dataclass(frozen=True)
class ChannelState:
    """The cell at one simulated time: all a policy, an allocator or the latency model reads.

    time_s: simulated time of the block; positions_m [U, 2]; distance_m [U] (2-D, to the BS);
    los [U]; pathloss_db [U] (without shadowing); shadowing_db [U]; dl / ul: the two directions;
    bandwidth_hz: B, the band of each direction that the devices share (Σ_u B_u ≤ B).
    """

    time_s: float
    positions_m: FloatArray
    distance_m: FloatArray
    los: BoolArray
    pathloss_db: FloatArray
    shadowing_db: FloatArray
    dl: Link
    ul: Link
    bandwidth_hz: float

    def __post_init__(self) -> None:
        _freeze(self)

    @property
    def num_devices(self) -> int:
        return int(self.distance_m.shape[0])

    def equal_share_hz(self) -> FloatArray:
        """B/U for every device [U]."""
        return np.full(self.num_devices, self.bandwidth_hz / self.num_devices)
