"""The gRPC server recipes of the runtime: handlers + health + token auth.

Devices serve on a thread pool (``start_server``): they get one call per layer and forward.
The BS serves on grpc.aio (:class:`AsyncServer`): its handlers are coroutines on one event-loop
thread, so a long-lived Generate stream holds no thread and heartbeats, health checks and Stats
never queue behind users' requests, however many there are.

Kept apart from the BS so that a device worker imports only gRPC, torch and its shards' code.
"""

import asyncio
import gc
import threading
from collections.abc import Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from wdmoe.runtime.security import AioTokenAuth, TLSFiles, TokenAuth, add_port
from wdmoe.runtime.wire import MAX_MESSAGE_BYTES

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
T = TypeVar("T")


def start_server(
    handlers: Any, token: str, host: str, port: int, tls: TLSFiles | None, workers: int = 16
) -> tuple[Any, int]:
    """A gRPC server with ``handlers``, the health service (SERVING) and token auth; returns
    (server, bound port). Ports are exclusive (no SO_REUSEPORT: a second server on a port fails)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=(TokenAuth(token),),
        options=SERVER_OPTIONS,
    )
    server.add_generic_rpc_handlers((handlers,))
    status = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    bound = add_port(server, f"{host}:{port}", tls)
    server.start()
    status.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def freeze_heap() -> None:
    """Keep the start-up heap (the model, torch) out of the garbage collector's passes: a full
    collection over a torch process takes ~75 ms (benchmarks/transport.py), which would land in
    the middle of an expert call or a forward. Call once a process has started."""
    gc.collect()
    gc.freeze()


class AsyncServer:
    """A grpc.aio server with ``handlers`` (coroutines), health and token auth on its own
    event-loop thread; ``port`` is bound when the constructor returns, ``stop`` ends it."""

    def __init__(self, handlers: Any, token: str, host: str, port: int, tls: TLSFiles | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self.thread.start()
        try:
            self.server, self.port = self.run(self._start(handlers, token, host, port, tls))
        except BaseException:
            self._end_loop()
            raise

    async def _start(
        self, handlers: Any, token: str, host: str, port: int, tls: TLSFiles | None
    ) -> tuple[Any, int]:
        server = grpc.aio.server(interceptors=(AioTokenAuth(token),), options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((handlers,))
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        bound = add_port(server, f"{host}:{port}", tls)
        await server.start()
        return server, bound

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = 30.0) -> T:
        """Run ``coro`` on the server's loop from another thread; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def wait_for_termination(self) -> None:
        """Block until ``stop`` (wakes every second, so Ctrl-C reaches the main thread)."""
        while not self.stopped.wait(1.0):
            pass

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Refuse new calls, give running ones ``grace_s``, then end the loop (idempotent)."""
        if self.stopped.is_set():
            return
        try:
            self.run(self.server.stop(grace_s), timeout_s=None if grace_s is None else grace_s + 10)
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()
        self.stopped.set()
