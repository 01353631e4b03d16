"""The BS's links to its devices, on one event-loop thread (uvloop's where installed): the call
carrying a device's experts of a layer (a frame, or a bundle of frames) and the emulated downlink /
uplink delays. A call travels on the device's data plane — one persistent connection per device,
:class:`~wdmoe.runtime.dataplane.StreamClient` — when the device advertises one and the settings
say ``stream``; else as a gRPC RunExpert call on one grpc.aio channel per device. Both planes end
in the same outcome codes (UNAVAILABLE, DEADLINE_EXCEEDED, the device's refusals, WIRE). No
decisions here: the dispatcher says whom to call with what, and how long each call may take.

A layer costs as little as it can (``benchmarks/runtime.py``): frames are encoded and answers
decoded in the caller's thread. A message without TLS or emulated delays travels on the device's
direct lane (:mod:`.direct`: the same protocol on a non-blocking socket written and polled from
the caller's thread, no loop at all); the rest enter the loop once per layer, where one over a
live connection without emulated delays is written at once and cut by a timer (no task, no
``asyncio.timeout``) and the others go through :meth:`Links.device_job`. Each answered message's wall
time is kept for the software's own cost per message (:meth:`Links.overhead_samples`).
"""

import asyncio
import itertools
import math
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from wdmoe.latency.overhead import overhead_samples_s
from wdmoe.runtime.dataplane import CallFailed, Reply, StreamClient, new_event_loop
from wdmoe.runtime.device import RUN_EXPERT
from wdmoe.runtime.direct import Lanes
from wdmoe.runtime.placement import DeviceEntry
from wdmoe.runtime.security import TLSFiles, bearer, open_channel
from wdmoe.runtime.server import GRPC_OPTIONS
from wdmoe.runtime.wire import (
    ExpertRequest,
    ExpertResponse,
    WireError,
    bundle_size,
    decode_all,
    encode,
    encode_bundle,
    encoded_size,
    in_format,
    value_of,
)

T = TypeVar("T")


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
    answered_s: float = math.nan  # time.monotonic() when its message's answer was in


@dataclass
class Message:
    """One device's calls of a layer as one message: the calls, their requests, the frame (a frame
    or a bundle of frames), the emulated link delays and the budget (wall s), and what became of
    it: the reply, or the code and message of why there is none."""

    group: list[Call]
    requests: list[ExpertRequest]
    frame: bytes
    dl_s: float = 0.0
    ul_s: float = 0.0
    budget_s: float = 1.0
    reply: bytes | None = None
    error: tuple[str, str] = ("", "")
    sent_s: float = math.nan  # time.monotonic(): sent, answered (emulated links included)
    answered_s: float = math.nan

    def answered(self, now_s: float) -> None:
        self.answered_s = now_s


def inputs_of(calls: dict[int, list[Call]]) -> list[Call]:
    return [c for g in calls.values() for c in g]


def answer_problem(resp: ExpertResponse | None, hidden: torch.Tensor) -> tuple[str, str]:
    """(code, message) of what is wrong with a device's answer to ``hidden`` [n, D]; ("", "") when
    nothing: missing or of another shape or kind (WIRE), or holding NaN/inf (NONFINITE)."""
    if resp is None:
        return "WIRE", f"no answer for hidden {list(hidden.shape)}"
    y = resp.outputs
    if y.shape != hidden.shape or not y.is_floating_point():
        return "WIRE", f"outputs {y.dtype} {list(y.shape)} for hidden {list(hidden.shape)}"
    if not math.isfinite(float(y.sum())) and not bool(torch.isfinite(y).all()):  # a finite sum: all finite
        return "NONFINITE", f"outputs [{y.shape[0]}, {y.shape[-1]}] hold NaN or inf"
    return "", ""


