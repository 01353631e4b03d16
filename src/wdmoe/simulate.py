"""The in-process WDMoE simulation: a real model answers while a channel trace decides what each
expert costs (SPEC §4–§7).

Every forward of the model (a prefill, then one per decode step) is one *step*:
1. the BS's channel estimate at the current simulated time (stale / noisy CSI, from the trace)
   becomes the policy's :class:`ExpertLatency` snapshot (equal bandwidth split);
2. the model runs; every MoE block's policy selects on that snapshot and the recorder keeps what
   ran: tokens per expert and layer n [L, E];
3. :func:`account_step` prices n on the *true* channel of that time, with the allocator's split
   per layer decided on the same estimate the policy saw, plus BS compute; simulated time advances
   by the result. The channel is constant over one forward (block fading at the granularity of a
   forward, as WDMoE assumes: the policy and the allocator can only act on what the BS knows when
   the forward starts) and moves on between forwards.
The same trace (seed) is replayed for every policy, so comparisons are paired.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wdmoe.allocation import Allocator, make_allocator
from wdmoe.channel import ChannelState, generate_trace
from wdmoe.channel.units import FloatArray
from wdmoe.config import ScenarioConfig, check_range
from wdmoe.errors import ConfigError
from wdmoe.latency import bs_seconds, device_times, layer_demand, lm_head_flops
from wdmoe.models.install import WirelessModel
from wdmoe.policies.costs import ExpertLatency, bs_estimate
from wdmoe.types import LayerTrace


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


def account_step(
    expert_tokens: FloatArray,
    true: ChannelState,
    view: ExpertLatency,
    allocator: Allocator,
    scenario: ScenarioConfig,
    new_tokens: int,
    context_tokens: int,
) -> dict[str, Any]:
    """Price loads n [L, E] on the true channel: per layer, the allocator splits the band on the
    BS's estimate (``view``), then t_u = DL + compute + UL at those B_u on ``true``; T_l = max over
    devices with work; BS compute per layer and the LM head from the scenario's model and C_BS."""
    device_tokens = view.device_tokens(expert_tokens)  # [L, U]
    # one allocation per distinct load: the layers of a decode step share a few patterns
    loads, layer_of = np.unique(device_tokens, axis=0, return_inverse=True)
    split = np.stack(
        [
            allocator.allocate(layer_demand(n, view.flops_per_s, view.cost), view.channel).bandwidth_hz
            for n in loads
        ]
    )
    bandwidth = split[np.asarray(layer_of).reshape(-1)]
    times = device_times(
        device_tokens, true.dl.rate_bps(bandwidth), true.ul.rate_bps(bandwidth), view.flops_per_s, view.cost
    )
    busy = device_tokens > 0
    bs_flops = scenario.cell.bs_flops_per_s
    return {
        "downlink_s": times.downlink_s,
        "compute_s": times.compute_s,
        "uplink_s": times.uplink_s,
        "waiting_s": np.max(np.where(busy, times.total_s, 0.0), axis=-1, initial=0.0),
        "bs_s": bs_seconds(scenario.model, new_tokens, context_tokens, bs_flops),
        "head_s": lm_head_flops(scenario.model) / bs_flops,
    }


