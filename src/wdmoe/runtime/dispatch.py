"""The BS's dispatcher: each MoE layer's experts to the devices that host them.

For every layer (``run``, called by the model's blocks inside a forward the BS opened):
1. each selected expert goes to a usable device, the replica whose channel serves a token fastest;
   an expert that no usable device hosts is skipped: dropped up front, without waiting, and
   charged to its preferred host's books;
2. the layer's device loads are priced by :func:`~wdmoe.latency.pricing.price_layer` — the
   function the simulator prices with — on the cell snapshot of the layer's own time, and every
   call gets the budget the core's :class:`~wdmoe.latency.deadline.DeadlineRule` derives from the
   expected t_u (the prediction settles the calls by the same rule);
3. with link emulation each device's downlink and uplink wait out the message bytes at the rates
   the *true* channel gives its share of the band, and a link truly in outage carries nothing
   (its call runs into its deadline);
4. all devices are called at once (:class:`~wdmoe.runtime.links.Links`); an unreachable device is
   marked down and its experts retried on a live replica; every device message is judged (failures
   strike; too many in a row bench the device) and, in ``fallback`` mode, experts without an
   answer run at the BS;
5. the books get calls, answers, failures, skipped experts, bytes, predicted and measured times.
A watch on the link loop announces lapsed heartbeats and probes benched devices after their
back-off, readmitting those that answer in time.
"""

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from wdmoe.allocation import allocator_for
from wdmoe.config import ScenarioConfig
from wdmoe.errors import WdmoeError
from wdmoe.latency import DeviceTimes, transfer_s
from wdmoe.latency.cell import CellSnapshot
from wdmoe.latency.pricing import Calls, Priced, price_layer
from wdmoe.models.dispatch import Dispatcher
from wdmoe.runtime.books import Books, RequestStats
from wdmoe.runtime.links import Call, Links, inputs_of
from wdmoe.runtime.placement import DeviceEntry, DeviceRegistry
from wdmoe.runtime.settings import RuntimeSettings
from wdmoe.runtime.wire import KIND_REQUEST, KIND_RESPONSE, encoded_size


