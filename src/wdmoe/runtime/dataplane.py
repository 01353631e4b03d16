"""The data plane of expert calls: one persistent TCP connection per device, asyncio streams on uvloop.

gRPC stays for control (Register and heartbeats, health, Generate, Stats) and for devices that
advertise no data address; expert calls travel here (``benchmarks/transport.py``: 0.30× gRPC
unary's time), in the envelopes of :mod:`wdmoe.runtime.envelope` (handshake, PING, status codes).
No maths, no decisions: bytes, deadlines, authentication. Calls are multiplexed by call id: a
reply that comes after its call gave up is dropped.
"""

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import queue
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from wdmoe.errors import ConfigError
from wdmoe.runtime.envelope import (
    CODES,
    ENVELOPE,
    HANDSHAKE_TIMEOUT_S,
    HEAD,
    MAC_BYTES,
    NONCE_BYTES,
    OK,
    PING,
    PING_BYTES,
    STATUS,
    VERSION,
    CallFailed,
    ProtocolError,
    Refused,
    Reply,
    Respond,
    bs_proof,
    check_device_proof,
    envelope,
    mac,
    new_event_loop,
    read_envelope,
)
from wdmoe.runtime.security import TLSFiles, client_ssl_context, server_ssl_context
from wdmoe.runtime.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("wdmoe.dataplane")
PINGS = 3  # round trips timed when a connection opens (their median is kept)


# --- the device's side --------------------------------------------------------------------------


