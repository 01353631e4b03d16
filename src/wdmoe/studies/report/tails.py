"""Heavy tails and the devices behind them: what a report says when a row's mean is ruled by a
few requests (its tail ratio, the link down most, the slowest device)."""

import math

import numpy as np

from wdmoe.studies.report.rows import HEAVY_TAIL_RATIO, Row


def tail_ratio(row: Row) -> float:
    """mean / p50 of the row's latency (∞ for a zero median, nan when the median is unknown)."""
    if math.isnan(row.p50_s):
        return math.nan
    return row.mean_s / row.p50_s if row.p50_s > 0 else math.inf


def heavy_tailed(row: Row) -> bool:
    return tail_ratio(row) > HEAVY_TAIL_RATIO


def worst_link(row: Row) -> tuple[int, float] | None:
    """(device, share of layer times its link was down) of the device down most; None without
    per-device outage or when no link was ever down."""
    down = row.per_device_outage.get("link_down", ())
    if not down or max(down) <= 0:
        return None
    u = int(np.argmax(down))
    return u, float(down[u])


def slowest_device(row: Row) -> tuple[int, float] | None:
    """(device, its downlink + compute + uplink seconds per request) of the slowest device."""
    parts = [row.per_device.get(name, ()) for name in ("downlink_s", "compute_s", "uplink_s")]
    if not all(parts) or len({len(p) for p in parts}) != 1:
        return None
    total = np.sum(np.asarray(parts, dtype=np.float64), axis=0)
    u = int(np.argmax(total))
    return u, float(total[u])
