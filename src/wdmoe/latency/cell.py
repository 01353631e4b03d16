"""The cell: a scenario, its channel trace and what the BS knows of it (pure, seeded).

The simulator and the BS both look at the cell through :meth:`Cell.snapshot`: at time t the
fading block b(t) gives the *true* channel, the BS's *estimate* of it (stale CSI: the state
``delay_blocks`` blocks old; noisy CSI: log-normal gain errors of σ dB) and the latency view a
policy decides on (the estimate, the scenario's expert cost and device compute, the equal split
of the band). Trace time runs out at the last block (the simulator clips there) or wraps around
(the runtime, which runs for as long as it is up).
"""

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from wdmoe.channel import ChannelState, generate_trace
from wdmoe.channel.state import Link
from wdmoe.channel.trace import ChannelTrace
from wdmoe.channel.units import FloatArray, db_to_linear
from wdmoe.config import ScenarioConfig, check_range
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
    """The cell at one fading block: the BS's estimate, the truth, the policy's view [U]."""

    block: int
    estimate: ChannelState
    true: ChannelState
    view: ExpertLatency

    def per_token_s(self) -> FloatArray:
        """t_u(n = 1) [U] on the estimate: one token's time on each device at the equal split."""
        return self.view.device_time_s(np.ones(self.view.channel.num_devices))

    def placed(self, placement: Any) -> "CellSnapshot":
        """The same snapshot with experts placed on devices ``placement`` [E]."""
        view = replace(self.view, placement=np.asarray(placement, dtype=np.int64))
        return replace(self, view=view)


class Cell:
    """A scenario's cell over time (see the module doc); ``wrap``: trace time wraps around."""

    def __init__(
        self, scenario: ScenarioConfig, blocks: int, seed: int, csi: Csi | None = None, wrap: bool = False
    ) -> None:
        self.scenario, self.csi, self.wrap = scenario, csi or Csi(), wrap
        self.trace = generate_trace(scenario, blocks, seed)
        self.rng = np.random.default_rng(seed + 1)  # CSI errors: one draw per snapshot

    def block(self, time_s: float) -> int:
        """The fading block of time t (s): clipped to the trace, or wrapped around it."""
        b = int(time_s // self.trace.block_s)
        return b % self.trace.num_blocks if self.wrap else min(b, self.trace.num_blocks - 1)

    def snapshot(self, time_s: float) -> CellSnapshot:
        """The cell at time t: truth, estimate, and the view on the estimate (expert e on device e
        mod U until placed otherwise)."""
        b = self.block(time_s)
        estimate = bs_estimate(self.trace, b, self.rng, self.csi.delay_blocks, self.csi.error_std_db)
        u = estimate.num_devices
        placement = np.arange(self.scenario.model.num_experts) % u
        view = ExpertLatency.from_scenario(self.scenario, estimate, placement=placement)
        return CellSnapshot(b, estimate, self.trace.state(b), view)


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


def bs_estimate(
    trace: ChannelTrace,
    block: int,
    rng: np.random.Generator,
    delay_blocks: int = 0,
    error_std_db: float = 0.0,
) -> ChannelState:
    """What the BS believes at ``block``: the snapshot ``delay_blocks`` fading blocks old
    (stale CSI; clipped at block 0), with log-normal estimation error of σ dB."""
    check_range("csi.delay_blocks", delay_blocks, 0, 1e9)
    stale = trace.state(max(block - delay_blocks, 0))
    return stale if error_std_db == 0.0 else noisy_csi(stale, rng, error_std_db)
