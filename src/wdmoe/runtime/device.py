"""A device worker: holds a few expert shards and runs them on request, on two planes.

It loads only the shard files it is given (never the whole model). Its data plane
(:class:`~wdmoe.runtime.dataplane.StreamServer`, ``--data-port``) answers the BS's expert calls on
one persistent connection; its gRPC server answers ``/wdmoe.Device/RunExpert`` the same way (for a
BS that speaks no data plane, and tools) plus the standard ``grpc.health.v1`` service. Both take
wire-encoded ``ExpertRequest`` bytes and give ``ExpertResponse`` bytes (with the measured compute
time) through one function, :meth:`DeviceWorker.respond`. Given a BS address it registers there
with both addresses and re-registers every heartbeat (so it is found again after the BS or the
device restarts).

    wdmoe device --bs 127.0.0.1:50050 --slot 0 --shards out/L000_E001.safetensors … --port 50051
    python -m wdmoe.runtime.device …   (the same, without typer)
"""

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.models.experts import ExpertWeights, run_expert
from wdmoe.models.split import load_expert_shard
from wdmoe.runtime import api, dataplane
from wdmoe.runtime.dataplane import Refused, StreamServer
from wdmoe.runtime.security import TLSFiles, bearer, open_channel
from wdmoe.runtime.server import freeze_heap, start_server
from wdmoe.runtime.wire import (
    ExpertRequest,
    ExpertResponse,
    WireError,
    answer_format,
    decode_all,
    encode,
    encode_bundle,
    in_format,
    value_of,
)
from wdmoe.types import ExpertKey

log = logging.getLogger("wdmoe.device")

SERVICE = "wdmoe.Device"
RUN_EXPERT = f"/{SERVICE}/RunExpert"


class DeviceWorker:
    """The experts one device hosts, keyed (layer, expert), and the RunExpert handler."""

    def __init__(self, experts: dict[ExpertKey, ExpertWeights], delay_s: float = 0.0) -> None:
        self.experts = experts
        self.delay_s = delay_s  # fault injection: sleep this long before answering

    @classmethod
    def from_shards(cls, shards: Iterable[Path], delay_s: float = 0.0) -> "DeviceWorker":
        experts: dict[ExpertKey, ExpertWeights] = {}
        for path in shards:
            shard, weights = load_expert_shard(Path(path))
            experts[(shard.layer, shard.expert)] = weights
        return cls(experts, delay_s)

    def warm(self) -> None:
        """Run every hosted expert once on one token: the first real call must not pay for lazy
        work (importing the activation from transformers takes ~2 s in a fresh process, longer than
        any deadline), so a device is ready only once this is done."""
        with torch.no_grad():
            for weights in self.experts.values():
                run_expert(weights, torch.zeros(1, weights.hidden_size, dtype=weights.down.dtype))

    def run_expert(self, request: bytes, context: Any) -> bytes:
        """RunExpert on gRPC: :meth:`respond`; a refusal aborts that call with its status, never the
        server. The server's TokenAuth has authenticated it."""
        try:
            return self.respond(request, time.monotonic(), context.time_remaining)
        except Refused as refused:
            context.abort(grpc.StatusCode[refused.code], refused.message)
            raise  # unreachable: abort raises

    def respond(
        self, request: bytes, arrived_s: float, remaining_s: Callable[[], float | None] = lambda: None
    ) -> bytes:
        """The reply to one request — a response frame, or a bundle of them in the order of a bundle
        of requests — or :class:`Refused`; what both planes' handlers run. Malformed →
        INVALID_ARGUMENT, an expert not hosted → NOT_FOUND; a deadline that passed before the request
        could run (the call's, ``remaining_s()``, or the frames' own ``deadline_s`` counted from
        ``arrived_s``, monotonic seconds) → DEADLINE_EXCEEDED, and nothing is computed."""
        requests, bundled = self.decode(request)
        for wait_s in (0.0, self.delay_s):  # checked again after the injected delay
            if wait_s:
                time.sleep(wait_s)
            if late(requests, arrived_s, remaining_s()):
                raise Refused("DEADLINE_EXCEEDED", "the request's deadline passed before it could run")
        replies: list[ExpertRequest | ExpertResponse] = [self.run_one(req) for req in requests]
        return encode_bundle(replies) if bundled else encode(replies[0])

    @staticmethod
    def decode(request: bytes) -> tuple[list[ExpertRequest], bool]:
        """The expert requests of a frame or bundle, and whether it was a bundle (else Refused)."""
        try:
            messages, bundled = decode_all(request)
        except WireError as err:
            raise Refused("INVALID_ARGUMENT", f"malformed request: {err}") from err
        requests = [m for m in messages if isinstance(m, ExpertRequest)]
        if len(requests) != len(messages):
            raise Refused("INVALID_ARGUMENT", "malformed request: expected expert requests")
        return requests, bundled

    def run_one(self, req: ExpertRequest) -> ExpertResponse:
        """Check and run one expert request; its response with the measured compute time."""
        weights = self.experts.get((req.layer, req.expert))
        if weights is None:
            raise Refused(
                "NOT_FOUND",
                f"this device does not host layer {req.layer} expert {req.expert}; "
                f"it hosts (layer, expert) {sorted(self.experts)}",
            )
        x = value_of(req.hidden, req.scales)  # a scaled format's values decoded to float32
        if x.dim() != 2 or x.shape[1] != weights.hidden_size or not x.is_floating_point():
            raise Refused(
                "INVALID_ARGUMENT",
                f"hidden must be a float tensor [n, {weights.hidden_size}], got {x.dtype} {list(x.shape)}",
            )
        start = time.perf_counter()
        with torch.no_grad():
            y = run_expert(weights, x.to(weights.down.dtype))
            fmt = answer_format(req)  # the answer's wire format: the one asked for, else the request's
            outputs, scales = in_format(y, fmt) if fmt else (y.to(x.dtype), None)
        return ExpertResponse(req.request_id, outputs, time.perf_counter() - start, scales)

    def handler(self) -> Any:
        method = grpc.unary_unary_rpc_method_handler(self.run_expert)  # bytes in, bytes out
        return grpc.method_handlers_generic_handler(SERVICE, {"RunExpert": method})