class Connection:
    """One BS connection at a device: its writer, and how many of its requests are computing."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer, self.computing, self.idle = writer, 0, asyncio.Event()

    def reply(self, call_id: int, code: str, body: bytes) -> None:
        """On the loop: send one answer (none when the request was skipped or the BS is gone)."""
        self.computing -= 1
        if code and not self.writer.is_closing():
            self.writer.write(envelope(call_id, CODES[code], body))
        if not self.computing:
            self.idle.set()

    async def finished(self) -> None:
        while self.computing:
            self.idle.clear()
            await self.idle.wait()


class StreamServer:
    """A device's data-plane server: ``asyncio.start_server`` on its own (uv)loop in a thread; each
    request answered by ``respond(body, arrived_s)`` (or :class:`Refused`). While ``inline()`` says
    so, on the loop itself, as soon as it is read: the BS sends one message per layer and waits for
    its answer, so there is nothing to read meanwhile, and a thread hop there and back costs more
    CPU than a one-token expert (``benchmarks/runtime.py``). Otherwise in one compute thread fed by
    a queue, so that the loop reads on (and a connection can be cut) while a slow request runs —
    the device asks for that while it injects delays. ``port`` is bound once the constructor
    returns; ``stop`` closes every connection."""

    def __init__(
        self,
        respond: Respond,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSFiles | None = None,
        inline: Callable[[], bool] = lambda: False,
    ) -> None:
        if not token:
            raise ConfigError("the data plane needs a non-empty token (the BS proves it on connecting)")
        self.respond, self.token, self.inline = respond, token.encode(), inline
        self.connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}  # by the task serving it
        self.jobs: queue.SimpleQueue[tuple[Connection, int, bytes, float] | None] = queue.SimpleQueue()
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="data-plane", daemon=True)
        self.thread.start()
        threading.Thread(target=self.compute, name="expert", daemon=True).start()
        context = None if tls is None else server_ssl_context(tls)
        timeout_s = None if tls is None else HANDSHAKE_TIMEOUT_S
        start = asyncio.start_server(self.serve, host, port, ssl=context, ssl_handshake_timeout=timeout_s)
        try:
            self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(30)
        except BaseException:
            self._end_loop()
            raise
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One BS connection: the handshake, then every request until it closes or breaks the envelope."""
        handler = asyncio.current_task()
        assert handler is not None, "a connection is served by a task"
        self.connections[handler] = writer
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                authenticated = await self.accept(reader, writer)
            if authenticated:
                await self.read_requests(reader, Connection(writer))
        except (OSError, EOFError) as err:  # ssl.SSLError and TimeoutError are OSErrors
            log.debug("data-plane connection ended: %r", err)
        except asyncio.CancelledError:  # stop(): ends quietly (asyncio 3.11 logs a cancelled handler)
            log.debug("data-plane connection closed by stop()")
        finally:
            self.connections.pop(handler, None)
            writer.close()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """The device's side of the handshake; False (the peer told why) when it is refused."""
        nonce = os.urandom(NONCE_BYTES)
        writer.write(bytes([VERSION]) + nonce)
        reply = await reader.readexactly(1 + NONCE_BYTES + MAC_BYTES)
        bs_nonce, proof = reply[1 : 1 + NONCE_BYTES], reply[1 + NONCE_BYTES :]
        if reply[0] != VERSION:
            refusal = f"data-plane version {reply[0]}; this device speaks version {VERSION}"
            writer.write(bytes([CODES["FAILED_PRECONDITION"]]) + bytes(MAC_BYTES))
        elif not hmac.compare_digest(proof, mac(self.token, b"bs", nonce, bs_nonce)):
            refusal = "a wrong token"
            writer.write(bytes([CODES["UNAUTHENTICATED"]]) + bytes(MAC_BYTES))
        else:
            writer.write(bytes([OK]) + mac(self.token, b"device", nonce, bs_nonce))
            await writer.drain()
            return True
        await writer.drain()
        log.warning("refused a data-plane connection from %s: %s", writer.get_extra_info("peername"), refusal)
        return False

    async def read_requests(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        """Hand each request to the compute thread and read on; at the end of the stream the answers
        in flight still go out. An envelope out of bounds is refused and ends the connection."""
        while True:
            try:
                call_id, status, body = await read_envelope(reader)
            except ProtocolError as err:
                conn.writer.write(envelope(err.call_id, CODES[err.code], str(err).encode()))
                await conn.writer.drain()
                log.warning("closed a data-plane connection: %s", err)
                return
            except asyncio.IncompleteReadError:
                await conn.finished()
                return
            conn.computing += 1
            if status == PING and len(body) <= PING_BYTES:
                conn.reply(call_id, "OK", body)
            elif status != OK:
                why = f"a request has status 0 (a call) or {PING} (a ping of ≤ {PING_BYTES} B), not {status}"
                conn.reply(call_id, "INVALID_ARGUMENT", why.encode())
            elif self.inline():
                conn.reply(call_id, *self.outcome(call_id, body, time.monotonic()))
            else:
                self.jobs.put((conn, call_id, body, time.monotonic()))
            await conn.writer.drain()  # flow control: wait while the BS does not read its answers

    def compute(self) -> None:
        """The compute thread: each request's reply or refusal, handed back to the loop. Requests of
        a connection that has gone are skipped (nobody can receive their answers)."""
        while (job := self.jobs.get()) is not None:
            conn, call_id, body, arrived_s = job
            alive = not conn.writer.is_closing()
            code, reply = self.outcome(call_id, body, arrived_s) if alive else ("", b"")
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
                self.loop.call_soon_threadsafe(conn.reply, call_id, code, reply)

    def outcome(self, call_id: int, body: bytes, arrived_s: float) -> tuple[str, bytes]:
        try:
            return "OK", self.respond(body, arrived_s)
        except Refused as refused:
            return refused.code, refused.message.encode()
        except Exception as err:  # a bug in the worker: that call fails, the server keeps serving
            log.exception("the device failed to answer call %d", call_id)
            return "INTERNAL", f"the device failed: {type(err).__name__}: {err}".encode()

    def stop(self) -> None:
        """Stop listening and close every connection (their pending calls fail at the BS; idempotent)."""
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):  # best effort: the loop ends below regardless
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self._end_loop()

    async def _close(self) -> None:
        self.server.close()
        for task, writer in list(self.connections.items()):
            writer.close()
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    def _end_loop(self) -> None:
        self.jobs.put(None)  # the compute thread ends after its current request
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


# --- the BS's side ------------------------------------------------------------------------------


