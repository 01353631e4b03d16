"""Data-plane candidates for the BS ↔ device expert calls, side by side on loopback.

    python benchmarks/transport.py [--rounds 5] [--calls 300] [--devices 8] [--no-tls]
    python benchmarks/transport.py --quick     # smoke run (4 devices, a few calls, < 20 s), writes nothing

Device processes (multiprocessing, spawn; 8 by default, one per expert of the default model) each
serve every candidate on 127.0.0.1; the BS is this process. Every call carries real wdmoe wire
frames: one bundle per device and layer (``encode_bundle``), which the device decodes
(``decode_all``) and answers with a bundle of ExpertResponse frames echoing the hidden states (no
model). The BS encodes, sends, decodes and checks inside the timed region, as ``runtime/links.py``
does.

- ``grpc_unary``: today's data plane: a grpc.aio unary RunExpert call per device and layer with the
  bearer token in its metadata (as links.py calls it), answered by a thread-pool gRPC server with
  TokenAuth (as device.py serves it);
- ``grpc_stream``: one persistent grpc.aio bidirectional stream per device (grpc.aio server, its
  TokenAuth checks the token once, when the stream opens);
- ``tcp_uvloop``: asyncio streams on uvloop, one persistent TCP connection per device carrying
  length-prefixed messages; the shared token proved by HMAC challenge–response once per connection;
- ``zmq``: pyzmq DEALER (BS) / ROUTER (device), zmq.asyncio on uvloop, the same challenge–response;
- references, not candidates: ``tcp_asyncio`` (the same streams on asyncio's own loop: what uvloop
  buys) and ``inproc`` (the device's echo called in this process: encode, decode, check, no transport).

The persistent candidates multiplex calls on their connection: each message starts with a call id
and a status byte, one reader task hands each answer to the call waiting for it (a late answer
finds no one and is dropped), and every call has a deadline. With TLS (unless --no-tls; needs
`cryptography`) the gRPC and TCP candidates also run with mutual TLS from the PEM files the runtime
uses (``make_test_pki``'s node certificate on both sides, as the runtime's mTLS tests do); libzmq has
no TLS, so zmq has no such row. Before timing, every candidate must refuse a wrong token.

Cases: one round trip to one device (1 token), and a fan-out/fan-in to 7 of the 8 devices (the
default model's top-7) with 1 and with 16 tokens per device; hidden [T, D] float32 with D from the
``smollm2-moe8`` preset. Rounds alternate the candidates (their order rotates every round), so that
machine noise hits all alike; ratios are to gRPC unary with the same security. Writes
benchmarks/results/transport.json.
"""

import argparse
import asyncio
import contextlib
import gc
import hashlib
import hmac
import itertools
import json
import multiprocessing as mp
import os
import platform
import secrets
import signal
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import torch
import uvloop
import zmq
import zmq.asyncio

from wdmoe.runtime.device import RUN_EXPERT, SERVICE
from wdmoe.runtime.security import TLSFiles, bearer, open_channel
from wdmoe.runtime.server import GRPC_OPTIONS, AsyncServer, start_server
from wdmoe.runtime.wire import (
    MAX_MESSAGE_BYTES,
    ExpertRequest,
    ExpertResponse,
    WireError,
    decode_all,
    encode_bundle,
)

HOST = "127.0.0.1"
DEVICES = 8  # the default model's 8 experts, one per device
CALL_TIMEOUT_S = 5.0  # every call's deadline: generous, a miss aborts the benchmark
HANDSHAKE_TIMEOUT_S = 5.0
STREAM_SERVICE = "wdmoe.DeviceStream"
STREAM_METHOD = f"/{STREAM_SERVICE}/RunExperts"

# The envelope of the persistent candidates: call id u64 | status u8 (OK: a bundle follows;
# REFUSED: UTF-8 reason), and on TCP a u32 length before it. The frame limit is the wire's.
_HEAD = struct.Struct("<QB")
_LEN = struct.Struct("<I")
OK, REFUSED = 0, 1
FRAME_LIMIT = _HEAD.size + MAX_MESSAGE_BYTES
NONCE_BYTES = MAC_BYTES = 32


class AuthError(ConnectionError):
    """The peer did not prove the shared token (or refused ours)."""


class ProtocolError(ConnectionError):
    """A message outside the envelope (too short, too long, unknown verb): the connection ends."""


class Refused(RuntimeError):
    """The device answered a call with a refusal (e.g. a malformed bundle)."""


# --- the token by challenge–response (TCP and zmq; gRPC keeps its metadata token) ----------------


