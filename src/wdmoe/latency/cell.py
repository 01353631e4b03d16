"""The cell: a scenario, its channel trace and what the BS knows of it (pure, seeded).

The simulator and the BS both look at the cell through :meth:`Cell.snapshot`: at time t the
fading block b(t) gives the *true* channel; the BS's *estimate* is the one of its last refresh
(every ``cell.csi_period_s``, default one block), ``delay_blocks`` blocks late (stale CSI), with
log-normal gain errors of σ dB (noisy CSI; one draw per estimated block, so every face that asks
about the same time sees the same estimate); the latency view a policy decides on is the
estimate with the scenario's expert cost and device compute at the equal split of the band, and
the devices whose links are in outage on it unreachable (:func:`~wdmoe.latency.deadline.link_up`).
Both faces ask at every MoE layer's own time: the channel moves during a forward. Trace time wraps
around after the cell's blocks (both faces: the simulator's default is 200 000 blocks, 2000 s of
the paper cell; the channel then repeats).
"""

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from wdmoe.channel import ChannelState, generate_trace
from wdmoe.channel.state import Link
from wdmoe.channel.trace import ChannelTrace
from wdmoe.channel.units import BoolArray, FloatArray, db_to_linear
from wdmoe.config import ScenarioConfig, check_range
from wdmoe.latency.deadline import link_up
from wdmoe.latency.view import ExpertLatency


@dataclass(frozen=True)
class Csi:
    """What the BS knows of the channel: ``delay_blocks`` fading blocks late, with log-normal gain
    errors of ``error_std_db`` dB."""

    delay_blocks: int = 0
    error_std_db: float = 0.0

    def __post_init__(self) -> None:
        check_range("csi.delay_blocks", self.delay_blocks, 0, 1e9)
        check_range("csi.error_std_db", self.error_std_db, 0.0, 60.0)


@dataclass(frozen=True)
class CellSnapshot:
    """The cell at one time: the fading block of the truth, the BS's estimate (of an earlier block
    when CSI is stale), the truth, the policy's view [U] and which links are truly up [U]."""

    block: int
    estimate: ChannelState
    true: ChannelState
    view: ExpertLatency
    true_up: BoolArray

    def per_token_s(self) -> FloatArray:
        """t_u(n = 1) [U] on the estimate: one token's time on each device at the equal split
        (∞ where the BS sees the link down); computed once per snapshot (they are immutable)."""
        cached: FloatArray | None = self.__dict__.get("_per_token_s")
        if cached is None:
            cached = self.view.device_time_s(np.ones(self.view.channel.num_devices))
            cached.setflags(write=False)
            object.__setattr__(self, "_per_token_s", cached)  # a cache, not a field: frozen stays true
        return cached

    def placed(self, placement: Any) -> "CellSnapshot":
        """The same snapshot with experts placed on devices ``placement`` [E] (the last one asked
        for is kept: a forward asks once per layer, mostly for the same placement)."""
        key = tuple(int(u) for u in placement)
        kept = self.__dict__.get("_placed")
        if kept is None or kept[0] != key:
            view = replace(self.view, placement=np.asarray(key, dtype=np.int64))
            kept = (key, replace(self, view=view))
            object.__setattr__(self, "_placed", kept)  # a cache, not a field
        placed: CellSnapshot = kept[1]
        return placed


