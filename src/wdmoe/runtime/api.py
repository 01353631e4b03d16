"""The BS's control API: registration, generation and statistics as small versioned JSON messages.

Hidden states travel in the binary frames of :mod:`wdmoe.runtime.wire`; everything else between
devices, users and the BS is a JSON object with ``"v": API_VERSION``, parsed here with a
:class:`ApiError` naming the field that is wrong. Pure: bytes in, values out.

    /wdmoe.BS/Register   unary    {"v", "slot", "address", "experts": [[layer, expert], …], "name"}
                                  → {"v", "boot", "heartbeat_s"}
    /wdmoe.BS/Generate   stream   {"v", "prompt", "max_new_tokens", "temperature", "top_p", "seed",
                                   "chat", "system"} → {"text": …} … then {"done": true, "metrics": {…}}
    /wdmoe.BS/Stats      unary    {"v"} → {"v", "devices": […], "requests": …, "totals": {…}}
"""

import json
from dataclasses import asdict, dataclass
from typing import Any

from wdmoe.errors import WdmoeError

API_VERSION = 1
MAX_API_BYTES = 1 << 20
BS_SERVICE = "wdmoe.BS"
REGISTER = f"/{BS_SERVICE}/Register"
GENERATE = f"/{BS_SERVICE}/Generate"
STATS = f"/{BS_SERVICE}/Stats"


class ApiError(WdmoeError, ValueError):
    """A control message is not valid JSON, of another version, or has a wrong field."""


@dataclass(frozen=True)
class Registration:
    """A device announcing itself: its cell position ``slot``, where the BS reaches it, what it hosts."""

    slot: int
    address: str
    experts: tuple[tuple[int, int], ...]
    name: str = ""


@dataclass(frozen=True)
class GenerateRequest:
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
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(f"{what} message is not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ApiError(f"{what} message must be a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("v"), bool) or obj.get("v") != API_VERSION:
        raise ApiError(
            f"{what} message has API version {obj.get('v')!r}; this BS speaks version {API_VERSION}"
        )
    return obj


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
        raise ApiError(f"{what} field {name!r} must be {names}, got {value!r}")
    return value


def encode_registration(reg: Registration) -> bytes:
    return dump({"slot": reg.slot, "address": reg.address, "experts": list(reg.experts), "name": reg.name})


def parse_registration(data: bytes) -> Registration:
    obj = load(data, "Register")
    slot = field(obj, "slot", int, "Register")
    address = field(obj, "address", str, "Register")
    if slot < 0:
        raise ApiError(f"Register field 'slot' must be ≥ 0, got {slot}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ApiError(f"Register field 'address' must be HOST:PORT, got {address!r}")
    experts = field(obj, "experts", list, "Register")
    pairs = []
    for pair in experts:
        ok = isinstance(pair, list) and len(pair) == 2
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
            raise ApiError(
                f"Register field 'experts' must hold [layer, expert] pairs of ints ≥ 0, got {pair!r}"
            )
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise ApiError("Register field 'experts' is empty: a device must host at least one expert")
    return Registration(slot, address, tuple(pairs), field(obj, "name", str, "Register", ""))


def encode_generate(req: GenerateRequest) -> bytes:
    return dump(asdict(req))


def parse_generate(data: bytes) -> GenerateRequest:
    obj = load(data, "Generate")
    req = GenerateRequest(
        prompt=field(obj, "prompt", str, "Generate"),
        max_new_tokens=field(obj, "max_new_tokens", int, "Generate", 64),
        temperature=float(field(obj, "temperature", (int, float), "Generate", 0.0)),
        top_p=float(field(obj, "top_p", (int, float), "Generate", 1.0)),
        seed=field(obj, "seed", int, "Generate", 0),
        chat=field(obj, "chat", bool, "Generate", True),
        system=field(obj, "system", (str, type(None)), "Generate", None),
    )
    if not 1 <= req.max_new_tokens <= 1 << 16:
        raise ApiError(f"Generate field 'max_new_tokens' must be in 1..65536, got {req.max_new_tokens}")
    if not 0.0 <= req.temperature <= 100.0 or not 0.0 < req.top_p <= 1.0:
        raise ApiError(
            f"Generate needs 0 ≤ temperature ≤ 100 and 0 < top_p ≤ 1, got {req.temperature}, {req.top_p}"
        )
    return req