def mac(token: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256 over the role and both nonces: proves the token without sending it; the
    role keeps one side's proof from being replayed as the other's."""
    return hmac.new(token, role + server_nonce + client_nonce, hashlib.sha256).digest()


def client_reply(token: bytes, server_nonce: bytes) -> bytes:
    """The client's answer to a challenge: its own nonce, then its proof."""
    client_nonce = os.urandom(NONCE_BYTES)
    return client_nonce + mac(token, b"bs", server_nonce, client_nonce)


def server_proof(token: bytes, server_nonce: bytes, reply: bytes) -> bytes | None:
    """The server's proof when the client's ``reply`` checks out (constant-time), else None."""
    client_nonce, proof = reply[:NONCE_BYTES], reply[NONCE_BYTES:]
    if len(reply) != NONCE_BYTES + MAC_BYTES:
        return None
    if not hmac.compare_digest(proof, mac(token, b"bs", server_nonce, client_nonce)):
        return None
    return mac(token, b"device", server_nonce, client_nonce)


def check_server(token: bytes, server_nonce: bytes, reply: bytes, proof: bytes) -> None:
    """AuthError unless ``proof`` is the device's answer to our ``reply``."""
    if not hmac.compare_digest(proof, mac(token, b"device", server_nonce, reply[:NONCE_BYTES])):
        raise AuthError("the device refused the token, or does not know it")


# --- device side ------------------------------------------------------------------------------


def echo(request: bytes) -> bytes:
    """A bundle of expert requests → a bundle of responses echoing the hidden states."""
    messages, _ = decode_all(request)
    start = time.perf_counter()
    replies: list[ExpertRequest | ExpertResponse] = [
        ExpertResponse(m.request_id, m.hidden, time.perf_counter() - start)
        for m in messages
        if isinstance(m, ExpertRequest)
    ]
    if len(replies) != len(messages):
        raise WireError("expected expert requests")
    return encode_bundle(replies)


def answer(message: bytes) -> bytes:
    """One enveloped request → its enveloped answer (a refusal for a malformed bundle)."""
    if len(message) < _HEAD.size:
        raise ProtocolError(f"a message of {len(message)} bytes is shorter than the envelope")
    call_id, _ = _HEAD.unpack_from(message)
    try:
        return _HEAD.pack(call_id, OK) + echo(message[_HEAD.size :])
    except WireError as err:
        return _HEAD.pack(call_id, REFUSED) + f"malformed request: {err}".encode()


def unary_handler() -> grpc.GenericRpcHandler:
    """Today's RunExpert on the device: bytes in, bytes out, deadline checked, malformed → status."""

    def run_expert(request: bytes, context: grpc.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before it ran")
        try:
            return echo(request)
        except WireError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {err}")
            raise  # unreachable: abort raises

    method = grpc.unary_unary_rpc_method_handler(run_expert)
    return grpc.method_handlers_generic_handler(SERVICE, {"RunExpert": method})


def stream_handler() -> grpc.GenericRpcHandler:
    """RunExperts: one stream per BS, enveloped requests in, enveloped answers out, in order."""

    async def run_experts(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for message in requests:
            yield answer(message)

    method = grpc.stream_stream_rpc_method_handler(run_experts)
    return grpc.method_handlers_generic_handler(STREAM_SERVICE, {"RunExperts": method})


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One length-prefixed message; ProtocolError when its length is outside the envelope's limits."""
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if not _HEAD.size <= length <= FRAME_LIMIT:
        raise ProtocolError(f"a frame of {length} bytes; allowed {_HEAD.size}..{FRAME_LIMIT}")
    return await reader.readexactly(length)


async def tcp_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: bytes) -> bool:
    """The device's side of the handshake: challenge, check the proof, prove back (zeros: refused)."""
    nonce = os.urandom(NONCE_BYTES)
    writer.write(nonce)
    proof = server_proof(token, nonce, await reader.readexactly(NONCE_BYTES + MAC_BYTES))
    writer.write(proof or bytes(MAC_BYTES))
    await writer.drain()
    return proof is not None


async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: bytes) -> None:
    """One BS connection: the handshake, then answer frames in order until it closes or misbehaves."""
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            authenticated = await tcp_accept(reader, writer, token)
        while authenticated:
            reply = answer(await read_frame(reader))
            writer.writelines((_LEN.pack(len(reply)), reply))
            await writer.drain()
    except (OSError, EOFError, TimeoutError):  # ssl.SSLError is an OSError
        pass  # the BS went away or broke the protocol: drop the connection, keep serving others
    finally:
        writer.close()


@dataclass
class ZmqPeers:
    """The ROUTER's state: the challenge sent to each peer, and the peers that answered it.

    zmq hides connections: a peer is its routing id, and libzmq reconnects beneath it, so the
    proof binds to the id, not to a TCP connection (a DEALER re-proves after HELLO)."""

    token: bytes
    challenges: dict[bytes, bytes]
    authenticated: set[bytes]

    def reply(self, peer: bytes, parts: list[bytes]) -> list[bytes]:
        """The frames that answer ``parts`` from ``peer`` (DENY for anything out of turn)."""
        verb = parts[0] if parts else b""
        if verb == b"CALL" and len(parts) == 2 and peer in self.authenticated:
            return [b"ANSWER", answer(parts[1])]
        if verb == b"HELLO":
            self.authenticated.discard(peer)
            self.challenges[peer] = nonce = os.urandom(NONCE_BYTES)
            return [b"CHALLENGE", nonce]
        if verb == b"AUTH" and len(parts) == 2 and peer in self.challenges:
            proof = server_proof(self.token, self.challenges.pop(peer), parts[1])
            if proof is not None:
                self.authenticated.add(peer)
                return [b"OK", proof]
        return [b"DENY"]


async def serve_zmq(sock: zmq.asyncio.Socket, token: bytes) -> None:
    peers = ZmqPeers(token, {}, set())
    while True:
        peer, *parts = await sock.recv_multipart()
        try:
            out = peers.reply(peer, parts)
        except ProtocolError:
            out = [b"DENY"]
        await sock.send_multipart([peer, *out])


def server_ssl(tls: TLSFiles) -> ssl.SSLContext:
    """Server TLS that requires a client certificate signed by ``tls.ca`` (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl(tls: TLSFiles) -> ssl.SSLContext:
    """Client TLS that verifies the device against ``tls.ca`` and presents our certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


class RawServers:
    """A device's TCP servers (``tcp``: key → server TLS or None) and, with ``zmq_key``, its zmq
    ROUTER, on an event loop (``new_loop``: uvloop's or asyncio's) in a thread of their own."""

    def __init__(
        self,
        new_loop: Callable[[], asyncio.AbstractEventLoop],
        token: bytes,
        tcp: dict[str, Any],
        zmq_key: str,
    ) -> None:
        self.servers: list[asyncio.Server] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.sock: zmq.asyncio.Socket | None = None
        self.loop = new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="raw", daemon=True)
        self.thread.start()
        starting = asyncio.run_coroutine_threadsafe(self.start(token, tcp, zmq_key), self.loop)
        self.ports = starting.result(30)

    async def start(self, token: bytes, tcp: dict[str, Any], zmq_key: str) -> dict[str, int]:
        ports = {}
        for key, context in tcp.items():
            server = await asyncio.start_server(partial(serve_tcp, token=token), HOST, 0, ssl=context)
            ports[key] = server.sockets[0].getsockname()[1]
            self.servers.append(server)
        if zmq_key:
            self.sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
            self.sock.linger = 0
            self.sock.setsockopt(zmq.MAXMSGSIZE, FRAME_LIMIT)  # zmq drops a peer that sends more
            ports[zmq_key] = self.sock.bind_to_random_port(f"tcp://{HOST}")
            self.tasks.append(asyncio.get_running_loop().create_task(serve_zmq(self.sock, token)))
        return ports

    async def _stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for server in self.servers:
            server.close()
        if self.sock is not None:
            self.sock.close()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if self.sock is not None:
            zmq.asyncio.Context.instance().term()


