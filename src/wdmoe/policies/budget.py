"""`budget`: the most router mass that fits a per-layer latency budget τ (beyond the paper, in the
spirit of DES/JESA, arXiv 2503.13421).

    maximise Σ_{(j,k) kept} w_jk   s.t.   t_u(n_u) ≤ τ for every device u with n_u > 0,
                                         n_u = #kept pairs whose expert sits on u, ≥ 1 kept per token,
with w the importance and t_u the device time of the latency view (bandwidth fixed). t_u is
increasing in n_u, so the constraint is a capacity n_u ≤ c_u = max{n : t_u(n) ≤ τ}, one per device,
and without the ≥ 1 rule the optimum keeps each device's c_u most important pairs.

- Decode (T = 1): that rule is exact, the ≥ 1 rule included, because any kept pair satisfies it;
  if no candidate fits τ at all, the token keeps the candidate whose device finishes first.
- Prefill (T > 1): exact whenever it leaves no token empty; otherwise each empty token (in token
  order) greedily keeps the candidate whose device finishes first with the extra token, which
  may exceed τ (a heuristic: the ≥ 1 rule couples the devices).
"""

from dataclasses import dataclass

import numpy as np
import torch

from wdmoe.channel.units import BoolArray, FloatArray
from wdmoe.config import check_range
from wdmoe.latency.view import ExpertLatency, IntArray
from wdmoe.policies.base import Stateless, mask_selection, require_latency
from wdmoe.policies.registry import POLICIES
from wdmoe.types import RouterOutput, Selection


def device_capacity(latency: ExpertLatency, tau_s: float, max_tokens: int) -> IntArray:
    """c_u [U] = max{n ≤ max_tokens : t_u(n) ≤ τ} (0 when even one token misses τ)."""
    loads = np.arange(1, max_tokens + 1, dtype=np.float64)[:, None] * np.ones(latency.channel.num_devices)
    return np.asarray((latency.device_time_s(loads) <= tau_s).sum(axis=0), dtype=np.int64)


def keep_within_capacity(importance: FloatArray, device: IntArray, capacity: IntArray) -> BoolArray:
    """keep [T, K]: each device keeps its c_u most important pairs (ties: token order).

    importance, device: [T, K] (device of each candidate); capacity [U].
    """
    imp, dev = importance.reshape(-1), device.reshape(-1)
    order = np.lexsort((-imp, dev))  # grouped by device, most important first
    first = np.searchsorted(dev[order], dev[order], side="left")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - first
    return np.asarray((rank < capacity[dev]).reshape(importance.shape))


def repair_empty(keep: BoolArray, device: IntArray, latency: ExpertLatency) -> BoolArray:
    """Give every empty token the candidate whose device finishes first with one more token."""
    keep = keep.copy()
    load = np.bincount(device[keep], minlength=latency.channel.num_devices).astype(np.float64)
    for j in np.flatnonzero(~keep.any(axis=-1)):
        trial = np.repeat(load[None, :], device.shape[1], axis=0)
        trial[np.arange(device.shape[1]), device[j]] += 1.0
        times = latency.device_time_s(trial)[np.arange(device.shape[1]), device[j]]
        best = int(np.argmin(times))
        keep[j, best] = True
        load[device[j, best]] += 1.0
    return keep


def budget_keep(route: RouterOutput, latency: ExpertLatency, tau_s: float) -> torch.Tensor:
    """keep [T, K] of the budget rule (see the module docstring)."""
    device = latency.placement[route.candidates.cpu().numpy()]
    importance = route.importance.double().cpu().numpy()
    capacity = device_capacity(latency, tau_s, int(device.size))
    keep = repair_empty(keep_within_capacity(importance, device, capacity), device, latency)
    return torch.as_tensor(keep, dtype=torch.bool, device=route.candidates.device)


@POLICIES.register("budget")
@dataclass(frozen=True)
class Budget(Stateless):
    """Max retained importance with every selected device finishing within τ > 0 seconds."""

    tau_s: float = 0.05
    name: str = "budget"

    def __post_init__(self) -> None:
        check_range("budget.tau_s", self.tau_s, 0.0, np.inf, lo_open=True)

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        return mask_selection(route, budget_keep(route, require_latency(self.name, view), self.tau_s))
