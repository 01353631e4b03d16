"""The software's own cost per message: what a device call takes beyond the latency model (pure).

The model prices a device's message of layer l as t_u = DL + compute + τ0 + UL (:mod:`.model`).
A real call also pays its software — the BS's own work around the calls, encoding, both sides'
event loops, system calls, thread wake-ups — and the real compute differs from the modelled
device's. The runtime measures that difference per device and message,

    o_u = w_u / s − t_u        [s of the cell; s: the time scale, t_u: the price of the message
                                without o_u; w_u: wall seconds of the message seen from its layer —
                                from the layer's start (routing, pricing, encoding, the hop to the
                                link loop) to its answer (emulated links included), plus the
                                layer's tail after its last answer (the hop back, decoding)]

clipped at 0 (a cost, never a credit), and keeps a running estimate ô_u per device: an
exponentially weighted mean, ô_u ← (1 − α)·ô_u + α·o_u, started at the first sample or at the
round trip of a ping at connection. Priced with it (:class:`~wdmoe.latency.pricing.Calls`
``overhead_s`` [U]), every device with work takes t_u + ô_u, in its expected time (so in its call
budget) as in its true time, and T_l = max over busy devices includes it. The simulator prices a
fixed ô (``SimSettings.software_overhead_ms``, the same for every device) by the same rule.

The BS's own compute on its host (attention, routers, LM head, the policy, combining) is the
other part of the software's cost: per forward, b = forward − Σ layers' dispatch − modelled BS
compute (:func:`bs_own_sample_s`), kept as running estimates by the kind of forward (a decode step
of R rows; a prefill, per token) and added to the forward's prediction.
"""

from typing import Any

import numpy as np

from wdmoe.channel.units import FloatArray

WEIGHT = 0.1  # α: about the last ten messages count


def overhead_samples_s(wall_s: Any, modelled_s: Any, time_scale: float = 1.0) -> FloatArray:
    """o_u [U] (s of the cell) = max(w_u / s − t_u, 0); NaN where ``wall_s`` is NaN (no answer)."""
    wall = np.asarray(wall_s, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.asarray(np.maximum(wall / time_scale - np.asarray(modelled_s, dtype=np.float64), 0.0))


def running_estimate_s(estimate_s: float | None, sample_s: float, weight: float = WEIGHT) -> float:
    """ô ← (1 − α)·ô + α·o; the sample itself when there is no estimate yet."""
    assert 0.0 < weight <= 1.0, f"the weight α must be in (0, 1], got {weight}"
    if estimate_s is None:
        return float(sample_s)
    return float((1.0 - weight) * estimate_s + weight * sample_s)


def bs_own_sample_s(forward_s: float, layers_s: float, modelled_bs_s: float) -> float:
    """The BS's own cost of one forward beyond the model (s of the cell): its measured time minus
    the time inside its MoE layers' dispatch (priced per device above) minus the BS compute the
    model prices (attention, router, LM head at ``bs_flops_per_s``); clipped at 0."""
    return max(float(forward_s) - float(layers_s) - float(modelled_bs_s), 0.0)