def start_device(stack: contextlib.ExitStack, token: str, tls: TLSFiles | None) -> dict[str, int]:
    """Every candidate's server of one device; their ports by candidate key. ``stack`` stops them."""
    ports: dict[str, int] = {}
    for suffix, files in [("", None), *([("+mtls", tls)] if tls else [])]:
        unary, ports[f"grpc_unary{suffix}"] = start_server(unary_handler(), token, HOST, 0, files, workers=4)
        stack.callback(unary.stop, None)
        stream = AsyncServer(stream_handler(), token, HOST, 0, files)
        stack.callback(stream.stop, 0.0)
        ports[f"grpc_stream{suffix}"] = stream.port
    secure = {"tcp_uvloop+mtls": server_ssl(tls)} if tls else {}
    fast = RawServers(uvloop.new_event_loop, token.encode(), {"tcp_uvloop": None, **secure}, "zmq")
    stack.callback(fast.stop)
    plain = RawServers(asyncio.new_event_loop, token.encode(), {"tcp_asyncio": None}, "")
    stack.callback(plain.stop)
    return ports | fast.ports | plain.ports


def device_main(conn: Connection, token: str, tls: TLSFiles | None) -> None:
    """A device process: serve until the BS says stop or goes away (its end of the pipe closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the BS's to handle: it stops us
    with contextlib.ExitStack() as stack:
        try:
            ports = start_device(stack, token, tls)
        except Exception as err:
            conn.send({"error": f"{type(err).__name__}: {err}"})
            raise
        gc.collect()
        gc.freeze()  # a full collection walks torch's objects (~75 ms): keep them out of it
        conn.send(ports)
        with contextlib.suppress(EOFError):
            conn.recv()


@contextlib.contextmanager
def device_processes(count: int, token: str, tls: TLSFiles | None) -> Iterator[list[dict[str, int]]]:
    """``count`` device processes (spawned); yields each one's ports; always stops them all."""
    spawn = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for i in range(count):
            ours, theirs = spawn.Pipe()
            proc = spawn.Process(
                target=device_main, args=(theirs, token, tls), name=f"device-{i}", daemon=True
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        yield [ready_ports(i, conn) for i, conn in enumerate(conns)]
    finally:
        stop_processes(procs, conns)


def ready_ports(index: int, conn: Connection, timeout_s: float = 120.0) -> dict[str, int]:
    """The ports device ``index`` reports once it serves; an error naming it when it cannot."""
    if not conn.poll(timeout_s):
        raise TimeoutError(f"device {index} did not start within {timeout_s:.0f} s")
    try:
        ports = conn.recv()
    except EOFError:
        raise RuntimeError(f"device {index} exited while starting (its traceback is above)") from None
    if "error" in ports:
        raise RuntimeError(f"device {index} failed to start: {ports['error']}")
    return ports


def stop_processes(procs: list[Any], conns: list[Connection]) -> None:
    """Ask each device to stop, then terminate and kill whatever is still running."""
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send("stop")
        conn.close()
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join()


# --- BS side: one link per device and candidate ----------------------------------------------------


class Link(Protocol):
    async def call(self, frame: bytes, timeout_s: float) -> bytes: ...

    async def close(self) -> None: ...


class GrpcUnaryLink:
    """Today's data plane: a grpc.aio channel, a unary call per device and layer."""

    def __init__(self, channel: Any, token: str) -> None:
        self.channel, self.stub, self.metadata = channel, channel.unary_unary(RUN_EXPERT), bearer(token)

    @classmethod
    async def open(cls, port: int, token: str, tls: TLSFiles | None) -> "GrpcUnaryLink":
        channel = open_channel(f"{HOST}:{port}", tls, GRPC_OPTIONS, aio=True)
        await channel.channel_ready()
        return cls(channel, token)

    async def call(self, frame: bytes, timeout_s: float) -> bytes:
        reply: bytes = await self.stub(frame, timeout=timeout_s, metadata=self.metadata)
        return reply

    async def close(self) -> None:
        await self.channel.close()


class Pipelined:
    """Calls multiplexed on one persistent connection: each message carries a call id, one reader
    task hands the answers to the waiting calls; a lost connection fails every waiting call."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.broken: BaseException | None = None
        self.reader = asyncio.get_running_loop().create_task(self.read_loop())

    async def send(self, message: bytes) -> None:
        raise NotImplementedError

    async def receive(self) -> bytes:
        raise NotImplementedError

    async def call(self, frame: bytes, timeout_s: float) -> bytes:
        if self.broken is not None:
            raise ConnectionError(f"the connection is lost: {self.broken}")
        call_id = next(self.ids)
        self.waiting[call_id] = waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self.send(_HEAD.pack(call_id, OK) + frame)
                status, body = await waiter
        finally:
            self.waiting.pop(call_id, None)
        if status != OK:
            raise Refused(body.decode(errors="replace"))
        return body

    async def read_loop(self) -> None:
        try:
            while True:
                message = await self.receive()
                call_id, status = _HEAD.unpack_from(message)
                waiter = self.waiting.pop(call_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result((status, message[_HEAD.size :]))
        except (OSError, EOFError, struct.error, grpc.RpcError, zmq.ZMQError) as err:
            self.broken = err
            for waiter in self.waiting.values():
                if not waiter.done():
                    waiter.set_exception(err)

    async def stop_reader(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class GrpcStreamLink(Pipelined):
    """One grpc.aio bidirectional stream per device; the token travels once, when it opens."""

    def __init__(self, channel: Any, stream: Any) -> None:
        self.channel, self.stream, self.writing = channel, stream, asyncio.Lock()
        super().__init__()

    @classmethod
    async def open(cls, port: int, token: str, tls: TLSFiles | None) -> "GrpcStreamLink":
        channel = open_channel(f"{HOST}:{port}", tls, GRPC_OPTIONS, aio=True)
        await channel.channel_ready()
        return cls(channel, channel.stream_stream(STREAM_METHOD)(metadata=bearer(token)))

    async def send(self, message: bytes) -> None:
        async with self.writing:  # grpc.aio allows one write in flight per stream
            await self.stream.write(message)

    async def receive(self) -> bytes:
        message = await self.stream.read()
        if message is grpc.aio.EOF:
            raise EOFError("the device ended the stream")
        return bytes(message)

    async def close(self) -> None:
        self.stream.cancel()
        await self.stop_reader()
        await self.channel.close()


class TcpLink(Pipelined):
    """asyncio streams (uvloop): one TCP connection per device, u32 length-prefixed messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stream_reader, self.writer = reader, writer
        super().__init__()

    @classmethod
    async def open(cls, port: int, token: str, tls: TLSFiles | None) -> "TcpLink":
        context = None if tls is None else client_ssl(tls)
        reader, writer = await asyncio.open_connection(HOST, port, ssl=context)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                nonce = await reader.readexactly(NONCE_BYTES)
                writer.write(reply := client_reply(token.encode(), nonce))
                check_server(token.encode(), nonce, reply, await reader.readexactly(MAC_BYTES))
        except (OSError, EOFError, TimeoutError) as err:
            writer.close()
            raise AuthError(f"handshake with device port {port} failed: {err!r}") from err
        return cls(reader, writer)

    async def send(self, message: bytes) -> None:
        self.writer.writelines((_LEN.pack(len(message)), message))
        await self.writer.drain()

    async def receive(self) -> bytes:
        return await read_frame(self.stream_reader)

    async def close(self) -> None:
        await self.stop_reader()
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class ZmqLink(Pipelined):
    """A pyzmq DEALER connected to the device's ROUTER; [verb, body] messages."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock
        super().__init__()

    @classmethod
    async def open(cls, port: int, token: str, tls: TLSFiles | None) -> "ZmqLink":
        assert tls is None, "libzmq has no TLS"
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, FRAME_LIMIT)
        sock.connect(f"tcp://{HOST}:{port}")
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await zmq_handshake(sock, token.encode())
        except (ValueError, TimeoutError, AuthError) as err:
            sock.close()
            raise AuthError(f"handshake with device port {port} failed: {err!r}") from err
        return cls(sock)

    async def send(self, message: bytes) -> None:
        await self.sock.send_multipart([b"CALL", message])

    async def receive(self) -> bytes:
        parts = await self.sock.recv_multipart()
        if len(parts) != 2 or parts[0] != b"ANSWER":
            raise ProtocolError(f"the device sent {parts[0]!r} instead of an answer (e.g. DENY)")
        return bytes(parts[1])

    async def close(self) -> None:
        await self.stop_reader()
        self.sock.close()


async def zmq_handshake(sock: zmq.asyncio.Socket, token: bytes) -> None:
    await sock.send_multipart([b"HELLO"])
    _challenge, nonce = await sock.recv_multipart()
    await sock.send_multipart([b"AUTH", reply := client_reply(token, nonce)])
    parts = await sock.recv_multipart()
    if parts[0] != b"OK" or len(parts) != 2:
        raise AuthError("the device refused the token")
    check_server(token, nonce, reply, parts[1])


class InProcessLink:
    """No transport: the device's echo called in this process (the floor under every candidate)."""

    @classmethod
    async def open(cls, port: int, token: str, tls: TLSFiles | None) -> "InProcessLink":
        return cls()

    async def call(self, frame: bytes, timeout_s: float) -> bytes:
        return answer(_HEAD.pack(0, OK) + frame)[_HEAD.size :]

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class Candidate:
    key: str  # also the key of its port in a device's ports
    label: str
    loop: str  # "asyncio" (grpc.aio's supported loop, as links.py runs it) or "uvloop"
    open: Callable[[int, str, TLSFiles | None], Awaitable[Link]]
    secure: bool = False
    reference: bool = False  # measured for comparison, not a candidate to win

    @property
    def baseline(self) -> str:
        return "grpc_unary+mtls" if self.secure else "grpc_unary"


def candidates(tls: bool) -> list[Candidate]:
    """The four candidates, two references (streams without uvloop; no transport at all) and, with
    ``tls``, the candidates that can do mutual TLS."""
    plain = [
        Candidate("grpc_unary", "gRPC unary (today)", "asyncio", GrpcUnaryLink.open),
        Candidate("grpc_stream", "gRPC bidi stream", "asyncio", GrpcStreamLink.open),
        Candidate("tcp_uvloop", "asyncio streams+uvloop", "uvloop", TcpLink.open),
        Candidate("zmq", "pyzmq DEALER/ROUTER", "uvloop", ZmqLink.open),
        Candidate("tcp_asyncio", "asyncio streams, no uvloop", "asyncio", TcpLink.open, reference=True),
        Candidate("inproc", "in-process echo (floor)", "asyncio", InProcessLink.open, reference=True),
    ]
    secure = [
        Candidate(f"{c.key}+mtls", f"{c.label} +mTLS", c.loop, c.open, secure=True)
        for c in plain[:3]  # libzmq has no TLS
    ]
    return plain + (secure if tls else [])


# --- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    fan: int  # devices per call
    tokens: int  # T per device
    unit: str  # "us" or "ms"


def chosen(i: int, fan: int, devices: int) -> list[int]:
    """The devices of call ``i``: one rotating device, or all but a rotating one (top-7 of 8)."""
    if fan == 1:
        return [i % devices]
    skip = i % devices
    return [u for u in range(devices) if u != skip][:fan]


async def layer_call(links: list[Link], case: Case, hidden: torch.Tensor, i: int, ids: Iterator[int]) -> None:
    """What the BS does per layer: a bundle to each chosen device at once, every answer decoded and
    checked (one response per request, same id and shape)."""
    devices = chosen(i, case.fan, len(links))
    reqs = [ExpertRequest(0, u, hidden, next(ids), CALL_TIMEOUT_S) for u in devices]
    calls = (links[u].call(encode_bundle([r]), CALL_TIMEOUT_S) for u, r in zip(devices, reqs, strict=True))
    for req, reply in zip(reqs, await asyncio.gather(*calls), strict=True):
        check_reply(req, reply)


def check_reply(req: ExpertRequest, reply: bytes) -> ExpertResponse:
    messages, _ = decode_all(reply)
    resp = messages[0]
    if len(messages) != 1 or not isinstance(resp, ExpertResponse) or resp.request_id != req.request_id:
        raise ProtocolError(f"the answer to request {req.request_id} is {messages}")
    if resp.outputs.shape != req.hidden.shape:
        raise ProtocolError(f"outputs {list(resp.outputs.shape)} for hidden {list(req.hidden.shape)}")
    return resp


async def timed(
    links: list[Link], case: Case, hidden: torch.Tensor, calls: int, ids: Iterator[int]
) -> list[float]:
    """Seconds of each of ``calls`` layer calls."""
    samples = []
    for i in range(calls):
        start = time.perf_counter()
        await layer_call(links, case, hidden, i, ids)
        samples.append(time.perf_counter() - start)
    return samples


async def echoes_exactly(links: list[Link], hidden: torch.Tensor) -> bool:
    """Whether every device gives back exactly the hidden states it was sent."""
    reqs = [ExpertRequest(0, u, hidden, u + 1, CALL_TIMEOUT_S) for u in range(len(links))]
    replies = await asyncio.gather(
        *(link.call(encode_bundle([r]), CALL_TIMEOUT_S) for link, r in zip(links, reqs, strict=True))
    )
    return all(torch.equal(check_reply(r, y).outputs, hidden) for r, y in zip(reqs, replies, strict=True))


async def wrong_token_refused(cand: Candidate, port: int, tls: TLSFiles | None, frame: bytes) -> str:
    """How the device refuses a BS with the wrong token (AssertionError if it does not)."""
    try:
        link = await cand.open(port, "not-the-token", tls)
        try:
            await link.call(frame, CALL_TIMEOUT_S)
        finally:
            await link.close()
    except (ConnectionError, grpc.RpcError) as err:
        return f"refused ({type(err).__name__})"
    raise AssertionError(f"{cand.key}: a wrong token was accepted")


async def gather(*aws: Awaitable[Any]) -> list[Any]:
    """asyncio.gather on the running loop (outside a coroutine it would pick the default loop)."""
    return list(await asyncio.gather(*aws))


class BS:
    """This process's side: an event loop per kind, every candidate's links to every device."""

    def __init__(self, cands: list[Candidate], ports: list[dict[str, int]], token: str, tls: TLSFiles | None):
        self.cands, self.ports, self.token, self.tls = cands, ports, token, tls
        self.loops = {"asyncio": asyncio.new_event_loop(), "uvloop": uvloop.new_event_loop()}
        self.links: dict[str, list[Link]] = {}

    def run(self, cand: Candidate, coro: Awaitable[Any]) -> Any:
        return self.loops[cand.loop].run_until_complete(coro)

    def connect(self, cand: Candidate) -> float:
        """Open a link to every device (with its handshake); the seconds that took."""
        tls = self.tls if cand.secure else None
        start = time.perf_counter()
        opening = gather(*(cand.open(p.get(cand.key, 0), self.token, tls) for p in self.ports))
        self.links[cand.key] = self.run(cand, opening)
        return time.perf_counter() - start

    def refusal(self, cand: Candidate, frame: bytes) -> str:
        tls = self.tls if cand.secure else None
        return str(self.run(cand, wrong_token_refused(cand, self.ports[0][cand.key], tls, frame)))

    def close(self) -> None:
        for cand in self.cands:
            links = self.links.pop(cand.key, [])
            with contextlib.suppress(Exception):  # best effort: the devices are stopped anyway
                self.run(cand, gather(*(link.close() for link in links)))
        zmq.asyncio.Context.instance().destroy(linger=0)
        for loop in self.loops.values():
            loop.close()


# --- the run ---------------------------------------------------------------------------------


def measure(bs: BS, d: int, cases: list[Case], rounds: int, calls: int, warmup: int) -> dict[str, Any]:
    """samples[case][candidate] = one list of seconds per round; candidates alternate, their
    order rotating every round."""
    hidden = {
        c.key: torch.randn(c.tokens, d, generator=torch.Generator().manual_seed(c.tokens)) for c in cases
    }
    ids = itertools.count(1000)
    for cand in bs.cands:
        assert bs.run(cand, echoes_exactly(bs.links[cand.key], hidden[cases[-1].key])), cand.key
        for case in cases:
            bs.run(cand, timed(bs.links[cand.key], case, hidden[case.key], warmup, ids))
    samples: dict[str, dict[str, list[list[float]]]] = {c.key: {k.key: [] for k in bs.cands} for c in cases}
    for r in range(rounds):
        order = bs.cands[r % len(bs.cands) :] + bs.cands[: r % len(bs.cands)]
        for case in cases:
            for cand in order:
                gc.collect()  # cheap: setup's objects are frozen
                block = timed(bs.links[cand.key], case, hidden[case.key], calls, ids)
                samples[case.key][cand.key].append(bs.run(cand, block))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return samples


def stats(rounds: list[list[float]], base: list[list[float]]) -> dict[str, Any]:
    """Median, p95 (pooled over rounds) and their ratios to ``base``; the ratio of each round's medians."""
    pooled, pooled_base = np.concatenate(rounds), np.concatenate(base)
    med, p95 = float(np.median(pooled)), float(np.percentile(pooled, 95))
    round_ratios = [float(np.median(a) / np.median(b)) for a, b in zip(rounds, base, strict=True)]
    return {
        "median_s": med,
        "p95_s": p95,
        "mean_s": float(pooled.mean()),
        "n": int(pooled.size),
        "round_medians_s": [float(np.median(a)) for a in rounds],
        "ratio_median": med / float(np.median(pooled_base)),
        "ratio_p95": p95 / float(np.percentile(pooled_base, 95)),
        "round_ratios": round_ratios,
    }


def table(cases: list[Case], cands: list[Candidate], results: dict[str, Any]) -> None:
    print(
        "\n×base: median (p95) over gRPC unary with the same security (today's data plane); "
        "rounds: the per-round median ratios, min–max"
    )
    head = f"{'median':>11} {'p95':>11} {'×base med':>9} {'×base p95':>9}  rounds"
    print(f"\n{'case':<22} {'candidate':<30} {head}")
    for case in cases:
        scale, unit, fmt = (1e6, "µs", "8.0f") if case.unit == "us" else (1e3, "ms", "8.2f")
        for cand in cands:
            s = results[case.key][cand.key]
            spread = f"{min(s['round_ratios']):.2f}–{max(s['round_ratios']):.2f}"
            print(
                f"{case.label:<22} {cand.label:<30} {s['median_s'] * scale:{fmt}} {unit} "
                f"{s['p95_s'] * scale:{fmt}} {unit} {s['ratio_median']:9.3f} {s['ratio_p95']:9.3f}  {spread}"
            )
        print()


def summary(cases: list[Case], cands: list[Candidate], results: dict[str, Any]) -> list[str]:
    """One line per case and security: the fastest candidate by median, its lead over gRPC unary
    and over the next candidate, and (plaintext) what it adds to the in-process floor; then what
    uvloop buys over asyncio's own loop."""
    lines = []
    for secure in sorted({c.secure for c in cands}):
        group = [c for c in cands if c.secure == secure and not c.reference]
        for case in cases:
            lines.append(winner_line(case, group, results[case.key]))
    for case in cases:
        rows = results[case.key]
        uv = rows["tcp_asyncio"]["median_s"] / rows["tcp_uvloop"]["median_s"]
        lines.append(f"{case.label}: asyncio streams without uvloop take ×{uv:.2f} the time with it")
    return lines


def winner_line(case: Case, group: list[Candidate], rows: dict[str, Any]) -> str:
    best = min(group, key=lambda c: rows[c.key]["median_s"])
    runner = min((c for c in group if c != best), key=lambda c: rows[c.key]["median_s"])
    win, base = rows[best.key], rows[best.baseline]
    lead = rows[runner.key]["median_s"] / win["median_s"]
    line = (
        f"{case.label}{' (mTLS)' if best.secure else ''}: {best.label} wins, median "
        f"{win['median_s'] * 1e3:.3f} ms vs {base['median_s'] * 1e3:.3f} ms for gRPC unary "
        f"({1 / win['ratio_median']:.1f}× faster; p95 {1 / win['ratio_p95']:.1f}×); "
        f"next: {runner.label}, ×{lead:.2f} the winner's median"
    )
    if not best.secure:
        line += f"; transport overhead {(win['median_s'] - rows['inproc']['median_s']) * 1e3:.3f} ms"
    return line


def machine(load_start: tuple[float, ...]) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": {
            "grpcio": grpc.__version__,
            "pyzmq": zmq.pyzmq_version(),
            "libzmq": zmq.zmq_version(),
            "uvloop": uvloop.__version__,
            "torch": torch.__version__,
        },
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


