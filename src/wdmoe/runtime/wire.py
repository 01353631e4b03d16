"""The wire format between the BS and the devices: versioned frames, tensors as raw bytes.

Pure: bytes in, values out; no sockets, no pickle. All integers and floats are little-endian.

    frame    = prefix body
    prefix   = magic "WDMO" (4 B) | version u16 | kind u8 | flags u8 (= 0)          8 B
    request  = layer u32 | expert u32 | request_id u64 | deadline_s f64 | tensor     (kind 1)
    response = request_id u64 | compute_s f64 | tensor                              (kind 2)
    tensor   = dtype code u8 | ndim u8 | ndim × dim u64 | payload
    bundle   = count u16 | count × (length u64 | frame)                             (kind 3)

The payload is the rest of the frame and must be exactly prod(shape) × itemsize bytes; the shape's
extent prod(max(d, 1)) × itemsize must also fit the size limit, so that an empty tensor cannot claim
dims no real tensor has (torch would overflow computing its storage). A bundle
carries several request (or several response) frames in one message: one device's experts of a
layer travel together, one message per device and layer as the latency model counts them.
Decoding checks every field and raises :class:`WireError` (never anything else) on a bad frame.
"""

import math
import struct
from dataclasses import dataclass

import torch

from wdmoe.errors import WdmoeError

MAGIC = b"WDMO"
WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 2**20  # default size limit of one frame (hidden [T, D] fp32 with T·D ≤ 16 Mi)
MAX_NDIM = 8
MAX_DIM = 2**32  # per dimension; keeps empty tensors of absurd shape out of torch

KIND_REQUEST = 1
KIND_RESPONSE = 2
KIND_BUNDLE = 3
MAX_BUNDLE = 4096  # frames in one bundle

_PREFIX = struct.Struct("<4sHBB")
_REQUEST = struct.Struct("<IIQd")
_RESPONSE = struct.Struct("<Qd")
_TENSOR = struct.Struct("<BB")
_DIM = struct.Struct("<Q")
_COUNT = struct.Struct("<H")

# Wire codes of the dtypes that may travel; codes are part of the format, never reuse one.
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
    5: torch.int32,
    6: torch.int64,
    7: torch.int8,
    8: torch.uint8,
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


class WireError(WdmoeError, ValueError):
    """A frame is malformed, too large, of another version, or a value cannot be encoded."""


@dataclass(frozen=True)
class ExpertRequest:
    """Run expert ``expert`` of MoE layer ``layer`` on hidden [n, D].

    deadline_s: the time budget in seconds the BS grants from sending (relative, so that the BS
    and device clocks need not agree).
    """

    layer: int
    expert: int
    hidden: torch.Tensor
    request_id: int = 0
    deadline_s: float = 0.0


@dataclass(frozen=True)
class ExpertResponse:
    """The expert's outputs [n, D] and the device's measured compute time in seconds."""

    request_id: int
    outputs: torch.Tensor
    compute_s: float


Message = ExpertRequest | ExpertResponse


def encoded_size(shape: tuple[int, ...], dtype: torch.dtype, kind: int = KIND_REQUEST) -> int:
    """Bytes of a frame carrying a tensor of ``shape`` and ``dtype`` (what the link transports)."""
    body = _REQUEST.size if kind == KIND_REQUEST else _RESPONSE.size
    return _PREFIX.size + body + _TENSOR.size + _DIM.size * len(shape) + math.prod(shape) * dtype.itemsize


def encode(msg: Message) -> bytes:
    """Serialise a request or response; raises WireError for values the format cannot carry."""
    if isinstance(msg, ExpertRequest):
        check_uint(msg.layer, 32, "layer")
        check_uint(msg.expert, 32, "expert")
        check_uint(msg.request_id, 64, "request_id")
        check_seconds(msg.deadline_s, "deadline_s")
        head = _PREFIX.pack(MAGIC, WIRE_VERSION, KIND_REQUEST, 0)
        body = _REQUEST.pack(msg.layer, msg.expert, msg.request_id, msg.deadline_s)
        return head + body + encode_tensor(msg.hidden)
    check_uint(msg.request_id, 64, "request_id")
    check_seconds(msg.compute_s, "compute_s")
    head = _PREFIX.pack(MAGIC, WIRE_VERSION, KIND_RESPONSE, 0)
    return head + _RESPONSE.pack(msg.request_id, msg.compute_s) + encode_tensor(msg.outputs)


