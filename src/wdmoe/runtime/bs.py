"""The base station of the distributed runtime: the BS part of the model, the cell, the devices.

:class:`BaseStation` holds the model without its experts (embeddings, attention, routers, LM head,
KV caches), the policy, the allocator and a channel trace that advances with the clock. It is the
model's dispatcher: for every MoE layer it

1. resolves each selected expert to a usable device (the replica with the better channel),
2. splits the band with the allocator for the layer's device loads (on the BS's estimate) and
   gives each device call a deadline derived from the latency model:
   ``time_scale · slack · t_u(estimate) + grace_s`` (``wait`` mode: ``max_wait_s``),
3. with link emulation, really waits out each device's downlink and uplink delay for the actual
   frame bytes at the rate the *true* channel gives its bandwidth (scaled by ``time_scale``),
4. sends every device its experts' tokens in parallel and gathers what comes back in time;
   an expert whose device errs, is down or misses its deadline is dropped (the block masks it and
   renormalises) — or, in ``fallback`` mode, run from the BS's local copy,
5. records the latency model's prediction and the measured latency per layer, request and device.

Forwards run one at a time (a lock): several users' requests interleave token by token.
A device that keeps failing its calls is benched (its experts go to replicas or are dropped up
front, without waiting) and probed after a back-off; a device whose heartbeats lapse is marked
down; both are events of the metrics log. :mod:`wdmoe.runtime.service` puts a BaseStation behind
gRPC (Register, Generate, Stats, health).
"""

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from wdmoe.allocation import make_allocator
from wdmoe.channel import ChannelState, generate_trace
from wdmoe.config import ModelConfig, ScenarioConfig, WireConfig, check_choice, check_range
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.generate import generate
from wdmoe.latency import DeviceTimes, bs_seconds, lm_head_flops, transfer_s
from wdmoe.models.install import WirelessModel
from wdmoe.policies import make_policy
from wdmoe.policies.costs import ExpertLatency, bs_estimate
from wdmoe.runtime import api
from wdmoe.runtime.device import RUN_EXPERT
from wdmoe.runtime.placement import DeviceEntry, ExpertKey, Registry
from wdmoe.runtime.security import TLSFiles, bearer, open_channel
from wdmoe.runtime.server import GRPC_OPTIONS
from wdmoe.runtime.wire import (
    DTYPES,
    KIND_REQUEST,
    KIND_RESPONSE,
    ExpertRequest,
    ExpertResponse,
    WireError,
    bundle_size,
    decode_all,
    encode,
    encode_bundle,
    encoded_size,
)
from wdmoe.simulate import check_model_matches

log = logging.getLogger("wdmoe.bs")
MODES = ("wait", "drop", "fallback")
WIRE_DTYPES = {str(d).removeprefix("torch."): d for d in DTYPES.values() if d.is_floating_point}


@dataclass(frozen=True)
class RuntimeSettings:
    """How the BS treats devices and links.

    mode: a late / failed expert is waited for (``wait``: up to max_wait_s), dropped (``drop``) or
    run from the BS's local copy (``fallback``). slack, grace_s: the deadline of a device call is
    time_scale·slack·t_u(estimate) + grace_s wall seconds (capped at max_wait_s).
    emulate_links: wait out the channel's DL/UL delays; time_scale: wall seconds per simulated second
    (0.001 runs an hour of cell in 3.6 s). wire_dtype: how hidden states travel (float32 is exact).
    bench_after: failed calls in a row that bench a device for bench_s (doubling while it keeps
    failing its probes, up to 60 s). max_active: generations served at once; max_queue: requests
    that may wait for a turn beyond those (more are refused with RESOURCE_EXHAUSTED).
    """

    policy: str = "topk"
    params: Mapping[str, Any] = field(default_factory=dict)
    allocator: str = "equal"
    mode: str = "drop"
    slack: float = 3.0
    grace_s: float = 0.25
    max_wait_s: float = 30.0
    emulate_links: bool = False
    time_scale: float = 1.0
    wire_dtype: str = "float32"
    heartbeat_s: float = 1.0
    bench_after: int = 3
    bench_s: float = 5.0
    max_active: int = 16
    max_queue: int = 256
    seed: int | None = None
    csi_delay_blocks: int = 0
    csi_error_std_db: float = 0.0
    trace_blocks: int = 20000

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("wire_dtype", self.wire_dtype, sorted(WIRE_DTYPES))
        check_range("slack", self.slack, 1.0, 1e6)
        check_range("grace_s", self.grace_s, 0.0, 3600.0)
        check_range("max_wait_s", self.max_wait_s, 0.0, 86400.0, lo_open=True)
        check_range("time_scale", self.time_scale, 0.0, 1e6, lo_open=True)
        check_range("heartbeat_s", self.heartbeat_s, 0.01, 3600.0)
        check_range("bench_after", self.bench_after, 1, 1e6)
        check_range("bench_s", self.bench_s, 0.0, 3600.0, lo_open=True)
        check_range("max_active", self.max_active, 1, 4096)
        check_range("max_queue", self.max_queue, 0, 1e6)
        check_range("trace_blocks", self.trace_blocks, 1, 1e8)


