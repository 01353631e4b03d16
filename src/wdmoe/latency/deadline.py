"""Link outage and call deadlines: what becomes of a device call in a real cell (pure).

Outage. Below the lowest modulation and coding scheme no transport block decodes: the link is
*down* for that fading block, not slow. Device u's link is up when the spectral efficiency of
both directions on its reference share, the equal split B/U, reaches η_min
(``cell.min_se_bps_per_hz``; default 0.1523 bit/s/Hz, CQI index 1 — QPSK, code rate 78/1024 — of
3GPP TS 38.214 V17.0.0, Table 5.2.2.1-2, "4-bit CQI Table"). On the BS's estimate this says whom
the BS can reach (a policy sees t = ∞ there; its experts are masked, or moved to a live replica);
on the true channel, whether a call really gets through.

Deadline. A device call is given the budget
    b_u = time_scale·slack·t̂_u + grace_s      (wall seconds; at most max_wait_s),
with t̂_u its time on the BS's estimate at the allocated share; ``wait`` mode gives every call
max_wait_s. Settling a layer: a device with work whose link is truly down never answers (the BS
waits b_u); a live one answers at its true t_u if t_u ≤ b_u and is cut at b_u otherwise (late).
The layer waits T_l = max over devices with work of what the BS waited for each. The experts of a
cut device are dropped (``drop``, ``wait``) or run from the BS's own copy (``fallback``; its
micro-seconds of BS compute are not charged). With perfect CSI (t_u = t̂_u, slack ≥ 1) no call is
late. The simulator and the BS settle their calls with these functions (the BS's real timeouts
enforce the same budgets).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from wdmoe.channel.state import ChannelState, Link
from wdmoe.channel.units import BoolArray, FloatArray
from wdmoe.config import check_choice, check_range

MODES = ("wait", "drop", "fallback")
# 3GPP TS 38.214 Table 5.2.2.1-2 (4-bit CQI table 1), CQI 1: QPSK, code rate 78/1024 → 0.1523.
LOWEST_CQI_SE_BPS_PER_HZ = 0.1523


def link_up(channel: ChannelState, min_se_bps_per_hz: float) -> BoolArray:
    """[U] whether device u's link is up: η ≥ η_min in both directions at the equal share B/U."""
    return links_up(channel.dl, channel.ul, channel.equal_share_hz(), min_se_bps_per_hz)


def links_up(dl: Link, ul: Link, share_hz: Any, min_se_bps_per_hz: float) -> BoolArray:
    """[..., U] whether links of any shape (e.g. a whole trace [N, U]) are up at the share B_u."""
    up_dl = dl.spectral_efficiency(share_hz) >= min_se_bps_per_hz
    return np.asarray(up_dl & (ul.spectral_efficiency(share_hz) >= min_se_bps_per_hz))


@dataclass(frozen=True)
class DeadlineRule:
    """How long the BS waits for a device call, and what it does with a late one (module doc)."""

    mode: str = "drop"
    slack: float = 3.0
    grace_s: float = 0.25
    max_wait_s: float = 30.0

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_range("slack", self.slack, 1.0, 1e6)
        check_range("grace_s", self.grace_s, 0.0, 3600.0)
        check_range("max_wait_s", self.max_wait_s, 0.0, 86400.0, lo_open=True)

    def budgets_s(self, expected_s: Any, time_scale: float = 1.0) -> FloatArray:
        """Wall seconds each call [..., U] may take: time_scale·slack·t̂_u + grace_s, at most
        max_wait_s (``wait`` mode, or a t̂_u that cannot be priced: max_wait_s)."""
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = time_scale * self.slack * np.asarray(expected_s, dtype=np.float64) + self.grace_s
            budget = np.minimum(scaled, self.max_wait_s)
        budget = np.where(np.isfinite(budget), budget, self.max_wait_s)
        return np.asarray(np.full_like(budget, self.max_wait_s) if self.mode == "wait" else budget)


@dataclass(frozen=True)
class Settled:
    """A layer's device calls settled [..., U]: the seconds the BS waited for each device (0
    without work), which were cut late, which were lost to a down link; the layer's wait [...]."""

    waited_s: FloatArray
    late: BoolArray
    down: BoolArray

    @property
    def cut(self) -> BoolArray:
        """Calls that brought nothing back in time (their experts are dropped or run at the BS)."""
        return np.asarray(self.late | self.down)

    @property
    def layer_s(self) -> FloatArray:
        return np.asarray(np.max(self.waited_s, axis=-1, initial=0.0))


def settle(true_s: Any, budget_s: Any, tokens: Any, up: Any, late: Any = None, down: Any = None) -> Settled:
    """Device calls with true times t_u [..., U], budgets b_u (same unit), loads n_u and true link
    states ``up`` [U] (module doc). ``late`` / ``down`` [..., U], when given, are how the calls
    were settled already (for the batch a request travelled in): a request's share of a batch
    is cut with the batch."""
    t, b = np.asarray(true_s, dtype=np.float64), np.asarray(budget_s, dtype=np.float64)
    work = np.asarray(tokens) > 0
    lost = work & (~np.asarray(up, dtype=bool) if down is None else np.asarray(down, dtype=bool))
    slow = work & ~lost & ((t > b) if late is None else np.asarray(late, dtype=bool))
    waited = np.where(work, np.where(lost | slow, b, t), 0.0)
    return Settled(np.asarray(waited), np.asarray(slow), np.asarray(lost))
