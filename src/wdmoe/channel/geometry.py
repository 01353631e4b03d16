"""Cell geometry and mobility: where the U devices are at every block of a trace.

The BS sits at the origin; positions are 2-D (x, y) in metres. A mobility model turns start
positions [U, 2] into a track [N, U, 2] sampled every ``block_s`` seconds (N blocks).
"""

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from wdmoe.channel.units import FloatArray
from wdmoe.registry import Factories


def drop_annulus(num_devices: int, r_min_m: float, r_max_m: float, rng: np.random.Generator) -> FloatArray:
    """Positions [U, 2] uniform in area over the annulus r_min ≤ r ≤ r_max.

    r = sqrt(U(r_min², r_max²)) makes the density ∝ r (uniform per area); φ ~ U(0, 2π).
    """
    radius_m = np.sqrt(rng.uniform(r_min_m**2, r_max_m**2, num_devices))
    angle = rng.uniform(0.0, 2.0 * np.pi, num_devices)
    return np.stack([radius_m * np.cos(angle), radius_m * np.sin(angle)], axis=-1)


def distance_m(positions_m: FloatArray) -> FloatArray:
    """2-D distance to the BS: [..., 2] → [...] metres."""
    return np.asarray(np.hypot(positions_m[..., 0], positions_m[..., 1]))


class Mobility(Protocol):
    """Advances positions with simulated time; pure given the generator."""

    def track(
        self, start_m: FloatArray, num_blocks: int, block_s: float, rng: np.random.Generator
    ) -> FloatArray:
        """Positions [N, U, 2] at t = n·block_s, n = 0..N-1, starting from ``start_m`` [U, 2]."""
        ...


MOBILITY: Factories[Mobility] = Factories("mobility model")


@MOBILITY.register("static")
@dataclass(frozen=True)
class Static:
    """Devices stay where they were dropped."""

    def track(
        self, start_m: FloatArray, num_blocks: int, block_s: float, rng: np.random.Generator
    ) -> FloatArray:
        return np.broadcast_to(start_m, (num_blocks, *start_m.shape))


@MOBILITY.register("constant_velocity")
@dataclass(frozen=True)
class ConstantVelocity:
    """Each device moves at ``speed_mps`` along a random heading; at the annulus' edge (outer
    circle, or the inner one) it turns back, so it paces its chord of the annulus back and forth.

    Position p + ĥ·s(t): s runs as a triangle wave between the chord's ends s_lo ≤ 0 ≤ s_hi,
    found from |p + ĥ·s| = r (s = −b ± sqrt(b² − |p|² + r²), b = p·ĥ).
    """

    speed_mps: float
    r_min_m: float
    r_max_m: float

    def track(
        self, start_m: FloatArray, num_blocks: int, block_s: float, rng: np.random.Generator
    ) -> FloatArray:
        heading = rng.uniform(0.0, 2.0 * np.pi, start_m.shape[0])
        unit = np.stack([np.cos(heading), np.sin(heading)], axis=-1)
        s_lo, s_hi = self._chord(start_m, unit)
        length = np.maximum(s_hi - s_lo, 1e-12)
        travelled = self.speed_mps * block_s * np.arange(num_blocks)[:, None]  # [N, 1]
        phase = np.mod(travelled - s_lo, 2.0 * length)  # [N, U]: 0 at s_lo, length at s_hi
        s = s_lo + np.where(phase <= length, phase, 2.0 * length - phase)
        return np.asarray(start_m + unit * s[..., None])

    def _chord(self, start_m: FloatArray, unit: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Parameters s_lo ≤ 0 ≤ s_hi where the line first leaves the annulus either way."""
        b = np.sum(start_m * unit, axis=-1)
        r2 = np.sum(start_m**2, axis=-1)
        root_out = np.sqrt(np.maximum(b**2 - r2 + self.r_max_m**2, 0.0))
        s_lo, s_hi = -b - root_out, -b + root_out
        disc_in = b**2 - r2 + self.r_min_m**2
        root_in = np.sqrt(np.maximum(disc_in, 0.0))
        hits_inner = disc_in > 0  # both inner crossings lie on one side of the start
        s_hi = np.where(hits_inner & (-b > 0), np.minimum(s_hi, -b - root_in), s_hi)
        s_lo = np.where(hits_inner & (-b < 0), np.maximum(s_lo, -b + root_in), s_lo)
        return s_lo, s_hi


@MOBILITY.register("random_waypoint")
@dataclass(frozen=True)
class RandomWaypoint:
    """Each device walks at ``speed_mps`` straight to a waypoint drawn uniformly in the annulus,
    then on to the next (no pause). A straight leg may cut through the inner disc r < r_min.

    Waypoints are drawn in fixed chunks of ``CHUNK`` per device until every device's legs cover
    the trace, so a longer trace extends a shorter one; positions interpolate along the legs.
    """

    speed_mps: float
    r_min_m: float
    r_max_m: float
    CHUNK: ClassVar[int] = 16

    def track(
        self, start_m: FloatArray, num_blocks: int, block_s: float, rng: np.random.Generator
    ) -> FloatArray:
        times_s = np.arange(num_blocks, dtype=np.float64) * block_s
        if self.speed_mps == 0.0:
            return np.broadcast_to(start_m, (num_blocks, *start_m.shape))
        points_m, arrive_s = start_m[None], np.zeros((1, start_m.shape[0]))
        while np.any(arrive_s[-1] < times_s[-1]):
            chunk = drop_annulus(self.CHUNK * start_m.shape[0], self.r_min_m, self.r_max_m, rng)
            points_m = np.concatenate([points_m, chunk.reshape(self.CHUNK, *start_m.shape)])
            leg_s = distance_m(np.diff(points_m, axis=0)) / self.speed_mps
            arrive_s = np.concatenate([np.zeros((1, start_m.shape[0])), np.cumsum(leg_s, axis=0)])
        return np.stack(
            [_along(points_m[:, u], arrive_s[:, u], times_s) for u in range(start_m.shape[0])], axis=1
        )


def _along(points_m: FloatArray, arrive_s: FloatArray, times_s: FloatArray) -> FloatArray:
    """Positions [N, 2] at ``times_s`` on the polyline through ``points_m`` [K, 2] reached at
    ``arrive_s`` [K] (non-decreasing)."""
    leg = np.clip(np.searchsorted(arrive_s, times_s, side="right") - 1, 0, len(arrive_s) - 2)
    span_s = np.maximum(arrive_s[leg + 1] - arrive_s[leg], 1e-300)
    frac = np.clip((times_s - arrive_s[leg]) / span_s, 0.0, 1.0)
    return np.asarray(points_m[leg] + (points_m[leg + 1] - points_m[leg]) * frac[:, None])
