"""The in-process WDMoE simulation: a real model answers while a channel trace decides what each
expert costs (SPEC §4–§7).

Every forward of the model (a prefill, then one per decode step) is one *step*:
1. the cell's snapshot at the current simulated time (:class:`~wdmoe.latency.cell.Cell`: the BS's
   stale / noisy estimate, the truth) gives the policy its latency view (equal bandwidth split);
2. the model runs; every MoE block's policy selects on that view and the recorder keeps what
   ran: tokens per expert and layer n [L, E];
3. :func:`~wdmoe.latency.pricing.price_forward` — the function the BS prices with — prices n on
   the *true* channel of that time, with the allocator's split per layer decided on the same
   estimate the policy saw, plus BS compute; simulated time advances by the result, and the
   policy is told what the step cost (``observe``). The channel is constant over one forward
   (block fading at the granularity of a forward, as WDMoE assumes: the policy and the allocator
   can only act on what the BS knows when the forward starts) and moves on between forwards.
The same trace (seed) is replayed for every policy, so comparisons are paired.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from wdmoe.allocation import make_allocator
from wdmoe.channel.units import FloatArray
from wdmoe.config import ScenarioConfig, check_range
from wdmoe.errors import ConfigError
from wdmoe.latency.cell import Cell, CellSnapshot, Csi
from wdmoe.latency.pricing import price_forward
from wdmoe.models.install import ForwardCall, WirelessModel
from wdmoe.types import Feedback, LayerTrace


@dataclass(frozen=True)
class SimSettings:
    """How the BS sees and shares the channel. trace_blocks × coherence_s bounds simulated time.

    split_rows: account every row of a batched forward without KV cache as its own request (its
    unpadded tokens prefilled alone), so that a scorer's batching (e.g. the choices of
    multiple-choice items) does not change the latency per request. The rows of one forward are
    requests arriving at the same time: the policy decides on the estimate at the forward's start
    and every row is priced on the channel of that time; the clock then advances by the rows'
    summed latency.
    """

    allocator: str = "equal"
    csi_delay_blocks: int = 0
    csi_error_std_db: float = 0.0
    trace_blocks: int = 20000
    seed: int | None = None
    split_rows: bool = False

    def __post_init__(self) -> None:
        check_range("sim.csi_delay_blocks", self.csi_delay_blocks, 0, 1e6)
        check_range("sim.csi_error_std_db", self.csi_error_std_db, 0.0, 60.0)
        check_range("sim.trace_blocks", self.trace_blocks, 1, 1e8)


@dataclass(frozen=True)
class StepRecord:
    """One forward (or one row of it), accounted. Arrays: [L, E] per expert, [L, U] per device,
    [L] per layer (s); snr_db_dl / snr_db_ul [U]: the true SNR at an equal share B/U (dB)."""

    phase: str
    start_s: float
    new_tokens: int
    expert_tokens: FloatArray
    dropped_tokens: FloatArray
    retained_mass: float
    device_tokens: FloatArray
    device_dropped: FloatArray
    snr_db_dl: FloatArray
    snr_db_ul: FloatArray
    downlink_s: FloatArray
    compute_s: FloatArray
    uplink_s: FloatArray
    waiting_s: FloatArray
    bs_s: FloatArray
    head_s: float

    @property
    def total_s(self) -> float:
        return float(self.waiting_s.sum() + self.bs_s.sum() + self.head_s)


def expert_loads(traces: list[LayerTrace], num_experts: int) -> tuple[FloatArray, FloatArray, float]:
    """From one forward's traces: kept tokens n [L, E], dropped candidates [L, E], and the mean
    share of router importance kept per token and layer (1 = nothing dropped)."""
    (kept,), (dropped,), (mass,) = row_loads(traces, num_experts, torch.zeros(len(traces[0].keep)), 1)
    return kept, dropped, mass


def row_loads(
    traces: list[LayerTrace], num_experts: int, row: torch.Tensor, rows: int
) -> tuple[FloatArray, FloatArray, list[float]]:
    """Per row r < ``rows`` of a forward (``row`` [T]: each token's row, −1 for padding): kept
    tokens [R, L, E], dropped candidates [R, L, E] and the retained importance share (mean over
    the row's tokens and the layers), in one pass per layer."""
    real = row >= 0
    idx = row.clamp_min(0).long()
    kept = torch.zeros(rows, len(traces), num_experts, dtype=torch.float64)
    dropped = torch.zeros_like(kept)
    share_sum = torch.zeros(rows, dtype=torch.float64)
    for layer, t in enumerate(traces):
        keep = t.keep & real[:, None]
        miss = ~t.keep & real[:, None]
        flat = (idx[:, None] * num_experts + t.candidates).reshape(-1)
        kept[:, layer] = torch.bincount(flat, keep.reshape(-1).double(), rows * num_experts).reshape(
            rows, num_experts
        )
        dropped[:, layer] = torch.bincount(flat, miss.reshape(-1).double(), rows * num_experts).reshape(
            rows, num_experts
        )
        imp = torch.softmax(t.logits.double(), -1).gather(-1, t.candidates)
        share = (imp * t.keep).sum(-1) / imp.sum(-1).clamp_min(1e-30)
        share_sum += torch.bincount(idx[real], share[real], rows)
    count = torch.bincount(idx[real], minlength=rows).double() * len(traces)
    mass = torch.where(count > 0, share_sum / count.clamp_min(1), 1.0)
    return kept.numpy(), dropped.numpy(), [float(m) for m in mass]


def token_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The row of every token [B·S] (row-major over [B, S], as the MoE blocks flatten), −1 for
    padding."""
    b, s = int(input_ids.shape[0]), int(input_ids.shape[-1])
    rows = torch.arange(b)[:, None].expand(b, s)
    if attention_mask is None:
        return rows.reshape(-1)
    return torch.where(attention_mask.bool(), rows, -1).reshape(-1)


@dataclass
class Simulation:
    """Runs a WirelessModel on a scenario's cell in simulated time (see module doc)."""

    wm: WirelessModel
    scenario: ScenarioConfig
    settings: SimSettings = field(default_factory=SimSettings)
    records: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_model_matches(self.wm, self.scenario)
        s = self.settings
        seed = self.scenario.seed if s.seed is None else s.seed
        self.cell = Cell(self.scenario, s.trace_blocks, seed, Csi(s.csi_delay_blocks, s.csi_error_std_db))
        self.allocator = make_allocator(s.allocator)
        self.time_s = 0.0
        self.context_tokens = 0
        self.snapshot: CellSnapshot | None = None

    # --- the forward listener (see WirelessModel.attach) ------------------------------------

    def before_forward(self, call: ForwardCall) -> None:
        if call.starts_request:
            self.new_request()
        self.snapshot = self.cell.snapshot(self.time_s)
        self.wm.set_view(self.snapshot.view)
        self.wm.recorder.clear()
        self.wm.recorder.enabled = True

    def after_forward(self, call: ForwardCall, ok: bool) -> None:
        """Account the forward just recorded: as one step of the current request, or each row as
        its own request (``split_rows``, for a stateless forward starting a request)."""
        snap, self.snapshot = self.snapshot, None
        traces = self.wm.recorder.clear()
        if not ok or snap is None:
            return
        if self.settings.split_rows and call.stateless and self.context_tokens == 0:
            self.account_rows(snap, traces, token_rows(call.input_ids, call.attention_mask))
        else:
            self.account(snap, expert_loads(traces, self.wm.num_experts), call.new_tokens)

    def account_rows(
        self, snap: CellSnapshot, traces: list[LayerTrace], row: torch.Tensor
    ) -> list[StepRecord]:
        """Account each row (``row`` [T]: each token's row, −1 for padding) of one forward as its
        own request, all arriving at the forward's start."""
        rows = int(row.max()) + 1
        kept, dropped, mass = row_loads(traces, self.wm.num_experts, row, rows)
        lengths = torch.bincount(row[row >= 0], minlength=rows).tolist()
        start_s = self.time_s
        steps = []
        for r in range(rows):
            self.new_request()
            steps.append(self.account(snap, (kept[r], dropped[r], mass[r]), int(lengths[r]), start_s))
        self.new_request()
        return steps

    def account(
        self,
        snap: CellSnapshot,
        loads: tuple[FloatArray, FloatArray, float],
        new_tokens: int,
        start_s: float | None = None,
    ) -> StepRecord:
        """Price ``loads`` (kept [L, E], dropped [L, E], retained mass) with
        :func:`~wdmoe.latency.pricing.price_forward` on the snapshot's true channel, the allocator
        deciding on its view. Records the step, advances the clock, tells the policy."""
        kept, dropped, mass = loads
        view = snap.view
        device_tokens = view.device_tokens(kept)
        args = (self.scenario, device_tokens, new_tokens, self.context_tokens)
        lat = price_forward(view, snap.true, self.allocator, *args).latency
        share = snap.true.equal_share_hz()
        record = StepRecord(
            "prefill" if self.context_tokens == 0 else "decode",
            self.time_s if start_s is None else start_s,
            new_tokens,
            kept,
            dropped,
            mass,
            device_tokens,
            view.device_tokens(dropped),
            10 * np.log10(np.maximum(snap.true.dl.snr(share), 1e-30)),
            10 * np.log10(np.maximum(snap.true.ul.snr(share), 1e-30)),
            lat.devices.downlink_s,
            lat.devices.compute_s,
            lat.devices.uplink_s,
            lat.waiting_s,
            lat.bs_s,
            lat.head_s,
        )
        self.records.append(record)
        self.time_s += record.total_s
        self.wm.observe(Feedback(record.total_s, new_tokens, decode=self.context_tokens > 0))
        self.context_tokens += new_tokens
        return record

    def new_request(self) -> None:
        """Start a new request: empty KV cache; simulated time (and the channel) go on."""
        self.context_tokens = 0
        self.wm.begin_request()

    @contextmanager
    def attached(self) -> Iterator["Simulation"]:
        """Account every forward of ``wm.model`` while inside."""
        try:
            with self.wm.attach(self):
                yield self
        finally:
            self.wm.recorder.enabled = False
            self.wm.set_view(None)


def check_model_matches(wm: WirelessModel, scenario: ScenarioConfig) -> None:
    """The scenario's model dimensions must describe the model that runs."""
    m = scenario.model
    got = (len(wm.blocks), wm.num_experts)
    if (m.num_layers, m.num_experts) != got:
        raise ConfigError(
            f"scenario {scenario.name!r} describes {m.name} ({m.num_layers} MoE layers × {m.num_experts} "
            f"experts) but the model has {got[0]} × {got[1]}; use model=<preset> matching the model "
            "(e.g. model=smollm2-moe8 for the default model)"
        )
