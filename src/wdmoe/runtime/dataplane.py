"""The data plane of expert calls: one persistent TCP connection per device, asyncio streams on uvloop.

gRPC stays for control (Register and heartbeats, health, Generate, Stats) and for devices that
advertise no data address; expert calls travel here (``benchmarks/transport.py``: 0.30× gRPC
unary's time). No maths, no decisions: bytes, deadlines, authentication; integers little-endian.

    connection = [TLS handshake] handshake envelope*
    handshake    device → BS   version u8 | device nonce (32 B)
                 BS → device   version u8 | BS nonce (32 B) | HMAC-SHA256(token, "bs" | nonces)
                 device → BS   status u8 | HMAC-SHA256(token, "device" | nonces)   (zeros: refused)
    envelope     length u32 | call id u64 | status u8 | body        (length = 9 + len(body))
      request    status 0; body = a wire frame or bundle (:mod:`wdmoe.runtime.wire`)
      reply      status 0: body = the answer's frame or bundle; else a STATUS code: body = the reason

The token proves itself both ways without travelling (checked with ``hmac.compare_digest``). A
length is checked against the frame limit before its body is read: an oversized one is refused
(RESOURCE_EXHAUSTED) and the connection closed. Calls are multiplexed by call id: a reply that
comes after its call gave up is dropped. Refusals carry gRPC's status names: both planes book alike.
"""

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.runtime.security import TLSFiles, client_ssl_context, server_ssl_context
from wdmoe.runtime.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("wdmoe.dataplane")

VERSION = 1  # of the handshake and envelope; a device advertises it with its data address
NONCE_BYTES = MAC_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0  # a device drops a peer that has not proved the token by then
_ENVELOPE = struct.Struct("<IQB")  # length, call id, status
_HEAD = _ENVELOPE.size - 4  # call id + status: what the length counts besides the body
FRAME_LIMIT = _HEAD + MAX_MESSAGE_BYTES  # the largest length a peer may announce

# Status codes of replies and of the handshake; names as gRPC's, so both planes book alike.
_NAMES = "OK INVALID_ARGUMENT NOT_FOUND DEADLINE_EXCEEDED UNAUTHENTICATED RESOURCE_EXHAUSTED"
STATUS = dict(enumerate([*_NAMES.split(), "FAILED_PRECONDITION", "INTERNAL"]))  # codes are the format
CODES = {name: code for code, name in STATUS.items()}
OK = CODES["OK"]
Respond = Callable[[bytes, float], bytes]  # a request's body, its arrival (monotonic s) → the reply


class Refused(WdmoeError):
    """A request answered with a status instead of outputs; ``code`` is a name of STATUS."""

    def __init__(self, code: str, message: str) -> None:
        assert code in CODES and code != "OK", code
        super().__init__(message)
        self.code, self.message = code, message


class CallFailed(WdmoeError):
    """A call without an answer; ``code``: a device's refusal, UNAVAILABLE (no connection),
    DEADLINE_EXCEEDED (no answer in time) or WIRE (the device broke the envelope)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class ProtocolError(WdmoeError):
    """A peer broke the envelope (a length out of bounds): the connection ends; ``code``: the
    refusal it earns, ``call_id``: whose envelope it was."""

    def __init__(self, code: str, message: str, call_id: int) -> None:
        super().__init__(message)
        self.code, self.call_id = code, call_id


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where uvloop is installed (its streams cost about half of asyncio's), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def mac(token: bytes, role: bytes, device_nonce: bytes, bs_nonce: bytes) -> bytes:
    """HMAC-SHA256 over the role and both nonces: proves the token without sending it; the role
    keeps one side's proof from being replayed as the other's."""
    return hmac.new(token, role + device_nonce + bs_nonce, hashlib.sha256).digest()


def envelope(call_id: int, status: int, body: bytes) -> bytes:
    return _ENVELOPE.pack(_HEAD + len(body), call_id, status) + body  # one buffer: one syscall


async def read_envelope(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(call id, status, body) of the next envelope; ProtocolError, before its body, when too long."""
    length, call_id, status = _ENVELOPE.unpack(await reader.readexactly(_ENVELOPE.size))
    if not _HEAD <= length <= FRAME_LIMIT:
        code = "RESOURCE_EXHAUSTED" if length > FRAME_LIMIT else "INVALID_ARGUMENT"
        why = f"an envelope length of {length} bytes is outside {_HEAD}..{FRAME_LIMIT} (the frame limit)"
        raise ProtocolError(code, why, call_id)
    return call_id, status, await reader.readexactly(length - _HEAD)


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
    request answered by ``respond(body, arrived_s)`` (or :class:`Refused`) in one compute thread fed
    by a queue (half the cost of ``run_in_executor``), so the loop reads on while an expert runs.
    ``port`` is bound once the constructor returns; ``stop`` closes every connection."""

    def __init__(
        self,
        respond: Respond,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSFiles | None = None,
    ) -> None:
        if not token:
            raise ConfigError("the data plane needs a non-empty token (the BS proves it on connecting)")
        self.respond, self.token = respond, token.encode()
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
            if status != OK:
                conn.reply(call_id, "INVALID_ARGUMENT", f"a request has status 0, not {status}".encode())
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
        self.pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.connecting = asyncio.Lock()

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
        if status != OK:
            raise CallFailed(STATUS.get(status, f"STATUS_{status}"), body.decode(errors="replace"))
        return body

    async def exchange(self, frame: bytes) -> tuple[int, bytes]:
        writer = await self.connected()
        call_id = next(self.ids)
        self.pending[call_id] = waiter = asyncio.get_running_loop().create_future()
        try:
            writer.writelines((_ENVELOPE.pack(_HEAD + len(frame), call_id, OK), frame))  # one writev
            await writer.drain()
            return await waiter
        finally:
            self.pending.pop(call_id, None)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: a loss that also failed the write is no log noise

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
            return self.writer

    async def handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The BS's side: prove the token, check the device's proof (CallFailed when refused)."""
        here = f"the device at {self.address}"
        try:
            hello = await reader.readexactly(1 + NONCE_BYTES)
        except (OSError, EOFError) as err:
            why = f"{here} hung up before the handshake (a TLS refusal? no wdmoe data plane?): {err!r}"
            raise CallFailed("UNAVAILABLE", why) from err
        if hello[0] != VERSION:
            why = f"{here} speaks data-plane version {hello[0]}; this BS speaks version {VERSION}"
            raise CallFailed("FAILED_PRECONDITION", why)
        device_nonce, nonce = hello[1:], os.urandom(NONCE_BYTES)
        writer.write(bytes([VERSION]) + nonce + mac(self.token, b"bs", device_nonce, nonce))
        answer = await reader.readexactly(1 + MAC_BYTES)
        if answer[0] != OK:
            code = STATUS.get(answer[0], "UNAUTHENTICATED")
            fix = "they must share one token (--token / $WDMOE_TOKEN)"
            if code == "FAILED_PRECONDITION":
                fix = f"it does not speak data-plane version {VERSION}"
            raise CallFailed(code, f"{here} refused the BS: {fix}")
        if not hmac.compare_digest(answer[1:], mac(self.token, b"device", device_nonce, nonce)):
            raise CallFailed("UNAUTHENTICATED", f"{here} could not prove the shared token")

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