@dataclass
class DeviceStats:
    """What one device slot did: expert calls, failures by code, skipped experts, bytes, times (wall s)."""

    calls: int = 0
    answered: int = 0
    fallbacks: int = 0
    skipped: int = 0  # experts not sent: the device was down or benched and no replica could serve
    probes: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    bytes_dl: int = 0
    bytes_ul: int = 0
    compute_s: float = 0.0
    measured_s: float = 0.0
    predicted_s: float = 0.0
    predicted_dl_s: float = 0.0
    predicted_compute_s: float = 0.0
    predicted_ul_s: float = 0.0

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = dict(self.failures)
        d["mean_compute_ms"] = 1e3 * self.compute_s / self.answered if self.answered else 0.0
        return d


@dataclass
class RequestStats:
    """One user request: tokens, timing, the latency model's prediction against measurement."""

    id: int
    prompt_tokens: int = 0
    new_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    wall_s: float = 0.0
    context_tokens: int = 0
    forwards: list[dict[str, float]] = field(default_factory=list)  # per forward: measured/predicted
    expert_calls: int = 0
    dropped: int = 0
    fallbacks: int = 0
    bytes_dl: int = 0
    bytes_ul: int = 0

    def summary(self) -> dict[str, Any]:
        decode = self.forwards[1:]
        mean = lambda key, rows: float(np.mean([r[key] for r in rows])) if rows else 0.0  # noqa: E731
        return {
            "id": self.id,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ttft_s": self.first_token_s,
            "wall_s": self.wall_s,
            "forwards": len(self.forwards),
            "prefill_measured_s": self.forwards[0]["measured_s"] if self.forwards else 0.0,
            "prefill_predicted_s": self.forwards[0]["predicted_s"] if self.forwards else 0.0,
            "token_measured_s": mean("measured_s", decode),
            "token_predicted_s": mean("predicted_s", decode),
            "expert_calls": self.expert_calls,
            "dropped": self.dropped,
            "drop_rate": self.dropped / self.expert_calls if self.expert_calls else 0.0,
            "fallbacks": self.fallbacks,
            "bytes_dl": self.bytes_dl,
            "bytes_ul": self.bytes_ul,
        }


@dataclass
class Forward:
    """The state of the forward in flight: the channel at its start and what it has cost so far."""

    request: RequestStats | None
    estimate: ChannelState
    true: ChannelState
    view: ExpertLatency
    per_token_s: np.ndarray
    started: float
    predicted_s: float = 0.0


@dataclass
class Call:
    """One expert's tokens for one device, and what became of them."""

    layer: int
    expert: int
    hidden: torch.Tensor
    device: DeviceEntry
    outputs: torch.Tensor | None = None
    code: str = ""
    message: str = ""
    compute_s: float = 0.0


class Cancelled(Exception):
    """The user went away mid-generation."""


