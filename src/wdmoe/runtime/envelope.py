"""The data plane's protocol: handshake, envelope, status codes (no sockets; see :mod:`.dataplane`).

    connection = [TLS handshake] handshake envelope*
    handshake    device → BS   version u8 | device nonce (32 B)
                 BS → device   version u8 | BS nonce (32 B) | HMAC-SHA256(token, "bs" | nonces)
                 device → BS   status u8 | HMAC-SHA256(token, "device" | nonces)   (zeros: refused)
    envelope     length u32 | call id u64 | status u8 | body        (length = 9 + len(body))
      request    status 0: body = a wire frame or bundle (:mod:`wdmoe.runtime.wire`);
                 status PING (128, version 2): body = anything short, echoed at once (the BS
                 times the software's own round trip: :mod:`wdmoe.latency.overhead`)
      reply      status 0: body = the answer's frame or bundle (a ping's: its body); else a
                 STATUS code: body = the reason

Integers little-endian. The token proves itself both ways without travelling (checked with
``hmac.compare_digest``). A length is checked against the frame limit before its body is read:
an oversized one is refused (RESOURCE_EXHAUSTED) and the connection closed. Refusals carry gRPC's
status names: both planes book alike. Version 1 peers (no PING) are refused at the handshake.
"""

import asyncio
import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from wdmoe.errors import WdmoeError
from wdmoe.runtime.wire import MAX_MESSAGE_BYTES

VERSION = 2  # of the handshake and envelope; a device advertises it with its data address
NONCE_BYTES = MAC_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0  # a device drops a peer that has not proved the token by then
ENVELOPE = struct.Struct("<IQB")  # length, call id, status
HEAD = ENVELOPE.size - 4  # call id + status: what the length counts besides the body
FRAME_LIMIT = HEAD + MAX_MESSAGE_BYTES  # the largest length a peer may announce

# Status codes of replies and of the handshake; names as gRPC's, so both planes book alike.
_NAMES = "OK INVALID_ARGUMENT NOT_FOUND DEADLINE_EXCEEDED UNAUTHENTICATED RESOURCE_EXHAUSTED"
STATUS = dict(enumerate([*_NAMES.split(), "FAILED_PRECONDITION", "INTERNAL"]))  # codes are the format
CODES = {name: code for code, name in STATUS.items()}
OK = CODES["OK"]
PING = 128  # a request's status: echo the body (version 2)
PING_BYTES = 64  # the longest body a ping may carry
Respond = Callable[[bytes, float], bytes]  # a request's body, its arrival (monotonic s) → the reply
Reply = asyncio.Future[tuple[int, bytes]]  # a call's (status, body), once its reply is read


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


def bs_proof(token: bytes, hello: bytes, here: str) -> tuple[bytes, bytes, bytes]:
    """The BS's answer to a device's ``hello`` (version | device nonce): (what to send, the device
    nonce, the BS nonce); CallFailed when the device speaks another version. ``here``: the device,
    in words, for the message."""
    if hello[0] != VERSION:
        why = f"{here} speaks data-plane version {hello[0]}; this BS speaks version {VERSION}"
        raise CallFailed("FAILED_PRECONDITION", why)
    device_nonce, nonce = hello[1:], os.urandom(NONCE_BYTES)
    return bytes([VERSION]) + nonce + mac(token, b"bs", device_nonce, nonce), device_nonce, nonce


def check_device_proof(token: bytes, answer: bytes, device_nonce: bytes, nonce: bytes, here: str) -> None:
    """The device's verdict and proof (status | HMAC) on the BS's: CallFailed when it refused the BS
    or cannot prove the token (constant-time compare)."""
    if answer[0] != OK:
        code = STATUS.get(answer[0], "UNAUTHENTICATED")
        fix = "they must share one token (--token / $WDMOE_TOKEN)"
        if code == "FAILED_PRECONDITION":
            fix = f"it does not speak data-plane version {VERSION}"
        raise CallFailed(code, f"{here} refused the BS: {fix}")
    if not hmac.compare_digest(answer[1:], mac(token, b"device", device_nonce, nonce)):
        raise CallFailed("UNAUTHENTICATED", f"{here} could not prove the shared token")


def check_length(length: int, call_id: int) -> None:
    """ProtocolError when an envelope's announced length is outside HEAD..FRAME_LIMIT."""
    if not HEAD <= length <= FRAME_LIMIT:
        code = "RESOURCE_EXHAUSTED" if length > FRAME_LIMIT else "INVALID_ARGUMENT"
        why = f"an envelope length of {length} bytes is outside {HEAD}..{FRAME_LIMIT} (the frame limit)"
        raise ProtocolError(code, why, call_id)


def envelope(call_id: int, status: int, body: bytes) -> bytes:
    return ENVELOPE.pack(HEAD + len(body), call_id, status) + body  # one buffer: one syscall


async def read_envelope(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(call id, status, body) of the next envelope; ProtocolError, before its body, when too long."""
    length, call_id, status = ENVELOPE.unpack(await reader.readexactly(ENVELOPE.size))
    check_length(length, call_id)
    return call_id, status, await reader.readexactly(length - HEAD)