def encode_tensor(t: torch.Tensor) -> bytes:
    """dtype code, ndim, dims, then the tensor's bytes in C order."""
    if t.dtype not in _CODES:
        raise WireError(f"dtype {t.dtype} cannot travel; supported: {sorted(map(str, _CODES))}")
    if t.dim() > MAX_NDIM:
        raise WireError(f"tensor has {t.dim()} dims, at most {MAX_NDIM} can travel")
    flat = t.detach().cpu().contiguous().reshape(-1)
    head = _TENSOR.pack(_CODES[t.dtype], t.dim()) + b"".join(_DIM.pack(d) for d in t.shape)
    return head + flat.view(torch.uint8).numpy().tobytes()


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse one frame; every malformed, oversized or wrong-version frame raises WireError."""
    kind = check_prefix(data, max_bytes)
    if kind == KIND_REQUEST:
        layer, expert, request_id, deadline_s = unpack(_REQUEST, data, _PREFIX.size, "request header")
        check_seconds(deadline_s, "deadline_s")
        hidden = decode_tensor(data, _PREFIX.size + _REQUEST.size, max_bytes)
        return ExpertRequest(layer, expert, hidden, request_id, deadline_s)
    if kind == KIND_RESPONSE:
        request_id, compute_s = unpack(_RESPONSE, data, _PREFIX.size, "response header")
        check_seconds(compute_s, "compute_s")
        outputs = decode_tensor(data, _PREFIX.size + _RESPONSE.size, max_bytes)
        return ExpertResponse(request_id, outputs, compute_s)
    if kind == KIND_BUNDLE:
        raise WireError("this message is a bundle of frames: decode it with decode_all")
    raise WireError(
        f"unknown message kind {kind}; known: {KIND_REQUEST} (request), {KIND_RESPONSE} (response), "
        f"{KIND_BUNDLE} (bundle)"
    )


def bundle_size(frame_sizes: list[int]) -> int:
    """Bytes of a bundle of frames of these sizes."""
    return _PREFIX.size + _COUNT.size + sum(_DIM.size + n for n in frame_sizes)


def encode_bundle(messages: list[Message]) -> bytes:
    """Several requests (or several responses) as one message."""
    if not 1 <= len(messages) <= MAX_BUNDLE:
        raise WireError(f"a bundle carries 1..{MAX_BUNDLE} frames, got {len(messages)}")
    frames = [encode(m) for m in messages]
    head = _PREFIX.pack(MAGIC, WIRE_VERSION, KIND_BUNDLE, 0) + _COUNT.pack(len(frames))
    return head + b"".join(_DIM.pack(len(f)) + f for f in frames)


def decode_all(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[list[Message], bool]:
    """The messages of a frame or of a bundle, and whether it was a bundle (WireError if bad)."""
    kind = check_prefix(data, max_bytes)
    if kind != KIND_BUNDLE:
        return [decode(data, max_bytes)], False
    (count,) = unpack(_COUNT, data, _PREFIX.size, "bundle count")
    if not 1 <= count <= MAX_BUNDLE:
        raise WireError(f"a bundle carries 1..{MAX_BUNDLE} frames, this one says {count}")
    offset, messages = _PREFIX.size + _COUNT.size, []
    for i in range(count):
        (length,) = unpack(_DIM, data, offset, f"bundle frame {i} length")
        offset += _DIM.size
        if offset + length > len(data):
            raise WireError(f"bundle frame {i} of {length} bytes runs past the message's {len(data)} bytes")
        frame = data[offset : offset + length]
        if check_prefix(frame, max_bytes) == KIND_BUNDLE:
            raise WireError(f"bundle frame {i} is itself a bundle; bundles do not nest")
        messages.append(decode(frame, max_bytes))
        offset += length
    if offset != len(data):
        raise WireError(f"{len(data) - offset} bytes follow the bundle's {count} frames")
    if len({type(m) for m in messages}) != 1:
        raise WireError("a bundle must carry only requests or only responses")
    return messages, True


def decode_request(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> ExpertRequest:
    msg = decode(data, max_bytes)
    if not isinstance(msg, ExpertRequest):
        raise WireError(f"expected an expert request, got {type(msg).__name__}")
    return msg


def decode_response(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> ExpertResponse:
    msg = decode(data, max_bytes)
    if not isinstance(msg, ExpertResponse):
        raise WireError(f"expected an expert response, got {type(msg).__name__}")
    return msg


def check_prefix(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> int:
    """Size, magic, version and flags of a frame; returns its kind."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) < _PREFIX.size:
        raise WireError(f"message of {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, kind, flags = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a wdmoe message: magic {magic!r}, expected {MAGIC!r}")
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version} is not supported: this build speaks version {WIRE_VERSION}")
    if flags != 0:
        raise WireError(f"unknown flags {flags:#x} (version {WIRE_VERSION} defines none)")
    return int(kind)


