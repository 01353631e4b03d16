"""The user's side of the BS: generate with streamed text, read the statistics, wait until ready."""

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wdmoe.errors import WdmoeError
from wdmoe.runtime import api
from wdmoe.runtime.security import TLSFiles, bearer, open_channel

IDLE_S = 60.0  # default: the longest a client waits without a word from the BS


class BSError(WdmoeError):
    """The BS refused a request or could not be reached; the message says which and why."""


class BSClient:
    """A connection to a BS at ``address`` (``with`` closes it)."""

    def __init__(self, address: str, token: str, tls: TLSFiles | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, tls)
        self.metadata = bearer(token)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "BSClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fail(self, err: grpc.RpcError, what: str) -> BSError:
        code = err.code()
        hint = {
            grpc.StatusCode.UNAVAILABLE: " (is `wdmoe serve-bs` running there, and is the address right?)",
            grpc.StatusCode.UNAUTHENTICATED: " (give the BS's token: --token or $WDMOE_TOKEN)",
            grpc.StatusCode.DEADLINE_EXCEEDED: " (the request's --timeout-s passed)",
            grpc.StatusCode.RESOURCE_EXHAUSTED: " (the BS is full: retry later)",
        }.get(code, "")
        return BSError(f"{what} at the BS {self.address} failed: {code.name}: {err.details()}{hint}")

    def generate(
        self,
        req: api.GenerateRequest,
        on_text: Callable[[str], None] | None = None,
        timeout_s: float | None = None,
        idle_s: float | None = IDLE_S,
        on_queued: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Stream the answer's text through ``on_text``; returns the request's metrics (with "text").

        timeout_s: the whole request's deadline (None: none). idle_s: the longest silence from the
        BS (a queued request hears from it every few seconds, a served one every token); past it
        the request is cancelled and BSError says so. on_queued(position) while waiting for a turn.
        """
        call = self.channel.unary_stream(api.GENERATE)(
            api.encode_generate(req), metadata=self.metadata, timeout=timeout_s
        )
        try:
            for chunk in self._messages(call, idle_s):
                if "queued" in chunk and on_queued is not None:
                    on_queued(int(chunk["queued"]))
                if "text" in chunk and on_text is not None:
                    on_text(chunk["text"])
                if chunk.get("done"):
                    return dict(chunk["metrics"])
        finally:
            call.cancel()  # a no-op once the stream has ended; stops the BS's work otherwise
        raise BSError(f"the BS {self.address} ended the answer without its final message")

    def _messages(self, call: Any, idle_s: float | None) -> Iterator[dict[str, Any]]:
        """The stream's JSON messages, read in a helper thread so that silence can be timed."""
        inbox: queue.Queue[tuple[str, Any]] = queue.Queue()

        def pump() -> None:
            try:
                for message in call:
                    inbox.put(("message", message))
                inbox.put(("end", None))
            except grpc.RpcError as err:
                inbox.put(("error", err))

        threading.Thread(target=pump, name="generate-stream", daemon=True).start()
        while True:
            try:
                kind, value = inbox.get(timeout=idle_s)
            except queue.Empty:
                call.cancel()
                raise BSError(
                    f"the BS {self.address} sent nothing for {idle_s:g} s (frozen, overloaded or cut "
                    "off?); the request was cancelled. Raise --idle-timeout-s to wait longer."
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise self.fail(value, "generate") from value
            yield json.loads(value)

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        try:
            reply = self.channel.unary_unary(api.STATS)(
                api.dump({}), metadata=self.metadata, timeout=timeout_s
            )
        except grpc.RpcError as err:
            raise self.fail(err, "stats") from err
        return api.load(reply, "Stats")

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """The standard health check (no token needed)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_ready(
        self, devices: int, timeout_s: float = 120.0, alive: Callable[[], bool] = lambda: True
    ) -> None:
        """Until the BS answers and ``devices`` devices are registered and usable and every expert
        is hosted; BSError when ``timeout_s`` passes or ``alive()`` turns false."""
        deadline = time.monotonic() + timeout_s
        last = "the BS did not answer"
        while time.monotonic() < deadline and alive():
            if self.healthy():
                stats = self.stats()
                usable = sum(d["usable"] for d in stats["devices"])
                if usable >= devices and stats["missing_experts"] == 0:
                    return
                last = f"{usable} of {devices} devices usable, {stats['missing_experts']} experts not hosted"
            time.sleep(0.2)
        raise BSError(f"the BS {self.address} was not ready within {timeout_s:.0f} s: {last}")
