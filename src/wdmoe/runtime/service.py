"""The BS's gRPC face: Register, Generate (streaming), Stats and health over a BaseStation.

The server is grpc.aio (:class:`~wdmoe.runtime.server.AsyncServer`): every handler is a coroutine
on one event-loop thread, so streams hold no thread, and heartbeats, health and Stats are answered
at once however many users are streaming. Generations run in threads of their own; a
:class:`Gate` admits ``max_active`` of them at a time and lets up to ``max_queue`` more wait their
turn in arrival order (a waiting client hears ``{"queued": position}`` every few seconds); beyond
that a request is refused with RESOURCE_EXHAUSTED, so a crowd never degrades everyone's answers.
All but health need the shared token (optionally over mutual TLS).

With ``dashboard=(host, port)`` the BS also serves its live page, its event stream and its
Prometheus ``/metrics`` over HTTP beside the gRPC server (:func:`wdmoe.runtime.pulse.attach_dashboard`;
the page's controls take the same token).
"""

import asyncio
import collections
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from wdmoe.errors import WdmoeError
from wdmoe.runtime import api
from wdmoe.runtime.bs import BaseStation, Cancelled
from wdmoe.runtime.placement import PlacementError
from wdmoe.runtime.server import AsyncServer

if TYPE_CHECKING:
    from wdmoe.dashboard.http import DashboardServer

log = logging.getLogger("wdmoe.bs")
QUEUED_EVERY_S = 5.0  # how often a waiting request hears its place in the queue


class Gate:
    """At most ``active`` holders at once; up to ``queue`` more wait in arrival order (one loop only)."""

    def __init__(self, active: int, queue: int) -> None:
        self.active, self.limit = active, queue
        self.running = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.refused = 0

    def full(self) -> bool:
        return self.running >= self.active and len(self.waiting) >= self.limit

    def join(self) -> "asyncio.Future[None]":
        """A ticket that is done when it is this holder's turn (at once if there is room)."""
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.running < self.active and not self.waiting:
            self.running += 1
            ticket.set_result(None)
        else:
            self.waiting.append(ticket)
        return ticket

    def position(self, ticket: "asyncio.Future[None]") -> int:
        return self.waiting.index(ticket) + 1 if ticket in self.waiting else 0

    def leave(self, ticket: "asyncio.Future[None]") -> None:
        """A holder gone before it started: out of the queue, or its turn passed on."""
        if ticket in self.waiting:
            self.waiting.remove(ticket)
        elif ticket.done() and not ticket.cancelled():
            self.release()

    def release(self) -> None:
        """A holder finished: the turn goes to the first waiter still there."""
        while self.waiting:
            ticket = self.waiting.popleft()
            if not ticket.done():
                ticket.set_result(None)
                return
        self.running -= 1