def message_sizes(d: int, cases: list[Case]) -> dict[str, Any]:
    """Bytes of one device's request and answer bundles per case (before each candidate's envelope)."""
    sizes = {}
    for case in cases:
        hidden = torch.zeros(case.tokens, d)
        request = encode_bundle([ExpertRequest(0, 0, hidden, 1, CALL_TIMEOUT_S)])
        sizes[case.key] = {"request_bytes": len(request), "response_bytes": len(echo(request))}
    return sizes


def node_pki(folder: Path) -> TLSFiles | None:
    """The runtime's node certificate, key and CA (both sides use them, as the mTLS tests do)."""
    try:
        from wdmoe.runtime.security import make_test_pki

        pki = make_test_pki(folder)
    except ImportError:
        print("no `cryptography`: the mTLS rows are skipped (pip install cryptography)")
        return None
    return TLSFiles(pki["node_cert"], pki["node_key"], pki["ca"])


def default_cases(devices: int) -> tuple[int, list[Case]]:
    """D of the default model (the ``smollm2-moe8`` preset) and the cases at its top-k (at most
    ``devices`` - 1). Imported here: a device process re-imports this file and needs no config."""
    from wdmoe.config import resolve

    model = resolve({"model": "smollm2-moe8"}).model
    k = min(model.top_k, devices - 1)
    return model.hidden_size, [
        Case("rt1", "1 device × 1 token", 1, 1, "us"),
        Case("fanout_t1", f"{k} of {devices} × 1 token", k, 1, "ms"),
        Case("fanout_t16", f"{k} of {devices} × 16 tokens", k, 16, "ms"),
    ]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300, help="calls per candidate, case and round")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--devices", type=int, default=DEVICES)
    parser.add_argument("--no-tls", action="store_true", help="skip the mutual-TLS rows")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 devices, 2 rounds × 10 calls, nothing written"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transport.json")
    args = parser.parse_args()
    if args.quick:  # starting 8 processes that import torch takes ~10 s of a busy 2-core machine
        args.devices, args.rounds, args.calls, args.warmup = 4, 2, 10, 3
    if args.devices < 2 or min(args.rounds, args.calls) < 1 or args.warmup < 0:
        parser.error("--devices must be ≥ 2, --rounds and --calls ≥ 1, --warmup ≥ 0")
    return args