def runtime_scenario(scenario: ScenarioConfig, wire_dtype: torch.dtype) -> ScenarioConfig:
    """The scenario with the runtime's own message sizes: hidden states at the wire dtype's bits and
    the frame header of :mod:`wdmoe.runtime.wire`, so the latency model prices the bytes that travel."""
    header_bytes = encoded_size((0, 0), wire_dtype)
    wire = WireConfig(bits_per_element=8 * wire_dtype.itemsize, header_bits=8 * header_bytes)
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
        ffn_size=int(block.experts.down_proj.shape[-1]),
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
    """The BS: ``wm``'s dispatcher over the registered devices (see the module doc)."""

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
        self.wm, self.tok = wm, tok
        self.wire_dtype = WIRE_DTYPES[s.wire_dtype]
        self.scenario = runtime_scenario(scenario, self.wire_dtype)
        self.num_slots = scenario.cell.num_devices
        self.registry = Registry(
            self.num_slots,
            tuple(sorted(wm.blocks)),
            wm.num_experts,
            s.heartbeat_s,
            s.heartbeat_s,
            bench_after=s.bench_after,
            bench_s=s.bench_s,
        )
        seed = scenario.seed if s.seed is None else s.seed
        self.trace = generate_trace(self.scenario, s.trace_blocks, seed)
        self.csi_rng = np.random.default_rng(seed + 1)
        self.allocator = make_allocator(s.allocator)
        wm.set_policy(make_policy(s.policy, **dict(s.params)))
        self.local = wm.local_dispatcher() if s.mode == "fallback" else None
        self.metadata = bearer(token)
        self.tls = tls
        self.boot = secrets.token_hex(8)
        self.t0 = time.monotonic()
        self.stats: dict[int, DeviceStats] = {u: DeviceStats() for u in range(self.num_slots)}
        self.dropped = self.fallbacks = 0  # experts the model went without / ran at the BS
        self.served = Counter[str]()  # requests answered; sums of their per-token latencies (s)
        self.log_lock = threading.Lock()
        self.forward_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.current: Forward | None = None
        self.thread = threading.local()
        self.ids = itertools.count(1)
        self.request_ids = itertools.count(1)
        self.channels: dict[str, Any] = {}  # grpc.aio channels, used on self.loop only
        self.log_file = open(metrics_log, "a", buffering=1) if metrics_log else None  # noqa: SIM115
        self.per_token_s = self.snapshot(self.block())[2]  # the last forward's, for probes
        self.loop = asyncio.new_event_loop()  # all device calls, emulated delays and the watch run here
        threading.Thread(target=self.loop.run_forever, name="bs-links", daemon=True).start()
        self.watcher = asyncio.run_coroutine_threadsafe(self.watch(), self.loop)
        wm.set_dispatcher(self)
        self._wrap_forward()

    # --- the clock and the channel ----------------------------------------------------------

    def sim_time_s(self) -> float:
        """Simulated cell time: wall seconds since start / time_scale."""
        return (time.monotonic() - self.t0) / self.settings.time_scale

    def block(self) -> int:
        return int(self.sim_time_s() // self.trace.block_s) % self.trace.num_blocks

    def snapshot(self, block: int) -> tuple[ChannelState, ExpertLatency, np.ndarray]:
        """The BS's channel estimate at ``block``, the policy's latency view on it (experts placed on
        their best live device) and one token's time per slot [U]."""
        s = self.settings
        estimate = bs_estimate(self.trace, block, self.csi_rng, s.csi_delay_blocks, s.csi_error_std_db)
        base = ExpertLatency.from_scenario(self.scenario, estimate, placement=np.arange(self.num_slots))
        per_token = base.device_time_s(np.ones(self.num_slots))
        view = replace(base, placement=np.asarray(self.registry.expert_slots(per_token), dtype=np.int64))
        return estimate, view, per_token

    def begin_forward(self, request: RequestStats | None) -> Forward:
        """The channel snapshot this forward decides and is priced on; the policy's view of it."""
        block = self.block()
        estimate, view, per_token = self.snapshot(block)
        self.per_token_s = per_token
        self.wm.set_context(estimate, view)
        return Forward(request, estimate, self.trace.state(block), view, per_token, time.monotonic())

    # --- the model's forward, one at a time -------------------------------------------------

    def _wrap_forward(self) -> None:
        model = self.wm.model
        inner = model.forward

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            request: RequestStats | None = getattr(self.thread, "request", None)
            ids = kwargs.get("input_ids", args[0] if args else None)
            new_tokens = int(ids.shape[-1]) if ids is not None else 0
            with self.forward_lock:
                self.current = fwd = self.begin_forward(request)
                try:
                    return inner(*args, **kwargs)
                finally:
                    self.current = None
                    self.end_forward(fwd, new_tokens)

        model.forward = forward  # type: ignore[method-assign]

    def end_forward(self, fwd: Forward, new_tokens: int) -> None:
        """Add BS compute and the LM head to the forward's prediction; record it on its request."""
        request = fwd.request
        if request is None:
            return
        m = self.scenario.model
        bs_flops = self.scenario.cell.bs_flops_per_s
        bs = float(bs_seconds(m, new_tokens, request.context_tokens, bs_flops).sum())
        predicted = fwd.predicted_s + bs + lm_head_flops(m) / bs_flops
        measured = (time.monotonic() - fwd.started) / self.settings.time_scale
        request.forwards.append(
            {"measured_s": measured, "predicted_s": predicted, "moe_predicted_s": fwd.predicted_s}
        )
        request.context_tokens += new_tokens

    # --- the dispatcher -----------------------------------------------------------------------

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Send each expert's tokens to its device; outputs of the experts that made it in time."""
        fwd = self.current or self.begin_forward(None)
        start = time.monotonic()
        s = self.settings
        calls: dict[int, list[Call]] = {}
        lost: list[Call] = []
        for e, x in inputs.items():
            device = self.registry.choose((layer, e), fwd.per_token_s)
            if device is None:
                owner = self.registry.preferred((layer, e), fwd.per_token_s)
                nowhere = owner or DeviceEntry(-1, "", frozenset(), "", 0.0)
                message = f"no usable device hosts layer {layer} expert {e}"
                lost.append(Call(layer, e, x, nowhere, code="NO_DEVICE", message=message))
            else:
                calls.setdefault(device.slot, []).append(Call(layer, e, x, device))
        tokens = np.zeros(self.num_slots)
        bytes_dl = np.zeros(self.num_slots)
        bytes_ul = np.zeros(self.num_slots)
        for u, group in calls.items():
            tokens[u] = sum(len(c.hidden) for c in group)
            bytes_dl[u] = self.message_bytes(group, KIND_REQUEST)
            bytes_ul[u] = self.message_bytes(group, KIND_RESPONSE)
        view = fwd.view.allocate_devices(self.allocator, tokens)
        expected = view.device_time_s(tokens)  # on the BS's estimate: what the deadline trusts
        true = view.times_on(fwd.true, tokens)  # the prediction on the channel the links really have
        with np.errstate(invalid="ignore"):
            budget = np.minimum(s.time_scale * s.slack * expected + s.grace_s, s.max_wait_s)
        budget = np.where(np.isfinite(budget), budget, s.max_wait_s)
        if s.mode == "wait":
            budget = np.full(self.num_slots, s.max_wait_s)
        dl = np.zeros(self.num_slots)
        ul = np.zeros(self.num_slots)
        if s.emulate_links:
            dl = s.time_scale * transfer_s(8 * bytes_dl, fwd.true.dl.rate_bps(view.bandwidth_hz))
            ul = s.time_scale * transfer_s(8 * bytes_ul, fwd.true.ul.rate_bps(view.bandwidth_hz))
        self.fan_out(calls, dl, ul, budget)
        retries = self.fail_over(layer, fwd, calls, budget)
        busy = tokens > 0
        predicted = float(np.max(np.where(busy, true.total_s, 0.0), initial=0.0))
        fwd.predicted_s += predicted
        measured = (time.monotonic() - start) / s.time_scale
        return self.finish(layer, fwd, calls, retries, lost, true, measured)

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
            self.fan_out(again, zeros, zeros, budget)
        return again

    def mark_down(self, c: Call) -> None:
        if self.registry.mark_down(c.device.address):
            self.event("device_down", slot=c.device.slot, address=c.device.address, reason=c.message[:200])
            self.forget(c.device.address)

    def fan_out(
        self, calls: dict[int, list[Call]], dl: np.ndarray, ul: np.ndarray, budget: np.ndarray
    ) -> None:
        """Every device's calls at once on the event loop; returns when all are answered or late."""
        jobs = [self.device_job(g, float(dl[u]), float(ul[u]), float(budget[u])) for u, g in calls.items()]
        if jobs:
            asyncio.run_coroutine_threadsafe(gather(jobs), self.loop).result()

    async def device_job(self, group: list[Call], dl_s: float, ul_s: float, budget_s: float) -> None:
        """One device's calls through its (emulated) link: downlink delay, the calls, uplink delay —
        never past ``budget_s`` from now (a late answer is a miss, as on a real link)."""
        deadline = self.loop.time() + budget_s
        try:
            async with asyncio.timeout(budget_s):
                if dl_s > 0:
                    await asyncio.sleep(dl_s)
                await self.call(group, deadline - self.loop.time())
                if ul_s > 0 and any(c.outputs is not None for c in group):
                    await asyncio.sleep(ul_s)
        except TimeoutError:
            late = "the device's link or answer ended past the deadline"
            for c in group:
                if c.outputs is not None or not c.code:
                    c.outputs, c.code, c.message = None, "DEADLINE_EXCEEDED", late

    async def call(self, group: list[Call], timeout_s: float) -> None:
        """One device's experts in one RunExpert message (a bundle when there are several); the
        outcome is written into each call (never raises for the device)."""
        timeout_s = max(timeout_s, 1e-3)
        reqs = [
            ExpertRequest(c.layer, c.expert, c.hidden.to(self.wire_dtype), next(self.ids), timeout_s)
            for c in group
        ]
        frame = encode(reqs[0]) if len(reqs) == 1 else encode_bundle(list(reqs))
        try:
            reply = await self.stub(group[0].device.address)(frame, timeout=timeout_s, metadata=self.metadata)
            responses, _ = decode_all(reply)
        except grpc.RpcError as err:  # grpc.aio.AioRpcError
            for c in group:
                c.code, c.message = err.code().name, str(err.details())
            return
        except WireError as err:
            for c in group:
                c.code, c.message = "WIRE", f"malformed answer: {err}"
            return
        by_id = {r.request_id: r for r in responses if isinstance(r, ExpertResponse)}
        for c, req in zip(group, reqs, strict=True):
            resp = by_id.get(req.request_id)
            code, problem = answer_problem(resp, c.hidden)
            if resp is None or code:
                c.code, c.message = code, problem
            else:
                c.outputs, c.compute_s = resp.outputs.to(c.hidden.dtype), resp.compute_s

    def message_bytes(self, group: list[Call], kind: int) -> int:
        """Bytes of the message carrying ``group`` (a frame, or a bundle of frames)."""
        sizes = [encoded_size(tuple(c.hidden.shape), self.wire_dtype, kind) for c in group]
        return sizes[0] if len(sizes) == 1 else bundle_size(sizes)

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
        """Outputs, fallbacks, down-marking and the books (a retried expert counts as two calls)."""
        outputs: dict[int, torch.Tensor] = {}
        request = fwd.request
        sent = inputs_of(calls) + inputs_of(retries)
        with self.stats_lock:
            for u in calls:
                st = self.stats[u]
                st.predicted_s += float(predicted.total_s[u])
                st.predicted_dl_s += float(predicted.downlink_s[u])
                st.predicted_compute_s += float(predicted.compute_s[u])
                st.predicted_ul_s += float(predicted.uplink_s[u])
                st.measured_s += measured_s
            down = up = 0
            for c in sent:
                st = self.stats[c.device.slot]
                st.calls += 1
                n = tuple(c.hidden.shape)
                sent_bytes = encoded_size(n, self.wire_dtype)
                st.bytes_dl += sent_bytes
                down += sent_bytes
                if c.outputs is not None:
                    got_bytes = encoded_size(n, self.wire_dtype, KIND_RESPONSE)
                    st.answered += 1
                    st.compute_s += c.compute_s
                    st.bytes_ul += got_bytes
                    up += got_bytes
                    outputs[c.expert] = c.outputs
                else:
                    st.failures[c.code] += 1
            for c in lost:
                if c.device.slot >= 0:
                    self.stats[c.device.slot].skipped += 1
            failed = list(lost) + [c for c in inputs_of(calls) if c.expert not in outputs]
            if request is not None:
                request.expert_calls += len(sent) + len(lost)
                request.bytes_dl += down
                request.bytes_ul += up
        for c in inputs_of(retries):
            if c.code == "UNAVAILABLE":
                self.mark_down(c)
        self.judge(calls, retries)
        if failed and self.local is not None:
            local = self.local.run(layer, {c.expert: c.hidden for c in failed})
            outputs.update(local)
        self.count_failed(failed, request, fallback=self.local is not None)
        return outputs

    def count_failed(self, failed: list[Call], request: RequestStats | None, fallback: bool) -> None:
        """Experts without a device answer: run at the BS (fallback) or dropped, in every book."""
        if not failed:
            return
        with self.stats_lock:
            if fallback:
                self.fallbacks += len(failed)
                for c in failed:
                    if c.device.slot >= 0:
                        self.stats[c.device.slot].fallbacks += 1
            else:
                self.dropped += len(failed)
            if request is not None and fallback:
                request.fallbacks += len(failed)
            elif request is not None:
                request.dropped += len(failed)

    def judge(self, *rounds: dict[int, list[Call]]) -> None:
        """One strike per device message that failed (not for an unreachable device: that one is
        down already), a clean record for one answered; a device with too many strikes is benched."""
        for calls in rounds:
            for u, group in calls.items():
                if any(c.code == "UNAVAILABLE" for c in group):
                    continue
                answered = all(c.outputs is not None for c in group)
                if self.registry.record(u, answered) and not answered:
                    entry = group[0].device
                    bad = next(c for c in group if c.outputs is None)
                    self.event(
                        "device_benched",
                        slot=u,
                        address=entry.address,
                        backoff_s=self.registry.backoff_s(entry),
                        reason=f"{self.settings.bench_after} failed calls in a row, the last "
                        f"{bad.code}: {bad.message[:200]}",
                    )

    # --- channels to devices ------------------------------------------------------------------

    def stub(self, address: str) -> Any:
        """RunExpert on ``address`` (on the BS's event loop; one channel per device, reused)."""
        channel = self.channels.get(address)
        if channel is None:
            channel = self.channels[address] = open_channel(address, self.tls, GRPC_OPTIONS, aio=True)
        return channel.unary_unary(RUN_EXPERT)

    def forget(self, address: str, wait: bool = True) -> None:
        """Close the channel to ``address``: the next call connects afresh (no reconnect back-off).
        ``wait=False``: only schedule it (a handler of the API must not block on the link loop)."""

        async def drop() -> None:
            channel = self.channels.pop(address, None)
            if channel is not None:
                await channel.close()

        if not self.loop.is_closed():
            done = asyncio.run_coroutine_threadsafe(drop(), self.loop)
            if wait:
                done.result(timeout=10)

    # --- liveness: lapsed heartbeats, probes of benched devices -------------------------------

    async def shutdown(self) -> None:
        """On the link loop: stop the watch, close every device channel."""
        self.watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wrap_future(self.watcher)
        channels = list(self.channels.values())
        self.channels.clear()
        for channel in channels:
            await channel.close()

    async def watch(self) -> None:
        """Every quarter heartbeat: announce devices whose heartbeats lapsed; probe benched devices
        whose back-off has passed (a probe never holds up a user's forward)."""
        period = self.settings.heartbeat_s / 4
        while True:
            for entry in self.registry.expire():
                ago = time.monotonic() - entry.last_seen
                self.event(
                    "device_down",
                    slot=entry.slot,
                    address=entry.address,
                    reason=f"missed heartbeats: last seen {ago:.1f} s ago",
                )
            for entry in self.registry.due_probes():
                self.loop.create_task(self.probe(entry))
            await asyncio.sleep(period)

    async def probe(self, entry: DeviceEntry) -> None:
        """One token through one of ``entry``'s experts, with the deadline a real call would get;
        readmits the device when it answers in time, benches it again otherwise."""
        s = self.settings
        layer, expert = min(entry.experts)
        hidden = torch.zeros(1, self.scenario.model.hidden_size)
        budget = s.time_scale * s.slack * float(self.per_token_s[entry.slot]) + s.grace_s
        call = Call(layer, expert, hidden, entry)
        try:
            async with asyncio.timeout(min(budget, s.max_wait_s)):
                await self.call([call], budget)
        except TimeoutError:
            call.outputs, call.code = None, "DEADLINE_EXCEEDED"
        with self.stats_lock:
            self.stats[entry.slot].probes += 1
        if self.registry.probe_result(entry.slot, call.outputs is not None):
            self.event("device_readmitted", slot=entry.slot, address=entry.address)
        else:
            reason = f"probe failed: {call.code} {call.message[:200]}".strip()
            backoff = self.registry.backoff_s(entry)
            self.event(
                "device_benched", slot=entry.slot, address=entry.address, backoff_s=backoff, reason=reason
            )

    # --- devices, users, metrics ----------------------------------------------------------------

    def register(self, reg: api.Registration, static: bool = False) -> DeviceEntry:
        entry, came_up = self.registry.register(reg.slot, reg.address, reg.experts, reg.name, static)
        if came_up:
            self.forget(reg.address, wait=False)
            self.event(
                "device_up", slot=reg.slot, address=reg.address, experts=len(reg.experts), name=reg.name
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
        """Run one user's request in this thread (interleaving with others per forward)."""
        if self.tok is None:
            raise WdmoeError("this BS has no tokenizer: it cannot serve text generation")
        stats = RequestStats(next(self.request_ids))
        self.thread.request = stats

        def text(piece: str) -> None:
            if stats.first_token_s is None:
                stats.first_token_s = time.monotonic() - stats.started
            on_text(piece)

        try:
            result = generate(
                self.wm,
                self.tok,
                req.prompt,
                max_new_tokens=req.max_new_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                chat=req.chat,
                system=req.system,
                on_text=text,
                record=False,
            )
        finally:
            self.thread.request = None
            stats.wall_s = time.monotonic() - stats.started
        stats.prompt_tokens, stats.new_tokens = result.prompt_tokens, result.new_tokens
        summary = stats.summary() | {"text": result.text}
        with self.stats_lock:
            self.served.update(
                requests=1,
                token_measured_s=summary["token_measured_s"],
                token_predicted_s=summary["token_predicted_s"],
            )
        self.event("request", **{k: v for k, v in summary.items() if k != "text"})
        return summary

    def summary(self) -> dict[str, Any]:
        """Per-device and overall figures since the BS started."""
        with self.stats_lock:
            devices = [self.device_row(u, st) for u, st in self.stats.items()]
            served = self.served.copy()
            dropped, fallbacks = self.dropped, self.fallbacks
        n = served["requests"]
        return {
            "boot": self.boot,
            "devices": devices,
            "requests": n,
            "totals": {
                "expert_calls": sum(d["calls"] for d in devices),
                "failed_calls": sum(sum(d["failures"].values()) for d in devices),
                "skipped": sum(d["skipped"] for d in devices),
                "dropped": dropped,
                "fallbacks": fallbacks,
                "bytes_dl": sum(d["bytes_dl"] for d in devices),
                "bytes_ul": sum(d["bytes_ul"] for d in devices),
                "mean_token_measured_s": served["token_measured_s"] / n if n else 0.0,
                "mean_token_predicted_s": served["token_predicted_s"] / n if n else 0.0,
            },
            "missing_experts": len(self.registry.missing()),
        }

    def device_row(self, u: int, st: DeviceStats) -> dict[str, Any]:
        """Slot ``u``'s line of the summary: where it is, its state (up/down/benched/probing/absent)."""
        entry = self.registry.devices.get(u)
        usable = entry is not None and self.registry.usable(entry)
        state = entry.state(usable) if entry is not None else "absent"
        address = entry.address if entry else ""
        return {"slot": u, "address": address, "usable": usable, "state": state} | st.row()

    def event(self, kind: str, **values: Any) -> None:
        """One line of the metrics log (JSON) and the Python log (from any thread)."""
        log.info("%s %s", kind, values)
        line = json.dumps({"event": kind, "time_s": time.time()} | values, default=str) + "\n"
        with self.log_lock:
            if self.log_file is not None:
                self.log_file.write(line)

    def close(self) -> None:
        """Write the summary, close the device channels and stop the event loop (idempotent)."""
        if self.loop.is_closed():
            return
        self.event("summary", **self.summary())
        asyncio.run_coroutine_threadsafe(self.shutdown(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        while self.loop.is_running():
            time.sleep(0.001)
        self.loop.close()
        with self.log_lock:
            if self.log_file is not None:
                self.log_file.close()
                self.log_file = None


def answer_problem(resp: ExpertResponse | None, hidden: torch.Tensor) -> tuple[str, str]:
    """(code, message) of what is wrong with a device's answer to ``hidden`` [n, D]; ("", "") when
    nothing: missing or of another shape or kind (WIRE), or holding NaN/inf (NONFINITE)."""
    if resp is None:
        return "WIRE", f"no answer for hidden {list(hidden.shape)}"
    y = resp.outputs
    if y.shape != hidden.shape or not y.is_floating_point():
        return "WIRE", f"outputs {y.dtype} {list(y.shape)} for hidden {list(hidden.shape)}"
    if not bool(torch.isfinite(y).all()):
        return "NONFINITE", f"outputs [{y.shape[0]}, {y.shape[-1]}] hold NaN or inf"
    return "", ""


def inputs_of(calls: dict[int, list[Call]]) -> list[Call]:
    return [c for g in calls.values() for c in g]


async def gather(jobs: list[Any]) -> None:
    await asyncio.gather(*jobs)


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