class Links:
    """Channels to the devices and the calls over them, all on one event loop (``loop``)."""

    def __init__(
        self, wire_dtype: torch.dtype, token: str, tls: TLSFiles | None = None, data_plane: str = "stream"
    ) -> None:
        self.wire_dtype, self.tls, self.token, self.metadata = wire_dtype, tls, token, bearer(token)
        self.data_plane = data_plane
        self.ids = itertools.count(1)
        # by device address, used on self.loop only: grpc.aio channels, data-plane connections
        self.channels: dict[str, Any] = {}
        self.streams: dict[str, StreamClient] = {}
        self.closing: set[asyncio.Task[None]] = set()
        self.lanes = Lanes(token)  # the direct lanes, used from fan_out's caller
        self.loop = new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="bs-links", daemon=True).start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> "Future[T]":
        """Run ``coro`` on the link loop (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def fan_out(
        self,
        calls: dict[int, list[Call]],
        dl: np.ndarray,
        ul: np.ndarray,
        budget: np.ndarray,
        formats: Sequence[str] = (),
    ) -> None:
        """Every device's calls at once; returns when all are answered or late (seconds [U]); device
        u's hidden states travel, both ways, in wire format ``formats[u]`` (none given: "none").
        The frames are encoded and the answers decoded here, in the caller's thread. Messages that
        can travel on a direct lane (:meth:`lane_for`) are sent and awaited from this thread; the
        rest go through the link loop, entered once per layer, meanwhile."""
        fmt = lambda u: formats[u] if formats else "none"  # noqa: E731
        messages = [
            self.message(g, float(dl[u]), float(ul[u]), float(budget[u]), fmt(u)) for u, g in calls.items()
        ]
        lanes = [self.lane_for(m) for m in messages]
        direct = [(m, lane) for m, lane in zip(messages, lanes, strict=True) if lane is not None]
        rest = [m for m, lane in zip(messages, lanes, strict=True) if lane is None]
        later = self.submit(self.exchange(rest)) if rest else None
        if direct:
            self.run_direct(direct)
        if later is not None:
            later.result()
        for m in messages:
            self.settle(m)

    def lane_for(self, m: Message) -> str | None:
        """The data address a message travels to on a direct lane (:mod:`.direct`), or None: when
        the device has no data plane or ours is gRPC, with TLS, or with link delays to emulate."""
        device = m.group[0].device
        plain = self.data_plane == "stream" and self.tls is None and not (m.dl_s or m.ul_s)
        return device.data_address if plain and device.data_address else None

    def run_direct(self, routed: list[tuple[Message, str]]) -> None:
        """The messages on their devices' direct lanes (each with its data address; from this thread)."""
        jobs = [(m.group[0].device.address, lane, m.frame, m.budget_s) for m, lane in routed]
        for (m, _), o in zip(routed, self.lanes.run(jobs), strict=True):
            m.reply, m.error, m.sent_s, m.answered_s = o.reply, o.error, o.sent_s, o.answered_s

    def message(
        self,
        group: list[Call],
        dl_s: float = 0.0,
        ul_s: float = 0.0,
        budget_s: float = 1.0,
        fmt: str = "none",
    ) -> Message:
        """One device's experts in one message (a bundle when there are several); each frame's own
        deadline is what is left of the budget once the downlink has carried it. ``fmt``: the wire
        format of the hidden states and of the answer (:mod:`wdmoe.formats`; "none": cast to
        ``wire_dtype``, the answer in the same dtype)."""
        timeout_s = max(budget_s - dl_s, 1e-3)
        reqs = []
        for c in group:
            if fmt == "none":
                reqs.append(
                    ExpertRequest(c.layer, c.expert, c.hidden.to(self.wire_dtype), next(self.ids), timeout_s)
                )
                continue
            values, scales = in_format(c.hidden, fmt)
            reqs.append(ExpertRequest(c.layer, c.expert, values, next(self.ids), timeout_s, scales, fmt))
        frame = encode(reqs[0]) if len(reqs) == 1 else encode_bundle(list(reqs))
        return Message(group, reqs, frame, dl_s, ul_s, budget_s)

    async def exchange(self, messages: list[Message]) -> None:
        """On the loop: every message on its way at once, back when each is answered or past its
        budget. A message over a live data-plane connection without emulated delays is written
        straight away and cut by a timer; any other (a link to emulate, gRPC, a connection to make)
        travels in a task of its own (:meth:`device_job`)."""
        loop = self.loop
        direct: list[tuple[Message, StreamClient, int, Reply, asyncio.TimerHandle]] = []
        tasks = []
        for m in messages:
            client = self.stream_client(m.group[0].device)
            writer = client.writer if client is not None and not (m.dl_s or m.ul_s) else None
            if client is None or writer is None or writer.is_closing():
                tasks.append(loop.create_task(self.device_job(m)))
                continue
            m.sent_s = time.monotonic()
            call_id, reply = client.send(writer, m.frame)
            reply.add_done_callback(lambda _, m=m: m.answered(time.monotonic()))  # type: ignore[misc]
            late = CallFailed("DEADLINE_EXCEEDED", f"no answer within {m.budget_s:.3f} s")
            timer = loop.call_at(loop.time() + m.budget_s, cut, reply, late)
            direct.append((m, client, call_id, reply, timer))
        for m, client, call_id, reply, timer in direct:
            try:
                m.reply = client.outcome(*await reply)
            except CallFailed as err:
                m.error = (err.code, err.message)
            finally:
                timer.cancel()
                client.forget(call_id, reply)
        if tasks:
            await asyncio.gather(*tasks)

    async def device_job(self, m: Message) -> None:
        """One device's message through its (emulated) link: downlink delay, the call, uplink delay —
        never past its budget from now (a late answer is a miss, as on a real link)."""
        m.sent_s = time.monotonic()
        deadline = self.loop.time() + m.budget_s
        try:
            async with asyncio.timeout(m.budget_s):
                if m.dl_s > 0:
                    await asyncio.sleep(m.dl_s)
                await self.transfer(m, deadline - self.loop.time())
                if m.ul_s > 0 and m.reply is not None:
                    await asyncio.sleep(m.ul_s)
                m.answered(time.monotonic())
        except TimeoutError:
            if m.reply is not None or not m.error[0]:
                late = "the device's link or answer ended past the deadline"
                m.reply, m.error = None, ("DEADLINE_EXCEEDED", late)

    async def transfer(self, m: Message, timeout_s: float) -> None:
        """The call carrying ``m``: its reply, or the code and message of why there is none."""
        try:
            m.reply = await self.send(m.group[0].device, m.frame, max(timeout_s, 1e-3))
        except CallFailed as err:
            m.error = (err.code, err.message)
        except grpc.RpcError as err:  # grpc.aio.AioRpcError
            m.error = (err.code().name, str(err.details()))

    async def call(self, group: list[Call], timeout_s: float) -> None:
        """One device's experts in one message, without link emulation; the outcome is written into
        each call (never raises for the device)."""
        m = self.message(group, budget_s=max(timeout_s, 1e-3))
        await self.transfer(m, m.budget_s)
        self.settle(m)

    @staticmethod
    def settle(m: Message) -> None:
        """Write each call's outcome: its outputs, or the code and message of why there are none."""
        if m.reply is None:
            for c in m.group:
                c.code, c.message = m.error
            return
        try:
            responses, _ = decode_all(m.reply)
        except WireError as err:
            for c in m.group:
                c.code, c.message = "WIRE", f"malformed answer: {err}"
            return
        by_id = {r.request_id: r for r in responses if isinstance(r, ExpertResponse)}
        for c, req in zip(m.group, m.requests, strict=True):
            resp = by_id.get(req.request_id)
            if resp is not None and resp.scales is not None:  # a scaled format: decoded to float32
                resp = replace(resp, outputs=value_of(resp.outputs, resp.scales), scales=None)
            code, problem = answer_problem(resp, c.hidden)
            if resp is None or code:
                c.code, c.message = code, problem
            else:
                c.outputs, c.compute_s = resp.outputs.to(c.hidden.dtype), resp.compute_s
                c.answered_s = m.answered_s

    def message_bytes(self, group: list[Call], kind: int, fmt: str = "none") -> int:
        """Bytes of the message carrying ``group`` (a frame, or a bundle of frames) in ``fmt``."""
        sizes = [encoded_size(tuple(c.hidden.shape), self.frame_format(fmt), kind) for c in group]
        return sizes[0] if len(sizes) == 1 else bundle_size(sizes)

    def frame_format(self, fmt: str) -> torch.dtype | str:
        """What :func:`~wdmoe.runtime.wire.encoded_size` sizes a frame in ``fmt`` by."""
        return self.wire_dtype if fmt == "none" else fmt

    async def send(self, device: DeviceEntry, frame: bytes, timeout_s: float) -> bytes:
        """The device's reply to ``frame``: on its data plane when it has one and ours is ``stream``,
        else by gRPC RunExpert (CallFailed / grpc.RpcError when there is none in time)."""
        client = self.stream_client(device)
        if client is None:
            reply: bytes = await self.stub(device.address)(frame, timeout=timeout_s, metadata=self.metadata)
            return reply
        return await client.call(frame, timeout_s)

    def stream_client(self, device: DeviceEntry) -> StreamClient | None:
        """On the link loop: the device's data-plane client (made when new, or when the device moved
        to another port: the old one is closed), or None when it is called over gRPC."""
        if not device.data_address or self.data_plane != "stream":
            return None
        client = self.streams.get(device.address)
        if client is None or client.address != device.data_address:
            self.streams[device.address] = StreamClient(device.data_address, self.token, self.tls)
            if client is not None:  # closed in the background (a task kept until it is done)
                closing = self.loop.create_task(client.close())
                self.closing.add(closing)
                closing.add_done_callback(self.closing.discard)
        return self.streams[device.address]

    def overhead_samples(
        self,
        calls: dict[int, list[Call]],
        modelled_s: np.ndarray,
        time_scale: float,
        span: tuple[float, float],
    ) -> tuple[np.ndarray, dict[int, float]]:
        """What each device's message of a layer took beyond its price ``modelled_s`` [U] (s of the
        cell; NaN: no answer) — seen from the layer, whose ``span`` (monotonic s) ran from its start
        to its answers decoded: w_u = (its answer − the start) + (the end − the last answer), so the
        BS's own work before the calls and after the last answer counts too — and the ping round
        trip of each device on a data-plane connection (s of the cell; :mod:`wdmoe.latency.overhead`)."""
        answered = {u: g[0].answered_s for u, g in calls.items() if all(c.outputs is not None for c in g)}
        wall_s = np.full(len(modelled_s), np.nan)
        if answered:
            tail_s = span[1] - max(answered.values())
            for u, at_s in answered.items():
                wall_s[u] = at_s - span[0] + tail_s
        pings: dict[int, float] = {}
        for u, group in calls.items():
            address = group[0].device.address
            client = self.streams.get(address)
            ping_s = self.lanes.ping_s(address) or (None if client is None else client.ping_s)
            if ping_s is not None:
                pings[u] = ping_s / time_scale
        return overhead_samples_s(wall_s, modelled_s, time_scale), pings

    def stub(self, address: str) -> Any:
        """RunExpert on ``address`` (on the link loop; one channel per device, reused)."""
        channel = self.channels.get(address)
        if channel is None:
            channel = self.channels[address] = open_channel(address, self.tls, GRPC_OPTIONS, aio=True)
        return channel.unary_unary(RUN_EXPERT)

    def forget(self, address: str, wait: bool = True) -> None:
        """Close the channel and the data-plane connection to ``address``: the next call connects
        afresh (no reconnect back-off). ``wait=False``: only schedule it (a handler of the API must
        not block on the link loop)."""

        async def drop() -> None:
            channel, stream = self.channels.pop(address, None), self.streams.pop(address, None)
            if channel is not None:
                await channel.close()
            if stream is not None:
                await stream.close()

        self.lanes.forget(address, wait)
        if not self.loop.is_closed():
            done = self.submit(drop())
            if wait:
                done.result(timeout=10)

    def close(self, last: Coroutine[Any, Any, None]) -> None:
        """Run ``last`` (the caller's own clean-up), close every channel, stop the loop (idempotent)."""
        self.lanes.close()
        if self.loop.is_closed():
            last.close()
            return
        self.submit(self._close(last)).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        while self.loop.is_running():
            time.sleep(0.001)
        self.loop.close()

    async def _close(self, last: Coroutine[Any, Any, None]) -> None:
        await last
        channels, streams = list(self.channels.values()), list(self.streams.values())
        self.channels.clear()
        self.streams.clear()
        for channel in channels:
            await channel.close()
        for stream in streams:
            await stream.close()


def cut(reply: Reply, late: CallFailed) -> None:
    """A direct call's timer: the call fails DEADLINE_EXCEEDED unless its reply came first."""
    if not reply.done():
        reply.set_exception(late)