class BSService:
    """Register / Generate / Stats handlers over a BaseStation; errors become gRPC statuses."""

    def __init__(self, bs: BaseStation) -> None:
        self.bs = bs
        self.gate = Gate(bs.settings.max_active, bs.settings.max_queue)
        # one thread per admitted generation, reused: the gate never admits more than this many
        self.workers = ThreadPoolExecutor(bs.settings.max_active, thread_name_prefix="generate")

    async def register(self, request: bytes, context: Any) -> bytes:
        try:
            entry = self.bs.register(api.parse_registration(request))
        except (api.ApiError, PlacementError) as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"registration refused: {err}")
        reply = {"boot": self.bs.boot, "heartbeat_s": self.bs.settings.heartbeat_s, "slot": entry.slot}
        return api.dump(reply)

    async def stats(self, request: bytes, context: Any) -> bytes:
        try:
            api.load(request, "Stats")
        except api.ApiError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        g = self.gate
        queue = {"active": g.running, "queued": len(g.waiting), "refused": g.refused}
        return api.dump(self.bs.summary() | {"queue": queue})

    async def generate(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        """Wait for a turn (telling the client its place), then stream the text as it is decoded,
        then one message with the request's metrics."""
        try:
            req = api.parse_generate(request)
        except api.ApiError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if self.gate.full():
            self.gate.refused += 1
            g = self.gate
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the BS is serving {g.running} requests with {len(g.waiting)} waiting (its limits: "
                "--max-active, --max-queue); try again later",
            )
        ticket = self.gate.join()
        try:
            while not ticket.done():
                done, _ = await asyncio.wait({ticket}, timeout=QUEUED_EVERY_S)
                if not done:
                    yield json.dumps({"queued": self.gate.position(ticket)}).encode()
        except BaseException:
            self.gate.leave(ticket)
            raise
        try:
            async for message in self.run_generation(req):
                yield message
        except GenerationFailed as err:
            await context.abort(err.code, err.message)

    async def run_generation(self, req: api.GenerateRequest) -> AsyncIterator[bytes]:
        """One generation in a worker thread (:class:`Generation`); its text and outcome come back
        through a queue. The turn is released when the work ends (not before, even if the
        client went away)."""
        job = Generation(self.bs, req, asyncio.get_running_loop(), self.gate.release)
        self.workers.submit(job.work)
        try:
            while True:
                kind, value = await job.out.get()
                if kind == "text":
                    yield json.dumps({"text": value}).encode()
                elif kind == "done":
                    yield json.dumps({"done": True, "metrics": value}).encode()
                    return
                elif kind == "cancelled":
                    return
                else:
                    raise GenerationFailed(*value)
        finally:
            job.gone.set()

    def handlers(self) -> Any:
        methods = {
            "Register": grpc.unary_unary_rpc_method_handler(self.register),
            "Stats": grpc.unary_unary_rpc_method_handler(self.stats),
            "Generate": grpc.unary_stream_rpc_method_handler(self.generate),
        }
        return grpc.method_handlers_generic_handler(api.BS_SERVICE, methods)


def post(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Call ``fn(*args)`` on ``loop`` from another thread; nothing once the server has stopped."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: no one is left to tell
        loop.call_soon_threadsafe(fn, *args)


class Generation:
    """One request's generation, run in a thread of its own; what it produces goes to ``out`` on
    the server's loop: ("text", piece), ("done", metrics), ("cancelled", None) or ("error",
    (code, message)). ``gone``: the client went away (the next piece of text cancels the work)."""

    def __init__(
        self, bs: BaseStation, req: api.GenerateRequest, loop: asyncio.AbstractEventLoop, release: Any
    ) -> None:
        self.bs, self.req, self.loop, self.release = bs, req, loop, release
        self.out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.gone = threading.Event()

    def put(self, kind: str, value: Any) -> None:
        post(self.loop, self.out.put_nowait, (kind, value))

    def on_text(self, piece: str) -> None:
        if self.gone.is_set():
            raise Cancelled("the client went away")
        if piece:
            self.put("text", piece)

    def work(self) -> None:
        """Generate; then release the turn and hand over the outcome, in that order on the loop
        (a client that has its answer finds the turn already free)."""
        outcome: tuple[str, Any]
        try:
            outcome = ("done", self.bs.generate(self.req, self.on_text))
        except Cancelled:
            outcome = ("cancelled", None)
        except WdmoeError as err:
            outcome = ("error", (grpc.StatusCode.INVALID_ARGUMENT, str(err)))
        except Exception as err:  # a bug must reach the user as an error, not kill the server
            log.exception("generation failed")
            outcome = ("error", (grpc.StatusCode.INTERNAL, f"generation failed: {err!r}"))
        finally:
            post(self.loop, self.release)
        self.put(*outcome)


class GenerationFailed(Exception):
    """A generation ended in an error that the stream must end with (code, message)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class BSServer:
    """A serving BS: ``address`` for devices and users; ``stop()`` ends it (and closes the BS);
    ``dashboard``: its live page and /metrics, when served."""

    bs: BaseStation
    server: AsyncServer
    service: BSService
    host: str
    port: int
    dashboard: "DashboardServer | None" = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_for_termination(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace_s: float | None = 1.0) -> None:
        if self.dashboard is not None:
            self.dashboard.close()
        self.server.stop(grace_s)  # ends the streams: their generations stop at their next token
        self.service.workers.shutdown(wait=False, cancel_futures=True)
        self.bs.close()

    def __enter__(self) -> "BSServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_bs(
    bs: BaseStation,
    token: str,
    host: str = "127.0.0.1",
    port: int = 0,
    dashboard: tuple[str, int] | None = None,
) -> BSServer:
    """Serve ``bs`` on host:port (loopback by default; 0 picks a free port); with ``dashboard``
    (host, port) also its dashboard and /metrics over HTTP."""
    service = BSService(bs)
    server = AsyncServer(service.handlers(), token, host, port, bs.tls)
    page = None
    if dashboard is not None:
        from wdmoe.runtime.pulse import attach_dashboard

        try:
            page = attach_dashboard(bs, *dashboard, token=token)
        except BaseException:
            server.stop(None)
            raise
    return BSServer(bs, server, service, host, server.port, page)
