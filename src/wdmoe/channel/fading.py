"""Small-scale block fading, correlated across blocks (registered by name).

Within a block of length T (the coherence time) the fading coefficient g is constant. Across
blocks the diffuse (scattered) part w ~ CN(0, 1) follows a first-order Gauss-Markov process,
    w[n] = ρ·w[n−1] + sqrt(1 − ρ²)·e[n],   e[n] ~ CN(0, 1) i.i.d.,
with Jakes' correlation ρ = J0(2π·f_D·T) and Doppler f_D = v·f_c / c. A fading model maps the
diffuse part (and a per-device LOS phase) to the power gain |g|², E|g|² = 1.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy.signal import lfilter
from scipy.special import j0

from wdmoe.channel.units import SPEED_OF_LIGHT_MPS, ComplexArray, FloatArray, db_to_linear
from wdmoe.registry import Factories


def complex_normal(shape: tuple[int, ...], rng: np.random.Generator) -> ComplexArray:
    """CN(0, 1) samples: real and imaginary parts N(0, 1/2), drawn interleaved so that the first
    rows of a longer draw equal a shorter draw (traces stay prefix-stable)."""
    parts = rng.standard_normal((*shape, 2)) * np.sqrt(0.5)
    return np.asarray(parts[..., 0] + 1j * parts[..., 1])


def doppler_hz(speed_mps: float | FloatArray, carrier_hz: float) -> Any:
    """Maximum Doppler shift f_D = v·f_c / c [Hz]."""
    return np.multiply(speed_mps, carrier_hz / SPEED_OF_LIGHT_MPS)


def jakes_rho(doppler_hz: float | FloatArray, block_s: float) -> Any:
    """Correlation of consecutive blocks under Jakes' (Clarke's) spectrum: ρ = J0(2π·f_D·T)."""
    return j0(2.0 * np.pi * np.multiply(doppler_hz, block_s))


def gauss_markov(rho: FloatArray, num_blocks: int, rng: np.random.Generator) -> ComplexArray:
    """Diffuse fading [N, U]: stationary CN(0, 1) AR(1) with per-device correlation ρ [U].

    w[0] = e[0]; w[n] = ρ·w[n−1] + sqrt(1 − ρ²)·e[n], run as an IIR filter over the blocks for
    each distinct ρ (b = [sqrt(1 − ρ²)], a = [1, −ρ], initial state chosen so that w[0] = e[0]).
    """
    innovation = complex_normal((num_blocks, rho.shape[0]), rng)
    out = np.empty_like(innovation)
    for value in np.unique(rho):
        cols = rho == value
        scale = np.sqrt(1.0 - value**2)
        start = (1.0 - scale) * innovation[:1, cols]
        out[:, cols] = lfilter([scale], [1.0, -value], innovation[:, cols], axis=0, zi=start)[0]
    return out


class Fading(Protocol):
    def power(self, diffuse: ComplexArray, los_phase: FloatArray) -> FloatArray:
        """|g|² [N, U] from the diffuse part [N, U] and a LOS phase [U] (radians)."""
        ...


FADING: Factories[Fading] = Factories("fading model")


@FADING.register("none")
@dataclass(frozen=True)
class NoFading:
    """|g|² = 1: path loss and shadowing only."""

    def power(self, diffuse: ComplexArray, los_phase: FloatArray) -> FloatArray:
        return np.ones(diffuse.shape)


@FADING.register("rayleigh")
@dataclass(frozen=True)
class Rayleigh:
    """g = w: |g|² ~ Exp(1)."""

    def power(self, diffuse: ComplexArray, los_phase: FloatArray) -> FloatArray:
        return np.asarray(np.abs(diffuse) ** 2)


@FADING.register("rician")
@dataclass(frozen=True)
class Rician:
    """g = sqrt(K/(K+1))·e^(jφ) + sqrt(1/(K+1))·w, K = 10^(K_dB/10): 2(K+1)|g|² ~ χ'²(2, 2K)."""

    rician_k_db: float = 6.0

    def power(self, diffuse: ComplexArray, los_phase: FloatArray) -> FloatArray:
        k = db_to_linear(self.rician_k_db)
        g = np.sqrt(k / (k + 1.0)) * np.exp(1j * los_phase) + np.sqrt(1.0 / (k + 1.0)) * diffuse
        return np.asarray(np.abs(g) ** 2)