class Cell:
    """A scenario's cell over time (see the module doc): ``blocks`` fading blocks, after which
    trace time wraps around (``wrap``) or stays at the last block. The trace is generated as far
    as time has gone (doubling; traces are prefix-stable, so the channel does not depend on how
    far it was generated); ``trace``: a given trace instead."""

    FIRST_BLOCKS = 4096

    def __init__(
        self,
        scenario: ScenarioConfig,
        blocks: int,
        seed: int,
        csi: Csi | None = None,
        wrap: bool = False,
        trace: ChannelTrace | None = None,
    ) -> None:
        self.scenario, self.csi, self.wrap, self.seed = scenario, csi or Csi(), wrap, seed
        self.num_blocks = blocks if trace is None else trace.num_blocks
        first = min(blocks, self.FIRST_BLOCKS)
        self.trace = trace if trace is not None else generate_trace(scenario, first, seed)
        period = scenario.cell.csi_period_s
        self.csi_period_s = self.trace.block_s if period is None else period
        self.min_se = scenario.cell.min_se_bps_per_hz
        self.cache: OrderedDict[tuple[int, int], CellSnapshot] = OrderedDict()

    def block(self, time_s: float) -> int:
        """The fading block of time t (s): wrapped around the trace, or clipped to it."""
        b = int(time_s // self.trace.block_s)
        return b % self.num_blocks if self.wrap else min(b, self.num_blocks - 1)

    def state(self, block: int) -> ChannelState:
        """The true channel of ``block``, generating the trace that far when needed."""
        if block >= self.trace.num_blocks:
            grown = min(self.num_blocks, max(2 * self.trace.num_blocks, block + 1))
            self.trace = generate_trace(self.scenario, grown, self.seed)
        return self.trace.state(block)

    def estimate_block(self, time_s: float) -> int:
        """The block the BS's estimate at time t describes: the one of its last refresh (every
        ``csi_period_s``), ``delay_blocks`` blocks late (clipped at 0, or wrapped)."""
        refresh_s = np.floor(time_s / self.csi_period_s) * self.csi_period_s
        # the block holding the refresh instant (k·period can land a hair below a block boundary)
        refreshed = min(self.block(refresh_s + 1e-9 * self.trace.block_s), self.block(time_s))
        b = refreshed - self.csi.delay_blocks
        return b % self.num_blocks if self.wrap else max(b, 0)

    def snapshot(self, time_s: float) -> CellSnapshot:
        """The cell at time t: truth, estimate, and the view on the estimate (expert e on device e
        mod U until placed otherwise). Snapshots are kept for the last few blocks (a forward asks
        once per layer)."""
        key = (self.block(time_s), self.estimate_block(time_s))
        snap = self.cache.get(key)
        if snap is None:
            snap = self.cache[key] = self.build(*key)
            if len(self.cache) > 64:
                self.cache.popitem(last=False)
        return snap

    def build(self, block: int, estimate_block: int) -> CellSnapshot:
        stale = self.state(estimate_block)
        error_db = self.csi.error_std_db
        rng = np.random.default_rng([self.seed, 1, estimate_block])  # one error draw per block
        estimate = stale if error_db == 0.0 else noisy_csi(stale, rng, error_db)
        u = estimate.num_devices
        placement = np.arange(self.scenario.model.num_experts) % u
        up = link_up(estimate, self.min_se)
        view = ExpertLatency.from_scenario(self.scenario, estimate, placement=placement, up=up)
        true = self.state(block)
        return CellSnapshot(block, estimate, true, view, link_up(true, self.min_se))


# --- the BS's channel estimate ----------------------------------------------------------------


def _perturb(link: Link, error_db: FloatArray) -> Link:
    scale = db_to_linear(error_db)
    return replace(link, gain=link.gain * scale, snr_hz=link.snr_hz * scale)


def noisy_csi(true: ChannelState, rng: np.random.Generator, error_std_db: float) -> ChannelState:
    """The BS's estimate of ``true`` with log-normal gain errors, independent per device and
    direction: ĥ_u = h_u·10^(ε_u/10), ε_u ~ N(0, σ²) [dB] (SNR per Hz scales with ĥ)."""
    check_range("csi.error_std_db", error_std_db, 0.0, 60.0)
    u = true.num_devices
    dl_db, ul_db = rng.normal(0.0, error_std_db, u), rng.normal(0.0, error_std_db, u)
    return replace(true, dl=_perturb(true.dl, dl_db), ul=_perturb(true.ul, ul_db))
