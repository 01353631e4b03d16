"""The BS's control API: registration, generation and statistics as small versioned JSON messages.

Hidden states travel in the binary frames of :mod:`wdmoe.runtime.wire`; everything else between
devices, users and the BS is a JSON object with ``"v": API_VERSION``, parsed here with a
:class:`ApiError` naming the field that is wrong. Pure: bytes in, values out.

    /wdmoe.BS/Register   unary    {"v", "slot", "address", "experts": [[layer, expert], …], "name",
                                   "data": {"v", "address"}} → {"v", "boot", "heartbeat_s"}
    /wdmoe.BS/Generate   stream   {"v", "prompt", "max_new_tokens", "temperature", "top_p", "seed",
                                   "chat", "system"} → {"text": …} … then {"done": true, "metrics": {…}}
    /wdmoe.BS/Stats      unary    {"v"} → {"v", "devices": […], "requests": …, "totals": {…}}

Limits a message must keep: at most MAX_API_BYTES bytes and MAX_DEPTH levels of nesting; every
string encodable as UTF-8 (no lone surrogates such as "\\ud800"); Register "slot" and each layer
and expert in [0, 2^32); "address" HOST:PORT with an ASCII host of at most 253 characters (a
hostname, IPv4, or bracketed IPv6 "[::1]") and a port of 1–5 ASCII digits in 1..65535; "name" at
most MAX_NAME_CHARS characters; "data" optional (older devices send none): the device's data plane,
its protocol version "v" in [1, 255] and its HOST:PORT "address" (as "address"); Generate "seed"
in [0, 2^63). Error messages quote at most a short
excerpt of a bad value.
"""

import json
import re
import reprlib
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any

from wdmoe.errors import WdmoeError

API_VERSION = 1
MAX_API_BYTES = 1 << 20
MAX_DEPTH = 64  # nesting of a control message; ours need 3
MAX_NAME_CHARS = 128
MAX_HOST_CHARS = 253  # a DNS name's limit
MAX_SEED = 2**63  # exclusive; torch's generator takes less than 2^64, signed 64-bit consumers 2^63
MAX_INDEX = 2**32  # exclusive bound of slots, layers and experts (the wire carries them as u32)
BS_SERVICE = "wdmoe.BS"
REGISTER = f"/{BS_SERVICE}/Register"
GENERATE = f"/{BS_SERVICE}/Generate"
STATS = f"/{BS_SERVICE}/Stats"


class ApiError(WdmoeError, ValueError):
    """A control message is not valid JSON, of another version, or has a wrong field."""


@dataclass(frozen=True)
class Registration:
    """A device announcing itself: its cell position ``slot``, where the BS reaches it, what it hosts;
    ``data_address``: where its data plane listens ("" when it has none), which speaks version
    ``data_version`` of :mod:`wdmoe.runtime.dataplane` (a BS that speaks another calls it on gRPC)."""

    slot: int
    address: str
    experts: tuple[tuple[int, int], ...]
    name: str = ""
    data_address: str = ""
    data_version: int = 0


@dataclass(frozen=True)
class GenerateRequest:
    """A user's request; parse_generate guarantees the ranges in the module docstring."""

    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = True
    system: str | None = None


def dump(obj: dict[str, Any]) -> bytes:
    return json.dumps({"v": API_VERSION} | obj, separators=(",", ":")).encode()


def load(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object of this API version, or ApiError."""
    if len(data) > MAX_API_BYTES:
        raise ApiError(f"{what} message of {len(data)} bytes exceeds the limit of {MAX_API_BYTES} bytes")
    obj = parse_json(data, what)
    if not isinstance(obj, dict):
        raise ApiError(f"{what} message must be a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("v"), bool) or obj.get("v") != API_VERSION:
        raise ApiError(
            f"{what} message has API version {brief(obj.get('v'))}; this BS speaks version {API_VERSION}"
        )
    return obj


def parse_json(data: bytes, what: str) -> Any:
    """json.loads with every failure an ApiError, nesting bounded first (its C decoder recurses once
    per level: a megabyte of "[" would end in RecursionError, or worse)."""
    try:
        text = data.decode(json.detect_encoding(data), "surrogatepass")  # as json.loads decodes bytes
    except UnicodeDecodeError as err:
        raise ApiError(f"{what} message is not JSON: {err}") from err
    if nesting_depth(text) > MAX_DEPTH:
        raise ApiError(f"{what} message is nested too deeply: more than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except RecursionError as err:  # the last guard, should MAX_DEPTH ever be raised too far
        raise ApiError(f"{what} message is nested too deeply for the JSON decoder") from err
    except ValueError as err:  # JSONDecodeError, and ints past Python's 4300 digits
        raise ApiError(f"{what} message is not JSON: {err}") from err


# A JSON string (to its end if unterminated: linear time on any input), or a run of non-brackets.
_SKIPPED = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[^][{}"]+', re.DOTALL)
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings not counted."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # cannot be deeper: skip the scan for ordinary messages
    steps = map(_STEP.__getitem__, _SKIPPED.sub("", text))
    return max(accumulate(steps), default=0)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel = 3


def brief(value: Any, limit: int = 100) -> str:
    """A short repr of a client's value: an error message must not echo a megabyte back."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def field(
    obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, default: Any = ...
) -> Any:
    """obj[name] checked against ``kind`` (bool is not an int here); missing → default or ApiError."""
    if name not in obj:
        if default is ...:
            raise ApiError(f"{what} message lacks the field {name!r}")
        return default
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(f"{what} field {name!r} must be {names}, got {brief(value)}")
    return value


