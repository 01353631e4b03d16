"""The in-process WDMoE simulation: a real model answers while a simulated cell decides what each
expert costs and whether it answers at all (SPEC §4–§7).

Every forward of the model (a prefill, a decode step, a scorer's batch) runs on a simulated clock,
layer by layer, as the BS runs it:
1. when a MoE layer starts, the cell's snapshot at the clock (:class:`~wdmoe.latency.cell.Cell`:
   the true channel of that fading block, the BS's latest — stale, noisy — estimate) gives the
   policy its latency view, in which devices whose links the BS sees in outage are unreachable;
2. the layer's experts are priced by :func:`~wdmoe.latency.pricing.price_layer` — the function
   the BS prices with — and its calls settled by the runtime's deadline rule
   (:mod:`wdmoe.latency.deadline`): experts on devices the BS sees down are skipped up front; a call
   over a link truly in outage is lost at its deadline, a late one cut there; their experts are
   dropped (the model renormalises, as for a device that does not answer at the BS) or, in
   ``fallback`` mode, run locally;
3. the clock advances by the layer's wait and its BS compute: the next layer sees the channel of
   its own time (``channel_moves=False``: every layer of a forward on the snapshot of its start,
   block fading per forward as WDMoE assumes, for comparison).
After the forward each request in it is recorded (:class:`StepRecord`) and the policy is told what
it cost. The rows of a scorer's batch are requests that arrived together: they share the batch's
clock, decisions and cut calls, and each is priced as its own request on the channel of every
layer's time (``split_rows``); a context scored once for several continuations
(:func:`~wdmoe.models.requests.sharing_contexts`) counts in full in each (context + continuation)
request. The same trace (seed) is replayed for every policy, so comparisons are paired.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from wdmoe.allocation import allocator_for
from wdmoe.allocation.energy import MAX_SLACK
from wdmoe.channel.units import FloatArray
from wdmoe.config import ScenarioConfig, check_range
from wdmoe.errors import ConfigError
from wdmoe.latency.cell import Cell, CellSnapshot, Csi
from wdmoe.latency.deadline import DeadlineRule
from wdmoe.latency.model import bs_seconds
from wdmoe.latency.pricing import Calls, forward_overheads, price_layer, rows_overheads
from wdmoe.loads import RowLoads, expert_loads, row_lengths, row_loads, token_rows
from wdmoe.models.dispatch import Dispatcher, run_on_wire
from wdmoe.models.install import ForwardCall, WirelessModel
from wdmoe.models.requests import concurrent_rows, shared_contexts
from wdmoe.planning.files import read_placement
from wdmoe.planning.optimise import IntArray
from wdmoe.sim_records import LayerRun, StepRecord, price_rows
from wdmoe.types import Feedback


@dataclass(frozen=True)
class SimSettings:
    """How the BS sees, shares and waits for the cell. The channel repeats after trace_blocks ×
    coherence_s of simulated time (2000 s on the paper cell; generated as far as the run goes).
    ``deadline``: the runtime's rule for device calls (mode drop / wait / fallback, slack,
    grace); ``channel_moves``: price every layer on the channel of its own time (False: a forward
    on the snapshot of its start). ``split_rows``: account every row of a batched forward without
    KV cache as its own request (see the module doc). ``software_overhead_ms``: the software's own
    cost per device message, added to every busy device's t_u as the runtime adds its measured
    one (:mod:`wdmoe.latency.overhead`; 0: not priced)."""

    allocator: str = "equal"
    csi_delay_blocks: int = 0
    csi_error_std_db: float = 0.0
    trace_blocks: int = 200_000
    seed: int | None = None
    split_rows: bool = False
    deadline: DeadlineRule = field(default_factory=DeadlineRule)
    channel_moves: bool = True
    software_overhead_ms: float = 0.0
    energy_slack: float = 0.1  # allocator "energy": the wait may exceed min-max's by this fraction

    def __post_init__(self) -> None:
        check_range("sim.software_overhead_ms", self.software_overhead_ms, 0.0, 1e6)
        check_range("sim.energy_slack", self.energy_slack, 0.0, MAX_SLACK)
        check_range("sim.csi_delay_blocks", self.csi_delay_blocks, 0, 1e6)
        check_range("sim.csi_error_std_db", self.csi_error_std_db, 0.0, 60.0)
        check_range("sim.trace_blocks", self.trace_blocks, 1, 1e8)


@dataclass
class Pass:
    """A forward in flight: how its rows are accounted (``request``: one request; ``rows``: each
    row its own; ``context`` / ``continuation``: shared contexts), its clock, BS compute per layer,
    its tokens' rows and the layers run so far."""

    kind: str
    start_s: float
    bs_s: float
    row: torch.Tensor
    rows: int
    parents: tuple[int, ...] = ()
    clock: float = 0.0
    selected: FloatArray | None = None  # the current layer's real tokens per expert [E]
    layers: list[LayerRun] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clock = self.start_s


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
        csi = Csi(s.csi_delay_blocks, s.csi_error_std_db)
        self.cell = Cell(self.scenario, s.trace_blocks, seed, csi, wrap=True)
        self.placement = scenario_placement(self.scenario, sorted(self.wm.blocks))  # cell.placement
        self.allocator = allocator_for(s.allocator, self.scenario, s.energy_slack)
        self.time_s = 0.0
        self.context_tokens = 0
        self.current: Pass | None = None
        self.contexts: tuple[Pass, RowLoads, list[int]] | None = None  # a context pass's, until used
        self.batch_records: list[StepRecord] = []  # the last batch pass's, one per row
        self.batch_tags: tuple = ()  # … and its rows' requests
        self.inner: Dispatcher = self.wm.dispatcher

    # --- the forward listener (see WirelessModel.attach) ------------------------------------

    def before_forward(self, call: ForwardCall) -> None:
        shared, served = shared_contexts(), concurrent_rows()
        row = token_rows(call.input_ids, call.attention_mask)
        rows = int(call.input_ids.shape[0])
        lengths = row_lengths(row, rows)
        m, flops = self.scenario.model, self.scenario.cell.bs_flops_per_s
        if served is not None:
            kind, bs = "batch", float(rows_overheads(self.scenario, lengths, served.context)[0][0])
        elif shared is not None and call.cache is None:
            kind, bs = "context", sum(bs_seconds(m, n, 0, flops)[0] for n in lengths)
        elif shared is not None and self.contexts is not None:
            parent_lengths = self.contexts[2]
            pairs = zip(lengths, shared.parents, strict=True)
            kind, bs = "continuation", sum(bs_seconds(m, n, parent_lengths[p], flops)[0] for n, p in pairs)
        elif self.settings.split_rows and call.stateless and self.context_tokens == 0:
            kind, bs = "rows", sum(bs_seconds(m, n, 0, flops)[0] for n in lengths)
        else:
            if call.starts_request:
                self.new_request()
            kind, bs = "request", float(bs_seconds(m, call.new_tokens, self.context_tokens, flops)[0])
        parents = shared.parents if shared is not None else ()
        self.current = Pass(kind, self.time_s, float(bs), row, rows, parents)
        self.wm.recorder.clear()
        self.wm.recorder.enabled = True

    def after_forward(self, call: ForwardCall, ok: bool) -> None:
        """Account the forward just run (see the module doc)."""
        fwd, self.current = self.current, None
        traces = self.wm.recorder.clear()
        if not ok or fwd is None or not traces:
            return
        head_s = forward_overheads(self.scenario, 1, 0)[1]
        heads = {"context": 0, "batch": fwd.rows}.get(fwd.kind, 1)
        self.time_s = fwd.clock + heads * head_s
        if fwd.kind == "batch":
            self.account_batch(fwd, traces)
            return
        if fwd.kind == "request":
            loads = expert_loads(traces, self.wm.num_experts)
            (record,) = self.price_rows(
                fwd.layers, loads, [call.new_tokens], self.context_tokens, fwd.start_s
            )
            self.finish(record)
            self.context_tokens += call.new_tokens
            return
        loads = row_loads(traces, self.wm.num_experts, fwd.row, fwd.rows)
        lengths = row_lengths(fwd.row, fwd.rows)
        if fwd.kind == "context":
            self.contexts = (fwd, loads, lengths)
            return
        if fwd.kind == "rows":
            for record in self.price_rows(fwd.layers, loads, lengths, 0, fwd.start_s):
                self.new_request()
                self.finish(record)
        else:
            self.account_continuations(fwd, loads, lengths)
        self.new_request()

    def account_continuations(self, fwd: Pass, loads: RowLoads, lengths: list[int]) -> None:
        """Each (context + continuation) row as one request, on the context pass's channel, cut
        wherever either pass was."""
        assert self.contexts is not None, "a continuation pass without its context pass"
        ctx, ctx_loads, ctx_lengths = self.contexts
        self.contexts = None
        merged = [
            LayerRun(
                c.snap,
                replace(c.priced, late=c.priced.late | f.priced.late, down=c.priced.down | f.priced.down),
                c.skipped | f.skipped,
            )
            for c, f in zip(ctx.layers, fwd.layers, strict=True)
        ]
        p = list(fwd.parents)
        n_ctx = np.asarray(ctx_lengths)[p]
        n = n_ctx + np.asarray(lengths)
        mass = (np.asarray(ctx_loads.mass)[p] * n_ctx + np.asarray(loads.mass) * lengths) / np.maximum(n, 1)
        both = RowLoads(
            ctx_loads.sent[p] + loads.sent,
            ctx_loads.kept[p] + loads.kept,
            ctx_loads.dropped[p] + loads.dropped,
            [float(m) for m in mass],
        )
        for record in self.price_rows(merged, both, [int(x) for x in n], 0, ctx.start_s):
            self.new_request()
            self.finish(record)

    def account_batch(self, fwd: Pass, traces: list) -> None:
        """Concurrent requests served by one forward (:mod:`wdmoe.serving`): the step is priced
        once, its layers on their joint loads (every device one message for all rows, as it ran);
        each row's record carries that step's times and its own experts. The policy hears one
        forward."""
        served = concurrent_rows()
        assert served is not None and served.rows == fwd.rows, "a batch pass without its rows"
        loads = row_loads(traces, self.wm.num_experts, fwd.row, fwd.rows)
        lengths = row_lengths(fwd.row, fwd.rows)
        records = self.price_rows(fwd.layers, loads, lengths, served.context, fwd.start_s, joint=True)
        self.records.extend(records)
        self.batch_records, self.batch_tags = records, served.tags
        step = records[0].total_s
        decode = min(served.context) > 0
        self.wm.observe(Feedback(step, sum(lengths), decode=decode))

    def finish(self, record: StepRecord) -> None:
        """Keep the record; tell the policy what the request's forward cost."""
        self.records.append(record)
        self.wm.observe(Feedback(record.total_s, record.new_tokens, decode=record.phase == "decode"))

    # --- the dispatcher (see WirelessMoEBlock): one layer on the cell -------------------------

    def layer_snapshot(self) -> CellSnapshot:
        """The cell when the current layer starts (its forward's start without ``channel_moves``).
        A continuation pass decides on the snapshots its context pass ran its layers on: each
        (context + continuation) row is one request, priced on the context's channel
        (:meth:`account_continuations`), so its choices must be made on that channel too."""
        fwd = self.current
        if fwd is None:
            return self.cell.snapshot(self.time_s)
        if fwd.kind == "continuation" and self.contexts is not None:
            done, ctx_layers = len(fwd.layers), self.contexts[0].layers
            if done < len(ctx_layers):
                return ctx_layers[done].snap
        return self.cell.snapshot(fwd.clock if self.settings.channel_moves else fwd.start_s)

    def placed(self, snap: CellSnapshot, layer: int) -> CellSnapshot:
        """``snap`` with MoE layer ``layer``'s experts on the devices of ``cell.placement``."""
        return snap if self.placement is None else snap.placed(self.placement[layer])

    def view_at(self, layer: int) -> object:
        return self.placed(self.layer_snapshot(), layer).view

    def on_select(self, layer: int, candidates: torch.Tensor, keep: torch.Tensor) -> None:
        """Count the layer's real tokens per expert (padding is not sent)."""
        fwd = self.current
        if fwd is not None:
            real = keep & (fwd.row >= 0)[:, None]
            counts = torch.bincount(candidates[real], minlength=self.wm.num_experts)
            fwd.selected = counts.double().numpy()

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Price and settle the layer's calls on the cell now; run the experts that answer."""
        fwd = self.current
        if fwd is None:
            return self.inner.run(layer, inputs)
        snap = self.placed(self.layer_snapshot(), layer)
        view = snap.view
        tokens, fwd.selected = fwd.selected, None
        assert tokens is not None, "every MoE block reports its selection (on_select) before dispatching"
        skipped = view.unreachable_experts()
        overhead_ms = self.settings.software_overhead_ms
        calls = Calls(
            self.settings.deadline, snap.true_up, overhead_s=overhead_ms / 1e3 if overhead_ms else None
        )
        priced = price_layer(
            view, snap.true, self.allocator, view.device_tokens(np.where(skipped, 0, tokens)), calls
        )
        fwd.layers.append(LayerRun(snap, priced, skipped, calls.overhead_s))
        fwd.clock += float(priced.wait_s) + fwd.bs_s
        lost = skipped | priced.cut[view.placement]
        fallback = self.settings.deadline.mode == "fallback"
        run = {e: x for e, x in inputs.items() if fallback or not lost[e]}
        cost = view.cost  # each expert through its device's wire format (one run at the BS: exact)
        wire = {e: cost.format_of(int(view.placement[e])) for e in run if not lost[e]} if cost.formats else {}
        return run_on_wire(self.inner, layer, run, wire)

    # --- records ----------------------------------------------------------------------------

    def price_rows(
        self,
        layers: Sequence[LayerRun],
        loads: RowLoads,
        new_tokens: Sequence[int],
        context: int | Sequence[int],
        start_s: float,
        joint: bool = False,
    ) -> list[StepRecord]:
        """:func:`~wdmoe.sim_records.price_rows` on this simulation's scenario, allocator and rule."""
        rule = self.settings.deadline
        return price_rows(
            self.scenario, self.allocator, rule, layers, loads, new_tokens, context, start_s, joint
        )

    def new_request(self) -> None:
        """Start a new request: empty KV cache; simulated time (and the channel) go on."""
        self.context_tokens = 0
        self.wm.begin_request()

    @contextmanager
    def attached(self) -> Iterator["Simulation"]:
        """Account every forward of ``wm.model`` while inside."""
        self.inner = self.wm.dispatcher
        self.wm.set_dispatcher(self)
        self.wm.set_view_source(self.view_at)  # type: ignore[arg-type]
        self.wm.context.on_select = self.on_select
        try:
            with self.wm.attach(self):
                yield self
        finally:
            self.wm.recorder.enabled = False
            self.wm.set_view_source(None)
            self.wm.context.on_select = None
            self.wm.set_view(None)
            self.wm.set_dispatcher(self.inner)


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


def scenario_placement(scenario: ScenarioConfig, layer_ids: Sequence[int]) -> dict[int, IntArray] | None:
    """Primary device of each expert [E] by MoE layer id, from the scenario's ``cell.placement``
    file (None: no file, expert e on device e mod U); a file for another cell or model raises
    ConfigError."""
    if scenario.cell.placement is None:
        return None
    m, path = scenario.model, scenario.cell.placement
    f = read_placement(Path(path), scenario.cell.num_devices, m.num_layers, m.num_experts)
    if sorted(f.layers) != sorted(layer_ids):
        raise ConfigError(
            f"cell.placement = {path!r} places MoE layers {list(f.layers)}, "
            f"but the model has {list(layer_ids)}"
        )
    return dict(zip(f.layers, f.primary, strict=True))
