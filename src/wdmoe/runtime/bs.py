"""The base station of the distributed runtime: the BS part of the model, the cell, the devices.

:class:`BaseStation` holds the model without its experts (embeddings, attention, routers, LM head,
KV caches), the policy, the cell (its channel trace advancing with the clock, wrapping around) and
the registered devices. It listens to every forward of the model (the same hooks the simulator
uses): when each MoE layer starts, it takes the cell's snapshot at that moment — the BS's
estimate, the truth, the policy's latency view with each expert on its best live device — and
hands it to the layer's policy and to its :class:`~wdmoe.runtime.dispatch.DeviceDispatcher`, which
sends the layer's experts to the devices; after a forward, it prices the forward from its layers'
prices (the simulator's pricing path, calls settled by the same deadline rule), records the
prediction against the measured time on the request, and tells the policy what it cost.

Users' requests are served together by continuous batching (:mod:`wdmoe.serving`): one serving
thread runs the model; each step prefills newcomers and decodes every running request in one
forward, so each device gets one message per layer for all users' tokens; each forward's rows
say which request they are (:func:`~wdmoe.models.requests.serving_rows`), and every request's
books (calls, drops, bytes, predicted and measured steps) are its own. Forwards run one at a time
(a lock, for tools that run a layer outside the engine).
Also here: :mod:`~wdmoe.runtime.books` (statistics, metrics log), :mod:`~wdmoe.runtime.links`
(channels and calls), :mod:`~wdmoe.runtime.service` (the gRPC face).
"""

import contextlib
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from wdmoe.config import ModelConfig, ScenarioConfig
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.formats import FORMATS, STORAGE
from wdmoe.generate import CallbackStreamer, check_fits, encode_prompt
from wdmoe.latency.cell import Cell, CellSnapshot, Csi
from wdmoe.latency.overhead import bs_own_sample_s
from wdmoe.latency.pricing import Priced, rows_overheads, stack_layers
from wdmoe.latency.view import ExpertLatency
from wdmoe.models.install import ForwardCall, WirelessModel
from wdmoe.models.requests import concurrent_rows
from wdmoe.policies import make_policy
from wdmoe.runtime import api, dataplane
from wdmoe.runtime.books import Books, RequestStats
from wdmoe.runtime.dispatch import DeviceDispatcher, Forward
from wdmoe.runtime.links import Links
from wdmoe.runtime.own_cost import OwnCost
from wdmoe.runtime.placement import DeviceEntry, DeviceRegistry
from wdmoe.runtime.security import TLSFiles
from wdmoe.runtime.settings import MODES, WIRE_DTYPES, RuntimeSettings
from wdmoe.runtime.wire import encoded_size
from wdmoe.serving import Engine, Job, eos_ids
from wdmoe.simulate import check_model_matches
from wdmoe.types import ExpertKey, Feedback

__all__ = ["MODES", "WIRE_DTYPES", "BaseStation", "Cancelled", "RuntimeSettings", "build_bs", "fit_scenario"]


class Cancelled(Exception):
    """The user went away mid-generation."""


def runtime_scenario(scenario: ScenarioConfig, wire_dtype: torch.dtype | str) -> ScenarioConfig:
    """The scenario with the runtime's own message sizes: hidden states at the wire dtype's bits, or
    in the wire format of that name (:mod:`wdmoe.formats`; ``adaptive``: the scenario's rule picks
    one per device and layer), and the frame header of :mod:`wdmoe.runtime.wire`, so the latency
    model prices the bytes that travel (a format's row scales included)."""
    name = str(wire_dtype).removeprefix("torch.")
    fmt = name if name in (*FORMATS, "adaptive") else "none"
    storage = STORAGE.get(scenario.wire.adaptive_formats[0] if fmt == "adaptive" else fmt)
    dtype = wire_dtype if isinstance(wire_dtype, torch.dtype) else storage or torch.float32
    header_bytes = encoded_size((0, 0), dtype)  # the header is the same in every format
    bits = 8 * dtype.itemsize
    wire = replace(scenario.wire, bits_per_element=bits, header_bits=8 * header_bytes, format=fmt)
    return replace(scenario, wire=wire)


