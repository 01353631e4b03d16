"""The BS's direct lane to its devices' data planes: non-blocking sockets driven from the caller's
own thread (the model's), for messages with no emulated link delay and no TLS.

Why: through the link loop a layer costs a thread hop there and back, a future and a timer per
message, and the loop's own work per reply — about 2 ms of a 7-device layer's 3.8 ms fan-out on
this 2-core machine (``benchmarks/runtime.py``). Here the caller writes every device's message
and waits for every answer on one :class:`selectors.PollSelector`: no hop, no task. Same protocol
(:mod:`.envelope`), same handshake (the token proved by challenge–response, never sent), same
outcome codes as :class:`~wdmoe.runtime.dataplane.StreamClient`: UNAVAILABLE (no connection, or
it broke), DEADLINE_EXCEEDED (no answer within the budget), WIRE (the device broke the envelope),
the device's refusals. A reply that comes after its call gave up is dropped by its call id; a lost
connection is closed, and the next call connects afresh. Connecting (and pinging, for the
software's own cost: :mod:`wdmoe.latency.overhead`) is blocking and runs in a pool, all of a
layer's new connections at once. No maths, no decisions.
"""

import itertools
import math
import selectors
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from wdmoe.runtime.envelope import (
    ENVELOPE,
    HANDSHAKE_TIMEOUT_S,
    HEAD,
    MAC_BYTES,
    NONCE_BYTES,
    OK,
    PING,
    STATUS,
    CallFailed,
    ProtocolError,
    bs_proof,
    check_device_proof,
    check_length,
)

PINGS = 3  # round trips timed when a connection opens (their median is kept)
RECV_BYTES = 1 << 18