@dataclass
class Forward:
    """The forward in flight: its requests (one per row: several when users are batched, none for
    a tool's forward), the cell snapshot it decides and is priced on (experts placed on their best
    live device), one token's time per slot [U], each layer's price; ``selection``: the current
    layer's (candidates [N, K], kept [N, K]) of its N = rows × ``row_tokens`` tokens."""

    requests: list[RequestStats]
    snap: CellSnapshot
    per_token_s: np.ndarray
    started: float = field(default_factory=time.monotonic)
    layers: list[Priced] = field(default_factory=list)
    row_tokens: int = 1
    selection: tuple[torch.Tensor, torch.Tensor] | None = None
    layers_s: float = 0.0  # s of the cell spent inside its MoE layers' dispatch

    def requests_of(self, expert: int) -> list[RequestStats]:
        """The requests whose tokens a call of ``expert`` carries in the current layer."""
        if len(self.requests) <= 1 or self.selection is None:
            return self.requests
        candidates, kept = self.selection
        tokens = ((candidates == expert) & kept).any(dim=-1).nonzero().reshape(-1)
        rows = torch.unique(tokens // self.row_tokens).tolist()
        return [self.requests[r] for r in rows if r < len(self.requests)]


class DeviceDispatcher:
    """The model's dispatcher at the BS (see the module doc)."""

    def __init__(
        self,
        settings: RuntimeSettings,
        scenario: ScenarioConfig,
        registry: DeviceRegistry,
        books: Books,
        links: Links,
        local: Dispatcher | None = None,
    ) -> None:
        self.settings, self.scenario, self.registry = settings, scenario, registry
        self.books, self.links, self.local = books, links, local
        self.num_slots = scenario.cell.num_devices
        self.allocator = allocator_for(settings.allocator, scenario, settings.energy_slack)
        self.current: Forward | None = None
        self.per_token_s = np.zeros(self.num_slots)  # the last forward's, for probes
        self.watcher = links.submit(self.watch())

    # --- one layer ------------------------------------------------------------------------------

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Send each expert's tokens to its device; outputs of the experts that made it in time."""
        fwd = self.current
        if fwd is None:
            raise WdmoeError("the BS runs a layer only inside a forward (BaseStation.begin_forward)")
        start = time.monotonic()
        calls, lost = self.route(layer, inputs, fwd)
        tokens = np.zeros(self.num_slots)
        for u, group in calls.items():
            tokens[u] = sum(len(c.hidden) for c in group)
        s, snap = self.settings, fwd.snap
        overhead = np.array(self.registry.overheads_s()) if s.software_overhead == "measured" else None
        calls_rule = Calls(s.deadline, snap.true_up, s.time_scale, overhead_s=overhead)
        priced = price_layer(snap.view, snap.true, self.allocator, tokens, calls_rule)
        fwd.layers.append(priced)
        budget = s.time_scale * priced.budget_s  # wall seconds: DeadlineRule.budgets_s
        dl, ul = self.link_delays(calls, fwd, priced)
        self.links.fan_out(calls, dl, ul, budget, snap.view.cost.formats)
        modelled = priced.latency.devices.total_s - (0.0 if overhead is None else overhead)  # without ô
        span = (start, time.monotonic())
        self.registry.note_overheads(*self.links.overhead_samples(calls, modelled, s.time_scale, span))
        retries = self.fail_over(layer, fwd, calls, budget)
        measured = (time.monotonic() - start) / self.settings.time_scale
        fwd.layers_s += measured
        return self.finish(layer, fwd, calls, retries, lost, priced.latency.devices, measured)

    def route(
        self, layer: int, inputs: Mapping[int, torch.Tensor], fwd: Forward
    ) -> tuple[dict[int, list[Call]], list[Call]]:
        """The calls per usable device, and the experts no usable device hosts (skipped)."""
        calls: dict[int, list[Call]] = {}
        lost: list[Call] = []
        for e, x in inputs.items():
            device = self.registry.choose((layer, e), fwd.per_token_s)
            if device is None:
                owner = self.registry.preferred((layer, e), fwd.per_token_s)
                nowhere = owner or DeviceEntry(-1, "", frozenset(), "", 0.0)
                if any(self.registry.hosts((layer, e))):
                    code, message = (
                        "OUTAGE",
                        f"every usable host of layer {layer} expert {e} is in link outage",
                    )
                else:
                    code, message = "NO_DEVICE", f"no usable device hosts layer {layer} expert {e}"
                lost.append(Call(layer, e, x, nowhere, code=code, message=message))
            else:
                calls.setdefault(device.slot, []).append(Call(layer, e, x, device))
        return calls, lost

    def link_delays(
        self, calls: dict[int, list[Call]], fwd: Forward, priced: Priced
    ) -> tuple[np.ndarray, np.ndarray]:
        """Wall seconds [U] of each device's DL and UL message at the true rates of its share of
        the band (zeros without link emulation)."""
        dl, ul = np.zeros(self.num_slots), np.zeros(self.num_slots)
        if not self.settings.emulate_links:
            return dl, ul
        bytes_dl, bytes_ul = np.zeros(self.num_slots), np.zeros(self.num_slots)
        cost = fwd.snap.view.cost
        for u, group in calls.items():
            bytes_dl[u] = self.links.message_bytes(group, KIND_REQUEST, cost.format_of(u))
            bytes_ul[u] = self.links.message_bytes(group, KIND_RESPONSE, cost.format_of(u))
        band, true, scale = priced.bandwidth_hz, fwd.snap.true, self.settings.time_scale
        dl = scale * transfer_s(8 * bytes_dl, true.dl.rate_bps(band))
        # a link truly in outage carries nothing: its call runs into its deadline
        never = scale * priced.budget_s + 1.0
        return np.where(fwd.snap.true_up, dl, never), scale * transfer_s(8 * bytes_ul, true.ul.rate_bps(band))

    def fail_over(
        self, layer: int, fwd: Forward, calls: dict[int, list[Call]], budget: np.ndarray
    ) -> dict[int, list[Call]]:
        """Experts whose device could not be reached go once more to another usable replica (its
        device's deadline; no emulated delay for the retry), and that device is marked down."""
        dead = [c for c in inputs_of(calls) if c.code == "UNAVAILABLE"]
        for c in dead:
            self.mark_down(c)
        again: dict[int, list[Call]] = {}
        for c in dead:
            host = self.registry.choose((layer, c.expert), fwd.per_token_s)
            if host is not None:
                again.setdefault(host.slot, []).append(Call(layer, c.expert, c.hidden, host))
        if again:
            zeros = np.zeros(self.num_slots)
            self.links.fan_out(again, zeros, zeros, budget, fwd.snap.view.cost.formats)
        return again

    def mark_down(self, c: Call) -> None:
        if self.registry.mark_down(c.device.address):
            reason = c.message[:200]
            self.books.event("device_down", slot=c.device.slot, address=c.device.address, reason=reason)
            self.links.forget(c.device.address)

    # --- the outcome ------------------------------------------------------------------------------

    def finish(
        self,
        layer: int,
        fwd: Forward,
        calls: dict[int, list[Call]],
        retries: dict[int, list[Call]],
        lost: list[Call],
        predicted: DeviceTimes,
        measured_s: float,
    ) -> dict[int, torch.Tensor]:
        """Outputs, fallbacks, down-marking, strikes and the books (a retried expert counts twice)."""
        sent = inputs_of(calls) + inputs_of(retries)
        outputs = self.book(fwd, calls, sent, lost, predicted, measured_s)
        for c in inputs_of(retries):
            if c.code == "UNAVAILABLE":
                self.mark_down(c)
        self.judge(calls, retries)
        failed = list(lost) + [c for c in inputs_of(calls) if c.expert not in outputs]
        if failed and self.local is not None:
            outputs.update(self.local.run(layer, {c.expert: c.hidden for c in failed}))
        self.books.count_failed([c.device.slot for c in failed], self.local is not None)
        for c in failed:
            self.books.charge_failed(fwd.requests_of(c.expert), self.local is not None)
        return outputs

    def book(
        self,
        fwd: Forward,
        calls: dict[int, list[Call]],
        sent: list[Call],
        lost: list[Call],
        predicted: DeviceTimes,
        measured_s: float,
    ) -> dict[int, torch.Tensor]:
        """Write one layer into the books; the outputs that came back."""
        outputs: dict[int, torch.Tensor] = {}
        cost = fwd.snap.view.cost
        with self.books.lock:
            for u in calls:
                self.books.stats[u].add_prediction(predicted, u, measured_s)
            for c in sent:
                st = self.books.stats[c.device.slot]
                st.calls += 1
                wire = self.links.frame_format(cost.format_of(c.device.slot))
                sent_bytes = encoded_size(tuple(c.hidden.shape), wire)
                st.bytes_dl += sent_bytes
                got_bytes = 0
                if c.outputs is None:
                    st.failures[c.code] += 1
                else:
                    got_bytes = encoded_size(tuple(c.hidden.shape), wire, KIND_RESPONSE)
                    st.answered += 1
                    st.compute_s += c.compute_s
                    st.bytes_ul += got_bytes
                    outputs[c.expert] = c.outputs
                charge_call(fwd.requests_of(c.expert), sent_bytes, got_bytes)
            for c in lost:
                if c.device.slot >= 0:
                    self.books.stats[c.device.slot].skipped += 1
                charge_call(fwd.requests_of(c.expert), 0, 0)
        return outputs

    def judge(self, *rounds: dict[int, list[Call]]) -> None:
        """One strike per device message that failed (not for an unreachable device: that one is
        down already), a clean record for one answered; a device with too many is benched."""
        for calls in rounds:
            for u, group in calls.items():
                if any(c.code == "UNAVAILABLE" for c in group):
                    continue
                answered = all(c.outputs is not None for c in group)
                if self.registry.record(u, answered) and not answered:
                    bad = next(c for c in group if c.outputs is None)
                    reason = (
                        f"{self.settings.bench_after} failed calls in a row, the last "
                        f"{bad.code}: {bad.message[:200]}"
                    )
                    self.benched(group[0].device, reason)

    def benched(self, entry: DeviceEntry, reason: str) -> None:
        backoff = self.registry.backoff_s(entry)
        self.books.event(
            "device_benched", slot=entry.slot, address=entry.address, backoff_s=backoff, reason=reason
        )

    # --- liveness: lapsed heartbeats, probes of benched devices -------------------------------

    async def watch(self) -> None:
        """Every quarter heartbeat: announce devices whose heartbeats lapsed; probe benched devices
        whose back-off has passed (a probe never holds up a user's forward)."""
        while True:
            for entry in self.registry.expire():
                ago = time.monotonic() - entry.last_seen
                reason = f"missed heartbeats: last seen {ago:.1f} s ago"
                self.books.event("device_down", slot=entry.slot, address=entry.address, reason=reason)
            for entry in self.registry.due_probes():
                self.links.loop.create_task(self.probe(entry))
            await asyncio.sleep(self.settings.heartbeat_s / 4)

    async def probe(self, entry: DeviceEntry) -> None:
        """One token through one of ``entry``'s experts, with the deadline a real call would get;
        readmits the device when it answers in time, benches it again otherwise."""
        s = self.settings
        layer, expert = min(entry.experts)
        call = Call(layer, expert, torch.zeros(1, self.scenario.model.hidden_size), entry)
        budget = float(s.call_budgets_s(self.per_token_s[entry.slot : entry.slot + 1])[0])
        try:
            async with asyncio.timeout(budget):
                await self.links.call([call], budget)
        except TimeoutError:
            call.outputs, call.code = None, "DEADLINE_EXCEEDED"
        self.books.probed(entry.slot)
        if self.registry.probe_result(entry.slot, call.outputs is not None):
            self.books.event("device_readmitted", slot=entry.slot, address=entry.address)
        else:
            self.benched(entry, f"probe failed: {call.code} {call.message[:200]}".strip())

    async def stop_watch(self) -> None:
        """On the link loop: end the watch (before the links close)."""
        self.watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wrap_future(self.watcher)


def charge_call(requests: list[RequestStats], down: int, up: int) -> None:
    """One expert call in the books of the requests whose tokens it carried: a call each, its
    bytes shared equally (a call carries one token per request in a batched decode step)."""
    for r in requests:
        r.expert_calls += 1
        r.bytes_dl += down // len(requests)
        r.bytes_ul += up // len(requests)
