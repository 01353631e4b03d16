"""Physical constants and dB ↔ linear helpers (dB and linear values never share a name)."""

from typing import Any

import numpy as np
from numpy.typing import NDArray

SPEED_OF_LIGHT_MPS = 299_792_458.0
THERMAL_NOISE_DBM_PER_HZ = -174.0  # kT at 290 K

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
ComplexArray = NDArray[np.complex128]


def db_to_linear(value_db: Any) -> Any:
    """x = 10^(x_dB / 10); float in, float out; array in, array out."""
    return np.power(10.0, np.divide(value_db, 10.0))


def linear_to_db(value: Any) -> Any:
    """x_dB = 10·log10(x)."""
    return np.multiply(10.0, np.log10(value))


def dbm_to_w(power_dbm: Any) -> Any:
    """P_W = 10^((P_dBm − 30) / 10)."""
    return db_to_linear(np.subtract(power_dbm, 30.0))


def w_to_dbm(power_w: Any) -> Any:
    """P_dBm = 10·log10(P_W) + 30."""
    return np.add(linear_to_db(power_w), 30.0)