def run(args: argparse.Namespace, d: int, cases: list[Case], folder: Path) -> dict[str, Any]:
    """Start the devices, connect every candidate, check auth, measure; the samples' statistics."""
    start = time.perf_counter()
    token = secrets.token_urlsafe(24)
    tls = None if args.no_tls else node_pki(folder)
    cands = candidates(tls is not None)
    probe = encode_bundle([ExpertRequest(0, 0, torch.zeros(1, d), 1, CALL_TIMEOUT_S)])
    with device_processes(args.devices, token, tls) as ports:
        print(f"{args.devices} device processes up in {time.perf_counter() - start:.1f} s", flush=True)
        bs = BS(cands, ports, token, tls)
        try:
            connect_s = {c.key: bs.connect(c) for c in cands}
            wrong_token = {c.key: bs.refusal(c, probe) for c in cands if c.key != "inproc"}
            print("a wrong token: " + ", ".join(f"{k} {v}" for k, v in wrong_token.items()))
            print(
                "connect (+ handshake) to every device: "
                + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in connect_s.items()),
                flush=True,
            )
            gc.collect()
            gc.freeze()
            samples = measure(bs, d, cases, args.rounds, args.calls, args.warmup)
        finally:
            bs.close()
    results = {
        case.key: {c.key: stats(samples[case.key][c.key], samples[case.key][c.baseline]) for c in cands}
        for case in cases
    }
    return {
        "cands": cands,
        "results": results,
        "connect_all_devices_s": connect_s,
        "wrong_token": wrong_token,
    }