def model_dims(wm: WirelessModel, name: str) -> ModelConfig:
    """The latency model's dimensions of the model that runs (read before its experts are released)."""
    cfg = wm.model.config
    block = next(iter(wm.blocks.values()))
    if block.experts.down_proj.numel() == 0:
        raise ConfigError("the model's experts are released: read its dimensions (fit_scenario) first")
    heads = int(cfg.num_attention_heads)
    return ModelConfig(
        name=name,
        hidden_size=int(cfg.hidden_size),
        ffn_size=wm.expert_size,
        num_layers=len(wm.blocks),
        num_experts=wm.num_experts,
        top_k=wm.top_k,
        num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        vocab_size=int(cfg.vocab_size),
    )


def fit_scenario(scenario: ScenarioConfig, wm: WirelessModel, name: str) -> ScenarioConfig:
    """The scenario's cell and channel with the dimensions of the model that really runs."""
    return replace(scenario, model=model_dims(wm, name))


class BaseStation:
    """The BS: the model's BS part, the cell, the devices (see the module doc)."""

    def __init__(
        self,
        wm: WirelessModel,
        tok: PreTrainedTokenizerBase | None,
        scenario: ScenarioConfig,
        settings: RuntimeSettings | None = None,
        *,
        token: str,
        tls: TLSFiles | None = None,
        metrics_log: Path | None = None,
    ) -> None:
        self.settings = s = settings or RuntimeSettings()
        check_model_matches(wm, scenario)
        self.wm, self.tok, self.tls = wm, tok, tls
        wire_dtype = WIRE_DTYPES.get(s.wire_dtype, torch.float32)  # a format's: float32 for probes
        self.scenario = runtime_scenario(scenario, s.wire_dtype)
        self.num_slots = scenario.cell.num_devices
        seed = scenario.seed if s.seed is None else s.seed
        self.cell = Cell(
            self.scenario, s.trace_blocks, seed, Csi(s.csi_delay_blocks, s.csi_error_std_db), wrap=True
        )
        layers, hb = tuple(sorted(wm.blocks)), s.heartbeat_s
        self.registry = DeviceRegistry(
            self.num_slots, layers, wm.num_experts, hb, hb, bench_after=s.bench_after, bench_s=s.bench_s
        )
        self.books = Books(self.num_slots, metrics_log)
        self.links = Links(wire_dtype, token, tls, s.data_plane)
        local = wm.local_dispatcher() if s.mode == "fallback" else None
        self.dispatcher = DeviceDispatcher(s, self.scenario, self.registry, self.books, self.links, local)
        wm.set_policy(make_policy(s.policy, **dict(s.params)))
        wm.set_dispatcher(self.dispatcher)
        wm.set_view_source(self.view_at)
        self.boot = secrets.token_hex(8)
        self.t0 = time.monotonic()
        self.forward_lock = threading.Lock()
        self.thread = threading.local()
        self.request_ids = itertools.count(1)
        self.last_priced: Priced | None = None  # the last forward's price (for tests and tools)
        self.own_cost = OwnCost()  # the BS's own cost per forward beyond the model
        self.hooks = contextlib.ExitStack()
        self.hooks.enter_context(wm.attach(self))
        wm.context.on_select = self.on_select
        self.engine = Engine(wm, eos_ids(wm, tok), s.max_active)
        self.stopping = threading.Event()
        self.serving = threading.Thread(
            target=self.engine.run, args=(self.stopping,), name="serving", daemon=True
        )
        self.serving.start()

    # --- the clock and the cell -------------------------------------------------------------

    def sim_time_s(self) -> float:
        """Simulated cell time: wall seconds since start / time_scale."""
        return (time.monotonic() - self.t0) / self.settings.time_scale

    def snapshot(self, layer: int | None = None) -> tuple[CellSnapshot, np.ndarray]:
        """The cell's snapshot now, with each expert (of ``layer``, when given) on its best live
        device; one token's time per slot on the BS's estimate (∞: the link is in outage)."""
        snap = self.cell.snapshot(self.sim_time_s())
        per_token = snap.per_token_s()
        self.dispatcher.per_token_s = per_token
        return snap.placed(self.registry.expert_slots(per_token, layer)), per_token

    def begin_forward(self, requests: list[RequestStats], row_tokens: int = 1) -> Forward:
        """The forward it opens on the cell now, serving ``requests`` (one per row)."""
        return Forward(requests, *self.snapshot(), row_tokens=row_tokens)

    def view_at(self, layer: int) -> ExpertLatency:
        """The view a layer's policy decides on: the cell when the layer starts (the channel moves
        during a forward); the layer's calls are priced and settled on the same snapshot."""
        fwd = self.dispatcher.current
        snap, per_token = self.snapshot(layer)
        if fwd is not None:
            fwd.snap, fwd.per_token_s = snap, per_token
        return snap.view

    def run_layer(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """One MoE layer's experts through the devices outside a model forward (tools, tests)."""
        with self.forward_lock:
            self.dispatcher.current = self.begin_forward([])
            try:
                return self.dispatcher.run(layer, inputs)
            finally:
                self.dispatcher.current = None

    # --- the forward listener (see WirelessModel.attach): one forward at a time -------------

    def before_forward(self, call: ForwardCall) -> None:
        self.forward_lock.acquire()
        try:
            served = concurrent_rows()
            requests: list[RequestStats] = list(served.tags) if served is not None else []
            if len(requests) == 1 and requests[0].context_tokens == 0:
                self.wm.begin_request()
            self.dispatcher.current = self.begin_forward(requests, call.new_tokens)
        except BaseException:
            self.forward_lock.release()
            raise

    def on_select(self, layer: int, candidates: torch.Tensor, keep: torch.Tensor) -> None:
        """The layer's selection, for charging each call to the requests whose tokens it carries."""
        fwd = self.dispatcher.current
        if fwd is not None:
            fwd.selection = (candidates, keep)
            if self.books.listening:  # what the policy left out, for the step event
                self.books.pulse.selected(keep)

    def after_forward(self, call: ForwardCall, ok: bool) -> None:
        fwd, self.dispatcher.current = self.dispatcher.current, None
        if fwd is None:  # before_forward failed and released the lock itself
            return
        try:
            if ok:
                self.end_forward(fwd, call.new_tokens)
        finally:
            self.forward_lock.release()

    def end_forward(self, fwd: Forward, new_tokens: int) -> None:
        """Price the forward from its layers (plus every row's BS compute and LM head: the
        simulator's :func:`~wdmoe.latency.pricing.rows_overheads`), record prediction against
        measurement on each request it served (a batched step: the step's times on each), tell the
        policy what it cost."""
        contexts = [r.context_tokens for r in fwd.requests] or [0]
        measured = (time.monotonic() - fwd.started) / self.settings.time_scale
        moe = predicted = own = 0.0
        if fwd.layers:
            overheads = rows_overheads(self.scenario, [new_tokens] * len(contexts), contexts)
            self.last_priced = stack_layers(fwd.layers, *overheads)
            moe = float(self.last_priced.wait_s.sum())
            predicted = float(self.last_priced.latency.total_s)
            kind = (len(contexts), new_tokens, min(contexts) > 0)
            if self.dispatcher.settings.software_overhead == "measured":
                own = self.own_cost.estimate_s(*kind)
            modelled_bs = float(np.sum(overheads[0]) + overheads[1])
            self.own_cost.note(*kind, bs_own_sample_s(measured, fwd.layers_s, modelled_bs))
        predicted += own
        record = {"measured_s": measured, "predicted_s": predicted, "moe_predicted_s": moe, "bs_own_s": own}
        for request in fwd.requests:
            request.forwards.append(dict(record))
            request.context_tokens += new_tokens
        steps_left = max((r.max_new_tokens - len(r.forwards) for r in fwd.requests), default=0)
        feedback = Feedback(
            measured, new_tokens * len(contexts), decode=min(contexts) > 0, steps_left=steps_left
        )
        self.wm.observe(feedback)
        if self.books.listening:  # one event per forward for the log, dashboard and metrics
            self.books.event("step", **self.books.pulse.step(self, fwd, measured, predicted))

    # --- devices, users, statistics ---------------------------------------------------------

    def register(self, reg: api.Registration, static: bool = False) -> DeviceEntry:
        """Add or refresh a device; its data plane is used when it speaks our version of it (else
        it is called over gRPC)."""
        data = reg.data_address if reg.data_version == dataplane.VERSION else ""
        entry, came_up = self.registry.register(
            reg.slot, reg.address, reg.experts, reg.name, static, data_address=data
        )
        if came_up:
            self.links.forget(reg.address, wait=False)
            self.books.event(
                "device_up",
                slot=reg.slot,
                address=reg.address,
                data_address=data,
                experts=len(reg.experts),
                name=reg.name,
            )
        return entry

    def add_static(self, placement: Mapping[ExpertKey, str]) -> None:
        """Devices known without registration: (layer, expert) → address; slot = order of address."""
        by_address: dict[str, list[ExpertKey]] = {}
        for key, address in placement.items():
            by_address.setdefault(address, []).append(key)
        for slot, (address, keys) in enumerate(sorted(by_address.items())):
            self.register(api.Registration(slot, address, tuple(sorted(keys))), static=True)

    def generate(self, req: api.GenerateRequest, on_text: Callable[[str], None]) -> dict[str, Any]:
        """Serve one user's request: it joins the serving thread's batch (:mod:`wdmoe.serving`:
        every step one forward for all users' tokens); this thread waits for its end. The text
        streams through ``on_text`` (called in the serving thread; raising there, e.g.
        :class:`Cancelled`, ends this request only)."""
        if self.tok is None:
            raise WdmoeError("this BS has no tokenizer: it cannot serve text generation")
        ids = encode_prompt(self.tok, req.prompt, req.chat, req.system)[0]
        check_fits(self.wm, int(ids.numel()), req.max_new_tokens)
        stats = RequestStats(next(self.request_ids), req.max_new_tokens, prompt_tokens=int(ids.numel()))
        stream = CallbackStreamer(self.tok, self.books.tee_text(stats.id, on_text))
        stream.skip_prompt = False

        def token(t: int) -> None:
            if stats.first_token_s is None:
                stats.first_token_s = time.monotonic() - stats.started
            if t not in self.engine.eos:
                stream.put(torch.tensor([t]))

        job = Job(ids, req.max_new_tokens, token, stats, req.temperature, req.top_p, req.seed)
        try:
            self.engine.submit(job).wait()
            stream.end()
        finally:
            stats.wall_s = time.monotonic() - stats.started
        stats.new_tokens = len(job.tokens)
        summary = stats.summary() | {"text": str(self.tok.decode(job.tokens, skip_special_tokens=True))}
        self.books.served_request(summary)
        return summary

    def summary(self) -> dict[str, Any]:
        """Per-device and overall figures since the BS started (what the Stats RPC serves)."""
        rows = [self.device_row(u) for u in range(self.num_slots)]
        return (
            {"boot": self.boot} | self.books.summary(rows) | {"missing_experts": len(self.registry.missing())}
        )

    def device_row(self, u: int) -> dict[str, Any]:
        """Slot ``u``: its address and state (up/down/benched/probing/absent)."""
        entry = self.registry.devices.get(u)
        usable = entry is not None and self.registry.usable(entry)
        state = entry.state(usable) if entry is not None else "absent"
        return {"slot": u, "address": entry.address if entry else "", "usable": usable, "state": state}

    def close(self) -> None:
        """Write the summary, stop listening to the model, close the links (idempotent)."""
        if self.links.loop.is_closed():
            return
        self.stopping.set()
        self.serving.join(timeout=30)
        self.wm.context.on_select = None
        self.hooks.close()
        self.books.event("summary", **self.summary())
        self.links.close(self.dispatcher.stop_watch())
        self.books.close()


def build_bs(
    model: str,
    scenario: str,
    overrides: Sequence[str],
    settings: RuntimeSettings,
    *,
    token: str,
    top_k: int | None = None,
    tls: TLSFiles | None = None,
    metrics_log: Path | None = None,
) -> BaseStation:
    """Load ``model``, keep its BS part (the experts stay only in ``fallback`` mode) and build the BS
    on the scenario's cell, priced with the dimensions of the model that runs."""
    from wdmoe.config import load_scenario
    from wdmoe.models.install import install
    from wdmoe.models.loading import load_checkpoint

    cell = load_scenario(scenario, overrides)  # bad overrides fail before the model loads
    net, tok = load_checkpoint(model)
    wm = install(net)
    if top_k is not None:
        wm.set_top_k(top_k)
    fitted = fit_scenario(cell, wm, Path(model).name if model != "default" else "default")
    if settings.mode != "fallback":
        wm.release_experts()
    return BaseStation(wm, tok, fitted, settings, token=token, tls=tls, metrics_log=metrics_log)