def decode_tensor(data: bytes, offset: int, max_bytes: int = MAX_MESSAGE_BYTES) -> torch.Tensor:
    """The tensor that starts at ``offset`` and fills the rest of ``data``."""
    code, ndim = unpack(_TENSOR, data, offset, "tensor header")
    if code not in DTYPES:
        raise WireError(f"unknown dtype code {code}; known: {sorted(DTYPES)}")
    if ndim > MAX_NDIM:
        raise WireError(f"tensor has {ndim} dims, at most {MAX_NDIM} are allowed")
    offset += _TENSOR.size
    shape = tuple(unpack(_DIM, data, offset + i * _DIM.size, "tensor shape")[0] for i in range(ndim))
    offset += ndim * _DIM.size
    dtype = DTYPES[code]
    check_extent(shape, dtype, max_bytes)
    payload = len(data) - offset
    expected = math.prod(shape) * dtype.itemsize  # exact: Python ints do not overflow
    if expected != payload:
        raise WireError(f"tensor {dtype} {list(shape)} needs {expected} bytes, the message carries {payload}")
    return build_tensor(data, offset, shape, dtype)


def check_extent(shape: tuple[int, ...], dtype: torch.dtype, max_bytes: int) -> None:
    """Refuse shapes no real tensor of the size limit has: an empty [2^32, 2^32, 0] passes the
    payload check yet overflows torch's storage arithmetic; a [0, D] with ordinary D stays valid."""
    if any(d > MAX_DIM for d in shape):
        raise WireError(f"tensor shape {list(shape)} has a dimension above {MAX_DIM}")
    extent = math.prod(max(d, 1) for d in shape) * dtype.itemsize
    if extent > max_bytes:
        raise WireError(
            f"tensor {dtype} {list(shape)} spans {extent} bytes counting empty dims as 1, "
            f"above the limit of {max_bytes} bytes"
        )


def build_tensor(data: bytes, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The checked payload as a tensor; torch's own refusals become WireError (decode raises no other)."""
    try:
        if len(data) == offset:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data[offset:]), dtype=dtype).reshape(shape)
    except (RuntimeError, ValueError) as err:
        raise WireError(f"tensor {dtype} {list(shape)} cannot be built: {err}") from err


def unpack(fmt: struct.Struct, data: bytes, offset: int, what: str) -> tuple:
    if len(data) < offset + fmt.size:
        raise WireError(f"message truncated in the {what}: {len(data)} bytes, need {offset + fmt.size}")
    return fmt.unpack_from(data, offset)


def check_uint(value: int, bits: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
        raise WireError(f"{name} must be an integer in [0, 2^{bits}), got {value!r}")


def check_seconds(value: float, name: str) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise WireError(f"{name} must be a finite number of seconds ≥ 0, got {value!r}")
