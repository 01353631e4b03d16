"""The user's side of the BS: generate with streamed text, read the statistics, wait until ready."""

import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wdmoe.errors import WdmoeError
from wdmoe.runtime import api
from wdmoe.runtime.security import TLSFiles, bearer, open_channel


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
        }.get(code, "")
        return BSError(f"{what} at the BS {self.address} failed: {code.name}: {err.details()}{hint}")

    def generate(
        self,
        req: api.GenerateRequest,
        on_text: Callable[[str], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Stream the answer's text through ``on_text``; returns the request's metrics (with "text")."""
        stream = self.channel.unary_stream(api.GENERATE)
        try:
            for message in stream(api.encode_generate(req), metadata=self.metadata, timeout=timeout_s):
                chunk = json.loads(message)
                if "text" in chunk and on_text is not None:
                    on_text(chunk["text"])
                if chunk.get("done"):
                    return dict(chunk["metrics"])
        except grpc.RpcError as err:
            raise self.fail(err, "generate") from err
        raise BSError(f"the BS {self.address} ended the answer without its final message")

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