class Lane:
    """The BS's connection to one device's data plane (``host:port``). Use from one thread at a time."""

    def __init__(self, address: str, token: bytes) -> None:
        self.address, self.token = address, token
        host, _, port = address.rpartition(":")  # "host:port" or "[v6]:port"
        self.host, self.port = host.strip("[]"), int(port)
        self.sock: socket.socket | None = None
        self.inbox = bytearray()
        self.outbox = memoryview(b"")
        self.ids = itertools.count(1)
        self.ping_s: float | None = None  # the connection's ping round trip (wall s)

    @property
    def here(self) -> str:
        return f"the device at {self.address}"

    def connect(self, timeout_s: float) -> None:
        """Connect, authenticate and ping within ``timeout_s`` (CallFailed saying why not)."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
        except OSError as err:
            raise CallFailed("UNAVAILABLE", f"cannot reach {self.here}'s data plane: {err!r}") from err
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                hello = recv_exactly(sock, 1 + NONCE_BYTES)
            except (OSError, EOFError) as err:
                why = f"{self.here} hung up before the handshake (TLS? no wdmoe data plane?): {err!r}"
                raise CallFailed("UNAVAILABLE", why) from err
            proof, device_nonce, nonce = bs_proof(self.token, hello, self.here)
            sock.sendall(proof)
            check_device_proof(self.token, recv_exactly(sock, 1 + MAC_BYTES), device_nonce, nonce, self.here)
            self.ping_s = self.ping(sock)
        except (OSError, EOFError) as err:
            sock.close()
            raise CallFailed("UNAVAILABLE", f"the handshake with {self.here} broke: {err!r}") from err
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock, self.inbox, self.outbox = sock, bytearray(), memoryview(b"")

    def ping(self, sock: socket.socket) -> float | None:
        """The median wall seconds of PINGS echoes (None when the device refuses pings)."""
        times = []
        for n in range(PINGS):
            start = time.perf_counter()
            call_id = next(self.ids)
            sock.sendall(ENVELOPE.pack(HEAD + 8, call_id, PING) + n.to_bytes(8, "little"))
            length, answered, status = ENVELOPE.unpack(recv_exactly(sock, ENVELOPE.size))
            check_length(length, answered)
            recv_exactly(sock, length - HEAD)
            if status != OK or answered != call_id:
                return None
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def start(self, frame: bytes) -> int:
        """Begin sending one request; its call id (the rest goes out on :meth:`flush`)."""
        assert self.sock is not None, "connect first"
        call_id = next(self.ids)
        self.outbox = memoryview(ENVELOPE.pack(HEAD + len(frame), call_id, OK) + frame)
        self.flush()
        return call_id

    def flush(self) -> None:
        """Send what the socket takes now of the request under way."""
        assert self.sock is not None
        if self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                return
            self.outbox = self.outbox[sent:]

    def receive(self) -> list[tuple[int, int, bytes]]:
        """(call id, status, body) of every envelope complete after one read (EOFError at the end,
        ProtocolError for a length out of bounds)."""
        assert self.sock is not None
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return []
        if not data:
            raise EOFError("the device closed the connection")
        self.inbox += data
        replies, head = [], ENVELOPE.size
        while len(self.inbox) >= head:
            length, call_id, status = ENVELOPE.unpack_from(self.inbox)
            check_length(length, call_id)
            if len(self.inbox) < 4 + length:
                break
            replies.append((call_id, status, bytes(self.inbox[head : 4 + length])))
            del self.inbox[: 4 + length]
        return replies

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


@dataclass
class Outgoing:
    """One message on a lane and what became of it: the reply body, or (code, message)."""

    lane: Lane
    frame: bytes
    budget_s: float
    call_id: int = 0
    deadline_s: float = math.inf
    sent_s: float = math.nan  # time.monotonic()
    answered_s: float = math.nan
    reply: bytes | None = None
    error: tuple[str, str] = field(default=("", ""))

    def fail(self, code: str, message: str) -> None:
        self.error = (code, message)


def exchange(outgoing: list[Outgoing]) -> None:
    """Every message on its way at once (each on its own, connected lane); back when each is
    answered, failed or past its budget. Never raises for a device."""
    selector = selectors.PollSelector()
    waiting: dict[Lane, Outgoing] = {}
    now = time.monotonic()
    for o in outgoing:
        o.sent_s, o.deadline_s = now, now + o.budget_s
        try:
            o.call_id = o.lane.start(o.frame)
        except OSError as err:
            lost(o, "UNAVAILABLE", f"the connection to {o.lane.address} was lost: {err!r}")
            continue
        waiting[o.lane] = o
        assert o.lane.sock is not None
        selector.register(o.lane.sock, events(o.lane), o.lane)
    try:
        while waiting:
            now = time.monotonic()
            for lane, o in list(waiting.items()):
                if now >= o.deadline_s:
                    late = f"no answer from {lane.address} within {o.budget_s:.3f} s"
                    finish(o, selector, waiting, "DEADLINE_EXCEEDED", late)
            if waiting:
                wait_s = min(o.deadline_s for o in waiting.values()) - now
                for key, mask in selector.select(max(wait_s, 0.0)):
                    serve(key.data, mask, selector, waiting)
    finally:
        selector.close()


def serve(lane: Lane, mask: int, selector: selectors.BaseSelector, waiting: dict[Lane, Outgoing]) -> None:
    """One ready lane: send on, read what came; its message is settled when its reply is in."""
    o, where = waiting[lane], lane.address
    try:
        if mask & selectors.EVENT_WRITE:
            lane.flush()
            if not lane.outbox:
                assert lane.sock is not None
                selector.modify(lane.sock, selectors.EVENT_READ, lane)
        if mask & selectors.EVENT_READ:
            for call_id, status, body in lane.receive():
                if call_id != o.call_id:
                    continue  # the answer to a call that gave up: dropped
                o.answered_s = time.monotonic()
                if status == OK:
                    o.reply = body
                    finish(o, selector, waiting)
                else:
                    code = STATUS.get(status, f"STATUS_{status}")
                    finish(o, selector, waiting, code, body.decode(errors="replace"))
                return
    except ProtocolError as err:
        finish(o, selector, waiting, "WIRE", f"the device at {where} broke the envelope: {err}", drop=True)
    except (OSError, EOFError) as err:
        finish(o, selector, waiting, "UNAVAILABLE", f"the connection to {where} was lost: {err!r}", drop=True)


def finish(
    o: Outgoing,
    selector: selectors.BaseSelector,
    waiting: dict[Lane, Outgoing],
    code: str = "",
    message: str = "",
    drop: bool = False,
) -> None:
    """The message is settled (a reply, or ``code``): off the selector; the connection is closed
    when it broke, or when a request is left half-sent (the stream would be out of step)."""
    waiting.pop(o.lane, None)
    if o.lane.sock is not None:
        selector.unregister(o.lane.sock)
    if code:
        o.fail(code, message)
    if drop or o.lane.outbox:
        o.lane.close()


def lost(o: Outgoing, code: str, message: str) -> None:
    o.fail(code, message)
    o.lane.close()


def events(lane: Lane) -> int:
    return selectors.EVENT_READ | (selectors.EVENT_WRITE if lane.outbox else 0)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Blocking: exactly ``n`` bytes (EOFError when the peer closes first)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"the peer closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Lanes:
    """The BS's direct lanes, by device (its control address), each to the device's data address;
    used by one caller at a time (a lock), connected in a pool of threads."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        self.lanes: dict[str, Lane] = {}
        self.lock = threading.Lock()
        self.connector = ThreadPoolExecutor(8, thread_name_prefix="bs-connect")

    def run(self, messages: list[tuple[str, str, bytes, float]]) -> list[Outgoing]:
        """Each (device, data address, frame, budget s) sent and awaited on its lane, the new lanes
        connected first (all at once, their time taken from the budgets); one outcome each."""
        with self.lock:
            lanes = [self.lane(device, address) for device, address, _, _ in messages]
            outgoing = [Outgoing(lane, job[2], job[3]) for lane, job in zip(lanes, messages, strict=True)]
            start = time.monotonic()
            connecting = {
                i: self.connector.submit(o.lane.connect, min(o.budget_s, HANDSHAKE_TIMEOUT_S))
                for i, o in enumerate(outgoing)
                if o.lane.sock is None
            }
            for i, done in connecting.items():
                try:
                    done.result()
                except CallFailed as err:
                    outgoing[i].fail(err.code, err.message)
            spent_s = time.monotonic() - start
            ready = [o for o in outgoing if not o.error[0]]
            for o in ready:
                o.budget_s = max(o.budget_s - spent_s, 1e-3)
            exchange(ready)
        return outgoing

    def lane(self, device: str, address: str) -> Lane:
        """Under the lock: the device's lane (made when new, or afresh when the device moved)."""
        lane = self.lanes.get(device)
        if lane is None or lane.address != address:
            if lane is not None:
                lane.close()
            lane = self.lanes[device] = Lane(address, self.token)
        return lane

    def ping_s(self, device: str) -> float | None:
        lane = self.lanes.get(device)
        return None if lane is None else lane.ping_s

    def forget(self, device: str, wait: bool = True) -> None:
        """Close the device's lane (the next call connects afresh). ``wait=False``: the lane's user
        may hold the lock for a layer, so it is closed by the pool once it is free."""
        if wait:
            self.close_lane(device)
        else:
            self.connector.submit(self.close_lane, device)

    def close_lane(self, device: str) -> None:
        with self.lock:
            lane = self.lanes.pop(device, None)
            if lane is not None:
                lane.close()

    def close(self) -> None:
        for device in list(self.lanes):
            self.close_lane(device)
        self.connector.shutdown(wait=False, cancel_futures=True)
