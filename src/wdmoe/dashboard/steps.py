"""What the page is told about the cell and about one forward (pure; the BS and the simulator
both build their events here, so the page reads one shape whichever face runs).

``cell`` (once per viewer): the BS at the origin, the cell radius, each device's class.
``step`` (once per forward), from the forward's layers priced one by one ([U] each, as
:func:`~wdmoe.latency.pricing.price_layer` returns them) and the true channel of its last layer:

- ``devices``: per slot [U] the band share (B_u / B, mean over the layers where it had work),
  DL / compute / UL seconds of the cell summed over the layers, tokens it was sent, whether its
  link carried traffic, its true DL SNR at an equal share B/U (dB), whether its link is up
  (not in outage), its position (m, BS at the origin);
- ``layers``: per MoE layer [L] the wait T_l (s), the slot that set it (−1: no device had work),
  the calls the deadline rule predicted cut (late or lost to outage).

Both are vectorised over the forward's prices stacked [L, U] (the BS hands over the stack it has
just priced the forward with). Callers add what only they know: calls that failed for real,
experts the policy left out, requests.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from wdmoe.channel.state import ChannelState
from wdmoe.config import ScenarioConfig
from wdmoe.latency.devices import devices_for
from wdmoe.latency.pricing import Priced, stack_layers


def db(x: Any) -> list[float]:
    """10·log10(x) of a linear array, as a list (−300 dB for 0)."""
    return [float(v) for v in 10 * np.log10(np.maximum(np.asarray(x, dtype=np.float64), 1e-30))]


def cell_values(scenario: ScenarioConfig, label: str, source: str) -> dict[str, Any]:
    """The cell's layout: radius (m), band (Hz), each slot's device class; ``source``: bs, sim or replay."""
    cell = scenario.cell
    classes = devices_for(cell.device_classes, cell.num_devices)
    return {
        "source": source,
        "label": label,
        "scenario": scenario.name,
        "radius_m": float(cell.r_max_m),
        "bandwidth_hz": float(cell.bandwidth_hz),
        "num_devices": int(cell.num_devices),
        "classes": [c.name for c in classes],
    }


def stacked(layers: Priced | Sequence[Priced]) -> Priced:
    """A forward's layer prices as one [L, U] value (:func:`~wdmoe.latency.pricing.stack_layers`)."""
    return layers if isinstance(layers, Priced) else stack_layers(layers, 0.0, 0.0)


def device_values(p: Priced, true: ChannelState, true_up: Any) -> dict[str, Any]:
    """The per-device part of a step from the forward's prices [L, U] (see the module doc)."""
    busy = p.device_tokens > 0  # [L, U]
    per_busy = np.maximum(busy.sum(0), 1)
    d = p.latency.devices
    return {
        "share": (np.where(busy, p.bandwidth_hz, 0.0).sum(0) / true.bandwidth_hz / per_busy).tolist(),
        "dl_s": np.where(busy, d.downlink_s, 0.0).sum(0).tolist(),
        "compute_s": np.where(busy, d.compute_s, 0.0).sum(0).tolist(),
        "ul_s": np.where(busy, d.uplink_s, 0.0).sum(0).tolist(),
        "tokens": p.device_tokens.sum(0).tolist(),
        "busy": busy.any(0).tolist(),
        "snr_db": db(true.dl.snr(true.equal_share_hz())),
        "up": np.asarray(true_up, dtype=bool).reshape(-1).tolist(),
        "positions_m": np.asarray(true.positions_m).tolist(),
    }


def layer_values(p: Priced) -> dict[str, Any]:
    """The per-layer part of a step from the forward's prices [L, U] (see the module doc)."""
    busy = p.device_tokens > 0
    held = np.where(busy, np.minimum(p.latency.devices.total_s, p.budget_s), -np.inf)
    slowest = np.where(busy.any(1), np.argmax(held, axis=1), -1)
    return {
        "wait_s": np.asarray(p.wait_s, dtype=np.float64).tolist(),
        "slowest": slowest.tolist(),
        "predicted_cut": (p.cut & busy).sum(1).tolist(),
    }


def step_values(
    layers: Priced | Sequence[Priced], true: ChannelState, true_up: Any, **extra: Any
) -> dict[str, Any]:
    """One forward's ``step`` event (see the module doc) from its layers' prices (one by one, or
    stacked [L, U]); ``extra``: the caller's own fields."""
    if isinstance(layers, Sequence) and not layers:
        return {"devices": None, "layers": None} | extra
    p = stacked(layers)
    return {"devices": device_values(p, true, true_up), "layers": layer_values(p)} | extra