def late(requests: list[ExpertRequest], arrived_s: float, remaining_s: float | None) -> bool:
    """Whether a request's time is up: the call's ``remaining_s`` (None: unknown) or the frames'
    own budget ``deadline_s`` (0: none set) counted from ``arrived_s`` (monotonic seconds)."""
    budgets = [r.deadline_s for r in requests if r.deadline_s > 0]
    if remaining_s is not None and remaining_s <= 0:
        return True
    return bool(budgets) and time.monotonic() - arrived_s >= min(budgets)


class Registrar:
    """Registers the device with its BS now and every heartbeat, in a background thread.

    Each heartbeat is a full registration (idempotent), so a restarted BS learns the device again
    at the next beat; failures are logged once per change of state, never raised.
    """

    def __init__(
        self,
        bs_address: str,
        token: str,
        reg: api.Registration,
        tls: TLSFiles | None = None,
        every_s: float = 1.0,
    ) -> None:
        self.bs_address, self.reg, self.every_s = bs_address, reg, every_s
        self.channel = open_channel(bs_address, tls)
        self.call = self.channel.unary_unary(api.REGISTER)
        self.metadata = bearer(token)
        self.stopping = threading.Event()
        self.registered = threading.Event()
        self.boot: str | None = None
        self.thread = threading.Thread(target=self.loop, name="register", daemon=True)

    def beat(self) -> bool:
        try:
            reply = api.load(
                self.call(api.encode_registration(self.reg), timeout=5.0, metadata=self.metadata), "Register"
            )
        except grpc.RpcError as err:
            if self.registered.is_set() or self.boot is None:
                log.warning(
                    "cannot register with the BS at %s: %s %s",
                    self.bs_address,
                    err.code().name,
                    err.details(),
                )
            self.registered.clear()
            if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                self.boot = ""  # refused: log once, keep trying (the BS may be reconfigured)
            return False
        except api.ApiError as err:
            log.warning("the BS at %s answered the registration with %s", self.bs_address, err)
            return False
        if reply.get("boot") != self.boot:
            log.info(
                "registered with the BS at %s (boot %s) as slot %d",
                self.bs_address,
                reply.get("boot"),
                self.reg.slot,
            )
        self.boot = reply.get("boot")
        self.every_s = float(reply.get("heartbeat_s", self.every_s))
        self.registered.set()
        return True

    def loop(self) -> None:
        while not self.stopping.is_set():
            self.beat()
            self.stopping.wait(self.every_s)

    def start(self) -> "Registrar":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5.0)
        self.channel.close()