class StreamClient:
    """The BS's connection to one device's data plane, made (and authenticated) on the first call.
    One reader task hands each reply to its call by call id; a lost connection fails every pending
    call UNAVAILABLE and is forgotten, so the next call connects afresh. Use on one event loop."""

    def __init__(self, address: str, token: str, tls: TLSFiles | None = None) -> None:
        if not token:
            raise ConfigError("the data plane needs a non-empty token")
        self.address, self.token = address, token.encode()
        host, _, port = address.rpartition(":")  # "host:port" or "[v6]:port"
        self.host, self.port = host.strip("[]"), int(port)
        self.ssl = None if tls is None else client_ssl_context(tls)
        self.server_name = None if tls is None else tls.server_name or self.host
        self.ids = itertools.count(1)
        self.pending: dict[int, Reply] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.connecting = asyncio.Lock()
        self.ping_s: float | None = None  # the last connection's ping round trip (wall s)

    async def call(self, frame: bytes, timeout_s: float) -> bytes:
        """The device's answer to ``frame`` within ``timeout_s``, or CallFailed saying why not."""
        if len(frame) > MAX_MESSAGE_BYTES:
            raise CallFailed(
                "RESOURCE_EXHAUSTED",
                f"a message of {len(frame)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
            )
        try:
            async with asyncio.timeout(timeout_s):
                status, body = await self.exchange(frame)
        except TimeoutError:  # before OSError: TimeoutError is one
            late = f"no answer from {self.address} within {timeout_s:.3f} s"
            raise CallFailed("DEADLINE_EXCEEDED", late) from None
        except (OSError, EOFError) as err:
            gone = f"cannot reach the device's data plane at {self.address}: {err!r}"
            raise CallFailed("UNAVAILABLE", gone) from err
        return self.outcome(status, body)

    async def exchange(self, frame: bytes) -> tuple[int, bytes]:
        writer = await self.connected()
        call_id, waiter = self.send(writer, frame)
        try:
            await writer.drain()
            return await waiter
        finally:
            self.forget(call_id, waiter)

    def send(self, writer: asyncio.StreamWriter, frame: bytes, status: int = OK) -> tuple[int, Reply]:
        """Write one request (a call; ``PING``: an echo) now, on the loop, without awaiting; its
        call id and the future of its (status, body)."""
        call_id = next(self.ids)
        self.pending[call_id] = waiter = asyncio.get_running_loop().create_future()
        writer.writelines((ENVELOPE.pack(HEAD + len(frame), call_id, status), frame))  # one writev
        return call_id, waiter

    def forget(self, call_id: int, waiter: Reply) -> None:
        """The call is over (answered, failed or given up): a late reply is dropped."""
        self.pending.pop(call_id, None)
        if waiter.done() and not waiter.cancelled():
            waiter.exception()  # retrieved: a loss that also failed the write is no log noise

    def outcome(self, status: int, body: bytes) -> bytes:
        """The answer's body, or CallFailed with the device's refusal."""
        if status != OK:
            raise CallFailed(STATUS.get(status, f"STATUS_{status}"), body.decode(errors="replace"))
        return body

    async def connected(self) -> asyncio.StreamWriter:
        """The authenticated connection, made now if there is none."""
        async with self.connecting:
            if self.writer is None:
                if self.ssl is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                else:
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=self.ssl, server_hostname=self.server_name
                    )
                try:
                    await self.handshake(reader, writer)
                except BaseException:
                    writer.close()
                    raise
                self.writer = writer
                self.reader_task = asyncio.get_running_loop().create_task(self.read_replies(reader, writer))
                self.ping_s = await self.ping(writer)
            return self.writer

    async def ping(self, writer: asyncio.StreamWriter) -> float | None:
        """The median wall seconds of PINGS echoes on a new connection: one message's round trip
        through both sides' software, without compute (None when the device does not echo)."""
        times = []
        for n in range(PINGS):
            start = time.perf_counter()
            call_id, waiter = self.send(writer, n.to_bytes(8, "little"), PING)
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    self.outcome(*await waiter)
            except CallFailed as err:
                if err.code in ("WIRE", "UNAVAILABLE"):  # the connection is gone: so is the call
                    raise
                log.warning("the device at %s refuses pings: %s", self.address, err)
                return None
            except TimeoutError:
                log.warning("the device at %s does not answer pings", self.address)
                return None
            finally:
                self.forget(call_id, waiter)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    async def handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The BS's side: prove the token, check the device's proof (CallFailed when refused)."""
        here = f"the device at {self.address}"
        try:
            hello = await reader.readexactly(1 + NONCE_BYTES)
        except (OSError, EOFError) as err:
            why = f"{here} hung up before the handshake (a TLS refusal? no wdmoe data plane?): {err!r}"
            raise CallFailed("UNAVAILABLE", why) from err
        proof, device_nonce, nonce = bs_proof(self.token, hello, here)
        writer.write(proof)
        check_device_proof(self.token, await reader.readexactly(1 + MAC_BYTES), device_nonce, nonce, here)

    async def read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand each reply to its waiting call (a late one finds none: dropped) until the connection ends."""
        try:
            while True:
                call_id, status, body = await read_envelope(reader)
                waiter = self.pending.pop(call_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result((status, body))
        except ProtocolError as err:
            self.lost(writer, "WIRE", f"the device at {self.address} broke the envelope: {err}")
        except (OSError, EOFError) as err:
            self.lost(writer, "UNAVAILABLE", f"the connection to {self.address} was lost: {err!r}")

    def lost(self, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        """Forget the connection (the next call reconnects); fail every call waiting on it."""
        if self.writer is writer:
            self.writer = None
        writer.close()
        waiting, self.pending = self.pending, {}
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_exception(CallFailed(code, message))

    async def close(self) -> None:
        writer, task = self.writer, self.reader_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            self.lost(writer, "UNAVAILABLE", "the BS closed the connection")