def report(args: argparse.Namespace, d: int, cases: list[Case], out: dict[str, Any]) -> dict[str, Any]:
    cands: list[Candidate] = out.pop("cands")
    return {
        "machine": machine(args.load_start),
        "settings": {
            "devices": args.devices,
            "hidden_size": d,
            "dtype": "float32",
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "warmup_calls": args.warmup,
            "call_timeout_s": CALL_TIMEOUT_S,
            "envelope": "call id u64 | status u8 (+ u32 length on TCP; zmq: [verb, message] frames)",
            "note": "absolute times move with the machine's load (see loadavg): compare the ratios",
        },
        "cases": {c.key: {"label": c.label, "devices_per_call": c.fan, "tokens": c.tokens} for c in cases},
        "message_sizes": message_sizes(d, cases),
        "candidates": {
            c.key: {"label": c.label, "bs_loop": c.loop, "mtls": c.secure, "reference": c.reference}
            for c in cands
        },
        **out,
    }


def main() -> None:
    args = parse()
    args.load_start = os.getloadavg()
    started = time.perf_counter()
    d, cases = default_cases(args.devices)
    try:
        with tempfile.TemporaryDirectory(prefix="wdmoe-transport-") as folder:
            out = run(args, d, cases, Path(folder))
    except KeyboardInterrupt:
        sys.exit("interrupted: the device processes are stopped, nothing written")
    table(cases, out["cands"], out["results"])
    out["summary"] = summary(cases, out["cands"], out["results"])
    print("\n".join(out["summary"]))
    print(f"({time.perf_counter() - started:.1f} s in all)")
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report(args, d, cases, out), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