@dataclass
class Simulation:
    """Runs a WirelessModel on a scenario's channel trace in simulated time (see module doc)."""

    wm: WirelessModel
    scenario: ScenarioConfig
    settings: SimSettings = field(default_factory=SimSettings)
    records: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_model_matches(self.wm, self.scenario)
        seed = self.scenario.seed if self.settings.seed is None else self.settings.seed
        self.trace = generate_trace(self.scenario, self.settings.trace_blocks, seed)
        self.allocator = make_allocator(self.settings.allocator)
        self.csi_rng = np.random.default_rng(seed + 1)
        self.time_s = 0.0
        self.context_tokens = 0

    def block(self, time_s: float | None = None) -> int:
        """The trace block of ``time_s`` (default: now), clipped to the trace."""
        t = self.time_s if time_s is None else time_s
        return min(int(t // self.trace.block_s), self.trace.num_blocks - 1)

    def estimate(self, block: int) -> ChannelState:
        """The BS's channel estimate at ``block`` (stale / noisy CSI per the settings)."""
        return bs_estimate(
            self.trace, block, self.csi_rng, self.settings.csi_delay_blocks, self.settings.csi_error_std_db
        )

    def before_forward(self) -> ExpertLatency:
        estimate = self.estimate(self.block())
        view = ExpertLatency.from_scenario(self.scenario, estimate)
        self.wm.set_context(estimate, view)
        self.wm.recorder.clear()
        self.wm.recorder.enabled = True
        return view

    def after_forward(self, view: ExpertLatency, new_tokens: int) -> StepRecord:
        """Account the forward just recorded as one step of the current request."""
        traces = self.wm.recorder.clear()
        return self.account(view, expert_loads(traces, self.wm.num_experts), new_tokens)

    def after_rows(self, view: ExpertLatency, row: torch.Tensor) -> list[StepRecord]:
        """Account each row (``row`` [T]: each token's row, −1 for padding) of the forward just
        recorded as its own request."""
        traces = self.wm.recorder.clear()
        rows = int(row.max()) + 1
        kept, dropped, mass = row_loads(traces, self.wm.num_experts, row, rows)
        lengths = torch.bincount(row[row >= 0], minlength=rows).tolist()
        start_s = self.time_s
        steps = []
        for r in range(rows):
            self.new_request()
            steps.append(self.account(view, (kept[r], dropped[r], mass[r]), int(lengths[r]), start_s))
        self.new_request()
        return steps

    def account(
        self,
        view: ExpertLatency,
        loads: tuple[FloatArray, FloatArray, float],
        new_tokens: int,
        start_s: float | None = None,
    ) -> StepRecord:
        """Price ``loads`` (kept [L, E], dropped [L, E], retained mass) with :func:`account_step` on
        the true channel at ``start_s`` (default: now), the allocator deciding on ``view`` — the
        estimate the policy decided on. Records the step; the clock advances by it."""
        kept, dropped, mass = loads
        start = self.time_s if start_s is None else start_s
        first = self.trace.state(self.block(start))
        cost = account_step(kept, first, view, self.allocator, self.scenario, new_tokens, self.context_tokens)
        share = first.equal_share_hz()
        record = StepRecord(
            "prefill" if self.context_tokens == 0 else "decode",
            start,
            new_tokens,
            kept,
            dropped,
            mass,
            view.device_tokens(kept),
            view.device_tokens(dropped),
            10 * np.log10(np.maximum(first.dl.snr(share), 1e-30)),
            10 * np.log10(np.maximum(first.ul.snr(share), 1e-30)),
            **cost,
        )
        self.records.append(record)
        self.time_s += record.total_s
        self.context_tokens += new_tokens
        return record

    def new_request(self) -> None:
        """Start a new request: empty KV cache; simulated time (and the channel) go on."""
        self.context_tokens = 0

    @contextmanager
    def attached(self) -> Iterator["Simulation"]:
        """Account every forward of ``wm.model`` while inside (hooks removed on exit)."""
        state: dict[str, ExpertLatency] = {}

        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            state["view"] = self.before_forward()

        def post(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            assert ids is not None, "the model was called without input_ids"
            cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 generate: `cache`
            no_cache = cache is None and not kwargs.get("use_cache", False)
            if self.settings.split_rows and no_cache and self.context_tokens == 0:
                self.after_rows(state.pop("view"), token_rows(ids, kwargs.get("attention_mask")))
            else:
                self.after_forward(state.pop("view"), int(ids.shape[-1]))

        handles = [
            self.wm.model.register_forward_pre_hook(pre, with_kwargs=True),
            self.wm.model.register_forward_hook(post, with_kwargs=True),
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.wm.recorder.enabled = False
            self.wm.set_context(None, None)


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
