"""The BS's links to its devices, on one event-loop thread (uvloop's where installed): the call
carrying a device's experts of a layer (a frame, or a bundle of frames) and the emulated downlink /
uplink delays. A call travels on the device's data plane — one persistent connection per device,
:class:`~wdmoe.runtime.dataplane.StreamClient` — when the device advertises one and the settings
say ``stream``; else as a gRPC RunExpert call on one grpc.aio channel per device. Both planes end
in the same outcome codes (UNAVAILABLE, DEADLINE_EXCEEDED, the device's refusals, WIRE). No
decisions here: the dispatcher says whom to call with what, and how long each call may take.
"""

import asyncio
import itertools
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from wdmoe.runtime.dataplane import CallFailed, StreamClient, new_event_loop
from wdmoe.runtime.device import RUN_EXPERT
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
    if not bool(torch.isfinite(y).all()):
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
        self.loop = new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="bs-links", daemon=True).start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> "Future[T]":
        """Run ``coro`` on the link loop (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def fan_out(
        self, calls: dict[int, list[Call]], dl: np.ndarray, ul: np.ndarray, budget: np.ndarray
    ) -> None:
        """Every device's calls at once; returns when all are answered or late (seconds [U])."""
        jobs = [self.device_job(g, float(dl[u]), float(ul[u]), float(budget[u])) for u, g in calls.items()]
        if jobs:
            self.submit(gather(jobs)).result()

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
        """One device's experts in one message (a bundle when there are several); the outcome is
        written into each call (never raises for the device)."""
        timeout_s = max(timeout_s, 1e-3)
        reqs = [
            ExpertRequest(c.layer, c.expert, c.hidden.to(self.wire_dtype), next(self.ids), timeout_s)
            for c in group
        ]
        frame = encode(reqs[0]) if len(reqs) == 1 else encode_bundle(list(reqs))
        try:
            reply = await self.send(group[0].device, frame, timeout_s)
            responses, _ = decode_all(reply)
        except CallFailed as err:
            for c in group:
                c.code, c.message = err.code, err.message
            return
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

    async def send(self, device: DeviceEntry, frame: bytes, timeout_s: float) -> bytes:
        """The device's reply to ``frame``: on its data plane when it has one and ours is ``stream``,
        else by gRPC RunExpert (CallFailed / grpc.RpcError when there is none in time)."""
        if not device.data_address or self.data_plane != "stream":
            reply: bytes = await self.stub(device.address)(frame, timeout=timeout_s, metadata=self.metadata)
            return reply
        client = self.streams.get(device.address)
        if client is None or client.address != device.data_address:  # new, or moved to another port
            self.streams[device.address] = StreamClient(device.data_address, self.token, self.tls)
            if client is not None:
                await client.close()
            client = self.streams[device.address]
        return await client.call(frame, timeout_s)

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

        if not self.loop.is_closed():
            done = self.submit(drop())
            if wait:
                done.result(timeout=10)

    def close(self, last: Coroutine[Any, Any, None]) -> None:
        """Run ``last`` (the caller's own clean-up), close every channel, stop the loop (idempotent)."""
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


async def gather(jobs: list[Any]) -> None:
    await asyncio.gather(*jobs)
