"""A device worker: a gRPC server that holds a few expert shards and runs them on request.

It loads only the shard files it is given (never the whole model) and serves one method,
``/wdmoe.Device/RunExpert``: wire-encoded ``ExpertRequest`` bytes in, ``ExpertResponse`` bytes out
(with the measured compute time). Generic bytes handlers, so no protoc step is needed.

    python -m wdmoe.runtime.device --shards out/L000_E001.safetensors … --port 50051 --token T
"""

import argparse
import hmac
import os
import time
from collections.abc import Iterable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.models.experts import ExpertWeights, run_expert
from wdmoe.models.split import load_expert_shard
from wdmoe.runtime.wire import MAX_MESSAGE_BYTES, ExpertResponse, WireError, decode_request, encode

SERVICE = "wdmoe.Device"
RUN_EXPERT = f"/{SERVICE}/RunExpert"
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

ExpertKey = tuple[int, int]  # (layer, expert)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The call metadata that authenticates with ``token``."""
    return (("authorization", f"Bearer {token}"),)


class Refused(WdmoeError):
    """A request the device answers with a gRPC status instead of outputs."""

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class DeviceWorker:
    """The experts one device hosts, keyed (layer, expert), and the RunExpert handler."""

    def __init__(self, experts: dict[ExpertKey, ExpertWeights], token: str) -> None:
        if not token:
            raise ConfigError(
                "a device needs a non-empty token (clients send 'authorization: Bearer <token>')"
            )
        self.experts = experts
        self._expected = f"Bearer {token}".encode()

    @classmethod
    def from_shards(cls, shards: Iterable[Path], token: str) -> "DeviceWorker":
        experts: dict[ExpertKey, ExpertWeights] = {}
        for path in shards:
            shard, weights = load_expert_shard(Path(path))
            experts[(shard.layer, shard.expert)] = weights
        return cls(experts, token)

    def run_expert(self, request: bytes, context: Any) -> bytes:
        """RunExpert: a refused or malformed request aborts that call with a status, never the server."""
        try:
            return self.answer(request, dict(context.invocation_metadata()).get("authorization", ""))
        except Refused as refused:
            context.abort(refused.code, refused.message)
            raise  # unreachable: abort raises

    def answer(self, request: bytes, authorization: str) -> bytes:
        """Authenticate, decode, check, run and time the expert, encode the response."""
        if not hmac.compare_digest(str(authorization).encode(), self._expected):
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong token: send metadata 'authorization: Bearer <token>' with the device token",
            )
        try:
            req = decode_request(request)
        except WireError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {err}") from err
        weights = self.experts.get((req.layer, req.expert))
        if weights is None:
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"this device does not host layer {req.layer} expert {req.expert}; "
                f"it hosts (layer, expert) {sorted(self.experts)}",
            )
        x = req.hidden
        if x.dim() != 2 or x.shape[1] != weights.hidden_size or not x.is_floating_point():
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden must be a float tensor [n, {weights.hidden_size}], got {x.dtype} {list(x.shape)}",
            )
        start = time.perf_counter()
        with torch.no_grad():
            y = run_expert(weights, x.to(weights.down.dtype)).to(x.dtype)
        return encode(ExpertResponse(req.request_id, y, time.perf_counter() - start))

    def handler(self) -> Any:
        method = grpc.unary_unary_rpc_method_handler(self.run_expert)  # bytes in, bytes out
        return grpc.method_handlers_generic_handler(SERVICE, {"RunExpert": method})


class DeviceServer:
    """A started worker: ``address`` to give the BS, ``stop()`` (or ``with``) to end it."""

    def __init__(self, worker: DeviceWorker, server: Any, host: str, port: int) -> None:
        self.worker, self.server, self.host, self.port = worker, server, host, port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def hosted(self) -> list[ExpertKey]:
        return sorted(self.worker.experts)

    def stop(self, grace_s: float | None = None) -> None:
        self.server.stop(grace_s).wait()

    def __enter__(self) -> "DeviceServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    shards: Iterable[Path], port: int = 0, token: str = "", host: str = "127.0.0.1", workers: int = 4
) -> DeviceServer:
    """Load ``shards`` and start serving on host:port (0 picks a free port); returns once listening."""
    worker = DeviceWorker.from_shards(shards, token)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((worker.handler(),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as err:
        raise OSError(f"device cannot listen on {host}:{port}: {err}") from err
    if bound == 0:
        raise OSError(f"device cannot listen on {host}:{port}")
    server.start()
    return DeviceServer(worker, server, host, bound)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wdmoe.runtime.device", description="wdmoe device worker")
    parser.add_argument("--shards", nargs="+", type=Path, required=True, help="expert shard files to host")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    token = os.environ.get("WDMOE_TOKEN", "")
    parser.add_argument("--token", default=token, help="shared token (default: $WDMOE_TOKEN)")
    args = parser.parse_args(argv)
    try:
        device = serve(args.shards, args.port, args.token, args.host)
    except (WdmoeError, OSError) as err:
        parser.error(str(err))  # exits with status 2 and the message, no traceback
    print(f"device listening on {device.address}, hosting {device.hosted}", flush=True)
    device.server.wait_for_termination()


if __name__ == "__main__":
    main()