def check_text(value: str | None, name: str, what: str, max_chars: int = 0) -> None:
    """Refuse a string UTF-8 cannot carry: JSON's "\\ud800" escape makes a lone surrogate that the
    tokenizer and the gRPC layer fail on later; max_chars > 0 bounds its length."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(
            f"{what} field {name!r} is not valid Unicode text (a lone surrogate at character {err.start}): "
            f"{brief(value)}"
        ) from err
    if max_chars and len(value) > max_chars:
        raise ApiError(
            f"{what} field {name!r} has {len(value)} characters, at most {max_chars}: {brief(value)}"
        )


def index_field(obj: dict[str, Any], name: str, what: str) -> int:
    """An int in [0, MAX_INDEX)."""
    value: int = field(obj, name, int, what)
    if not 0 <= value < MAX_INDEX:
        raise ApiError(f"{what} field {name!r} must be in [0, 2^32), got {brief(value)}")
    return value


def encode_registration(reg: Registration) -> bytes:
    obj = {"slot": reg.slot, "address": reg.address, "experts": list(reg.experts), "name": reg.name}
    if reg.data_address:
        obj["data"] = {"v": reg.data_version, "address": reg.data_address}
    return dump(obj)


def parse_registration(data: bytes) -> Registration:
    obj = load(data, "Register")
    slot = index_field(obj, "slot", "Register")
    address = check_address(field(obj, "address", str, "Register"))
    pairs = parse_experts(field(obj, "experts", list, "Register"))
    name = field(obj, "name", str, "Register", "")
    check_text(name, "name", "Register", MAX_NAME_CHARS)
    data_address, data_version = parse_data_plane(field(obj, "data", dict, "Register", None))
    return Registration(slot, address, pairs, name, data_address, data_version)


def parse_data_plane(data: dict[str, Any] | None) -> tuple[str, int]:
    """(address, version) of a registration's "data" object; ("", 0) when it has none."""
    if data is None:
        return "", 0
    version: int = field(data, "v", int, "Register data")
    if not 1 <= version <= 255:
        raise ApiError(f"Register data field 'v' must be in 1..255, got {brief(version)}")
    address = field(data, "address", str, "Register data")
    return check_address(address, "Register data field 'address'"), version


# host: a bracketed IPv6 (with an optional zone), or a hostname / IPv4; port: 1–5 ASCII digits.
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


def check_address(address: str, what: str = "Register field 'address'") -> str:
    """HOST:PORT the BS can dial; refuses non-ASCII digits ("٥٠٠٥٠" passes str.isdigit) and
    unbracketed IPv6 (gRPC reads "::1:50051" as a host without a port)."""
    match = _ADDRESS.fullmatch(address)
    ok = match is not None and len(match[1]) <= MAX_HOST_CHARS and 0 < int(match[2]) < 65536
    if not ok:
        raise ApiError(
            f"{what} must be HOST:PORT (an ASCII hostname, IPv4 or [IPv6] of at most "
            f"{MAX_HOST_CHARS} characters, a port in 1..65535), got {brief(address)}"
        )
    return address


def parse_experts(experts: list) -> tuple[tuple[int, int], ...]:
    """[[layer, expert], …] with both in [0, 2^32), at least one pair."""
    pairs = []
    for pair in experts:
        ok = isinstance(pair, list) and len(pair) == 2
        if not ok or not all(type(v) is int and 0 <= v < MAX_INDEX for v in pair):
            raise ApiError(
                f"Register field 'experts' must hold [layer, expert] pairs of ints in [0, 2^32), "
                f"got {brief(pair)}"
            )
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise ApiError("Register field 'experts' is empty: a device must host at least one expert")
    return tuple(pairs)


def encode_generate(req: GenerateRequest) -> bytes:
    return dump(asdict(req))


def parse_generate(data: bytes) -> GenerateRequest:
    obj = load(data, "Generate")
    temperature = field(obj, "temperature", (int, float), "Generate", 0.0)
    top_p = field(obj, "top_p", (int, float), "Generate", 1.0)
    if not 0.0 <= temperature <= 100.0 or not 0.0 < top_p <= 1.0:  # before float(): 10**400 overflows
        got = f"{brief(temperature)}, {brief(top_p)}"
        raise ApiError(f"Generate needs 0 ≤ temperature ≤ 100 and 0 < top_p ≤ 1, got {got}")
    req = GenerateRequest(
        prompt=field(obj, "prompt", str, "Generate"),
        max_new_tokens=field(obj, "max_new_tokens", int, "Generate", 64),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=field(obj, "seed", int, "Generate", 0),
        chat=field(obj, "chat", bool, "Generate", True),
        system=field(obj, "system", (str, type(None)), "Generate", None),
    )
    check_text(req.prompt, "prompt", "Generate")
    check_text(req.system, "system", "Generate")
    if not 1 <= req.max_new_tokens <= 1 << 16:
        got = brief(req.max_new_tokens)
        raise ApiError(f"Generate field 'max_new_tokens' must be in 1..65536, got {got}")
    if not 0 <= req.seed < MAX_SEED:
        raise ApiError(f"Generate field 'seed' must be in [0, 2^63), got {brief(req.seed)}")
    return req