class DeviceServer:
    """A started worker: ``address`` to give the BS, ``stop()`` (or ``with``) to end it."""

    def __init__(self, worker: DeviceWorker, server: Any, host: str, port: int, stream: StreamServer) -> None:
        self.worker, self.server, self.host, self.port = worker, server, host, port
        self.stream = stream
        self.registrar: Registrar | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_port(self) -> int:
        return self.stream.port

    @property
    def data_address(self) -> str:
        return f"{self.host}:{self.data_port}"

    @property
    def hosted(self) -> list[ExpertKey]:
        return sorted(self.worker.experts)

    def register(
        self,
        bs_address: str,
        token: str,
        slot: int,
        advertise: str | None = None,
        tls: TLSFiles | None = None,
        name: str = "",
    ) -> Registrar:
        """Register with the BS (and keep doing so every heartbeat) as cell device ``slot``; the data
        plane is advertised on the host of ``advertise`` (when given) at its own port."""
        host = advertise.rpartition(":")[0] if advertise else self.host
        data = f"{host}:{self.data_port}"
        reg = api.Registration(
            slot, advertise or self.address, tuple(self.hosted), name, data, dataplane.VERSION
        )
        self.registrar = Registrar(bs_address, token, reg, tls).start()
        return self.registrar

    def stop(self, grace_s: float | None = None) -> None:
        if self.registrar is not None:
            self.registrar.stop()
        self.stream.stop()
        self.server.stop(grace_s).wait()

    def __enter__(self) -> "DeviceServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    shards: Iterable[Path],
    port: int = 0,
    token: str = "",
    host: str = "127.0.0.1",
    workers: int = 4,
    *,
    tls: TLSFiles | None = None,
    delay_s: float = 0.0,
    data_port: int = 0,
) -> DeviceServer:
    """Load ``shards`` and serve them: gRPC on host:port, the data plane on host:data_port (0 picks
    a free port); returns once both listen."""
    worker = DeviceWorker.from_shards(shards, delay_s)
    worker.warm()
    server, bound = start_server(worker.handler(), token, host, port, tls, workers)
    try:
        inline = lambda: worker.delay_s == 0  # noqa: E731  (a delay runs off the loop: it stays responsive)
        stream = StreamServer(worker.respond, token, host, data_port, tls, inline)
    except BaseException:
        server.stop(None).wait()
        raise
    return DeviceServer(worker, server, host, bound, stream)


def check_args(args: argparse.Namespace) -> None:
    """ConfigError naming the first flag with a value the worker cannot use."""
    for flag, port in (("--port", args.port), ("--data-port", args.data_port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{flag} must be in 0..65535 (0: any free port), got {port}")
    if not math.isfinite(args.inject_delay_ms) or not 0 <= args.inject_delay_ms <= 3.6e6:
        raise ConfigError(f"--inject-delay-ms must be in 0..3600000 ms, got {args.inject_delay_ms}")
    if args.bs and args.slot is None:
        raise ConfigError("--bs needs --slot: the device's position in the cell (0..U-1)")
    if args.slot is not None and args.slot < 0:
        raise ConfigError(f"--slot must be ≥ 0 (the device's position in the cell), got {args.slot}")
    for path in args.shards:
        if not path.is_file():
            raise ConfigError(f"--shards: {str(path)!r} is not a file (shards come from `wdmoe model split`)")


def main(argv: Sequence[str] | None = None, prog: str = "python -m wdmoe.runtime.device") -> None:
    parser = argparse.ArgumentParser(prog=prog, description="wdmoe device worker")
    parser.add_argument("--shards", nargs="+", type=Path, required=True, help="expert shard files to host")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument(
        "--data-port", type=int, default=0, help="port of the data plane (expert calls; 0: any free port)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    token = os.environ.get("WDMOE_TOKEN", "")
    parser.add_argument("--token", default=token, help="shared token (default: $WDMOE_TOKEN)")
    parser.add_argument("--bs", default=None, help="HOST:PORT of the BS to register with")
    parser.add_argument("--slot", type=int, default=None, help="this device's position in the cell (0..U-1)")
    parser.add_argument("--advertise", default=None, help="HOST:PORT the BS should call (default: host:port)")
    parser.add_argument("--name", default="", help="a label for logs and summaries")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate of this device (TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of this device (TLS)")
    parser.add_argument(
        "--tls-ca", default=None, help="PEM CA: verify the BS; require its client certificate"
    )
    parser.add_argument(
        "--inject-delay-ms", type=float, default=0.0, help="fault injection: answer this late"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        check_args(args)
        tls = TLSFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
        device = serve(
            args.shards,
            args.port,
            args.token,
            args.host,
            tls=tls,
            delay_s=args.inject_delay_ms / 1e3,
            data_port=args.data_port,
        )
    except (WdmoeError, OSError) as err:  # one line and status 2, no usage, no traceback
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    freeze_heap()
    print(
        f"device listening on {device.address} (data plane {device.data_address}), hosting {device.hosted}",
        flush=True,
    )
    if args.bs:
        device.register(args.bs, args.token, args.slot, args.advertise, tls, args.name)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly (deregister, close)
    try:
        device.server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        device.stop(grace_s=1.0)


if __name__ == "__main__":
    main()
