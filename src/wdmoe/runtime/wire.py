"""The wire format between the BS and the devices: versioned frames, tensors as raw bytes.

Pure: bytes in, values out; no sockets, no pickle. All integers and floats are little-endian.

    frame    = prefix body
    prefix   = magic "WDMO" (4 B) | version u16 | kind u8 | flags u8                  8 B
    request  = layer u32 | expert u32 | request_id u64 | deadline_s f64 | tensor     (kind 1)
    response = request_id u64 | compute_s f64 | tensor                              (kind 2)
    tensor   = dtype code u8 | ndim u8 | ndim × dim u64 | payload
    bundle   = count u16 | count × (length u64 | frame)                             (kind 3)

The payload is the rest of the frame and must be exactly prod(shape) × itemsize bytes; the shape's
extent prod(max(d, 1)) × itemsize must also fit the size limit, so that an empty tensor cannot claim
dims no real tensor has (torch would overflow computing its storage). Codes 9 (int8) and 10
(float8_e4m3fn) carry a hidden state in a scaled wire format (:mod:`wdmoe.formats`): ndim ≥ 1 and
the payload is the values, prod(shape) bytes, then one float32 scale per row, prod(shape[:-1]) × 4
bytes (each ≥ 0, or NaN for a row that held NaN/inf); its extent counts 4 bytes per element (what
it decodes to). flags is 0, except in a request, where it may name the wire code of the format the
answer must travel in (:data:`FORMAT_CODES`; 0: the request's own), so version-1 frames of
before formats stay valid and an older peer refuses a format it does not know. A bundle
carries several request (or several response) frames in one message: one device's experts of a
layer travel together, one message per device and layer as the latency model counts them.
Decoding checks every field and raises :class:`WireError` (never anything else) on a bad frame.
"""

import math
import struct
from dataclasses import dataclass

import torch

from wdmoe import formats
from wdmoe.errors import WdmoeError
from wdmoe.formats import STORAGE

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
# Codes of tensors in a scaled wire format: values of this dtype, then float32 row scales.
SCALED_CODES: dict[int, torch.dtype] = {9: torch.int8, 10: torch.float8_e4m3fn}
_SCALED = {"int8": 9, "fp8": 10}
# Wire code of each format of :mod:`wdmoe.formats` (what a request's flags name for the answer).
FORMAT_CODES: dict[str, int] = {"float32": 1, "float16": 2, "bfloat16": 3, **_SCALED}
_FORMATS = {code: name for name, code in FORMAT_CODES.items()}


class WireError(WdmoeError, ValueError):
    """A frame is malformed, too large, of another version, or a value cannot be encoded."""


@dataclass(frozen=True)
class ExpertRequest:
    """Run expert ``expert`` of MoE layer ``layer`` on hidden [n, D].

    deadline_s: the time budget in seconds the BS grants from sending (relative, so that the BS
    and device clocks need not agree). scales: the row scales [n] (float32) when ``hidden`` holds
    a scaled format's values (int8 / float8_e4m3fn). answer: the format the device answers in
    (a name of :data:`FORMAT_CODES`; "": the request's own).
    """

    layer: int
    expert: int
    hidden: torch.Tensor
    request_id: int = 0
    deadline_s: float = 0.0
    scales: torch.Tensor | None = None
    answer: str = ""


@dataclass(frozen=True)
class ExpertResponse:
    """The expert's outputs [n, D] (and their row scales [n] in a scaled format) and the device's
    measured compute time in seconds."""

    request_id: int
    outputs: torch.Tensor
    compute_s: float
    scales: torch.Tensor | None = None


Message = ExpertRequest | ExpertResponse


def encoded_size(shape: tuple[int, ...], dtype: torch.dtype | str, kind: int = KIND_REQUEST) -> int:
    """Bytes of a frame carrying a tensor of ``shape`` as ``dtype`` or in the wire format of that
    name (a scaled one adds 4 bytes per row): what the link transports."""
    body = _REQUEST.size if kind == KIND_REQUEST else _RESPONSE.size
    head = _PREFIX.size + body + _TENSOR.size + _DIM.size * len(shape)
    if isinstance(dtype, torch.dtype):
        return head + math.prod(shape) * dtype.itemsize
    if dtype not in FORMAT_CODES:
        raise WireError(f"wire format {dtype!r} is unknown; known: {sorted(FORMAT_CODES)}")
    rows = math.prod(shape[:-1]) * 4 if dtype in _SCALED else 0
    return head + math.prod(shape) * STORAGE[dtype].itemsize + rows


def encode(msg: Message) -> bytes:
    """Serialise a request or response; raises WireError for values the format cannot carry."""
    if isinstance(msg, ExpertRequest):
        check_uint(msg.layer, 32, "layer")
        check_uint(msg.expert, 32, "expert")
        check_uint(msg.request_id, 64, "request_id")
        check_seconds(msg.deadline_s, "deadline_s")
        if msg.answer and msg.answer not in FORMAT_CODES:
            raise WireError(f"answer format {msg.answer!r} is unknown; known: {sorted(FORMAT_CODES)}")
        head = _PREFIX.pack(MAGIC, WIRE_VERSION, KIND_REQUEST, FORMAT_CODES.get(msg.answer, 0))
        body = _REQUEST.pack(msg.layer, msg.expert, msg.request_id, msg.deadline_s)
        return head + body + encode_tensor(msg.hidden, msg.scales)
    check_uint(msg.request_id, 64, "request_id")
    check_seconds(msg.compute_s, "compute_s")
    head = _PREFIX.pack(MAGIC, WIRE_VERSION, KIND_RESPONSE, 0)
    return head + _RESPONSE.pack(msg.request_id, msg.compute_s) + encode_tensor(msg.outputs, msg.scales)


def encode_tensor(t: torch.Tensor, scales: torch.Tensor | None = None) -> bytes:
    """dtype code, ndim, dims, then the tensor's bytes in C order (and its row scales after them)."""
    if t.dim() > MAX_NDIM:
        raise WireError(f"tensor has {t.dim()} dims, at most {MAX_NDIM} can travel")
    codes = _CODES if scales is None else {d: c for c, d in SCALED_CODES.items()}
    if t.dtype not in codes:
        kind = "without" if scales is None else "with"
        raise WireError(
            f"dtype {t.dtype} cannot travel {kind} row scales; supported: {sorted(map(str, codes))}"
        )
    head = _TENSOR.pack(codes[t.dtype], t.dim()) + b"".join(_DIM.pack(d) for d in t.shape)
    if scales is not None:
        rows = tuple(t.shape[:-1])
        if t.dim() < 1 or scales.dtype != torch.float32 or tuple(scales.shape) != rows:
            raise WireError(
                f"row scales of {t.dtype} {list(t.shape)} must be float32 {list(rows)}, got "
                f"{scales.dtype} {list(scales.shape)}"
            )
        return head + raw_bytes(t) + raw_bytes(scales)
    return head + raw_bytes(t)


def in_format(t: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A message's tensor and row scales for hidden states ``t`` [n, D] in wire format ``fmt``
    (:mod:`wdmoe.formats`; "": ``t`` as it is)."""
    if not fmt:
        return t, None
    enc = formats.encode(t, fmt)
    return enc.values, enc.scales


def value_of(t: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """The hidden states a message's tensor (and row scales) carry: float32 when scaled."""
    return t if scales is None else formats.decode(formats.Encoded("", t, scales))


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def answer_format(req: ExpertRequest) -> str:
    """The format the answer to ``req`` travels in: the one it asks for, else its own (a name of
    :data:`FORMAT_CODES`, or "" for a raw dtype no format names, e.g. float64)."""
    if req.answer:
        return req.answer
    codes = _CODES if req.scales is None else {d: c for c, d in SCALED_CODES.items()}
    return _FORMATS.get(codes.get(req.hidden.dtype, 0), "")


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse one frame; every malformed, oversized or wrong-version frame raises WireError."""
    kind = check_prefix(data, max_bytes)
    if kind == KIND_REQUEST:
        layer, expert, request_id, deadline_s = unpack(_REQUEST, data, _PREFIX.size, "request header")
        check_seconds(deadline_s, "deadline_s")
        hidden, scales = decode_tensor(data, _PREFIX.size + _REQUEST.size, max_bytes)
        answer = _FORMATS.get(data[_PREFIX.size - 1], "")
        return ExpertRequest(layer, expert, hidden, request_id, deadline_s, scales, answer)
    if kind == KIND_RESPONSE:
        request_id, compute_s = unpack(_RESPONSE, data, _PREFIX.size, "response header")
        check_seconds(compute_s, "compute_s")
        outputs, scales = decode_tensor(data, _PREFIX.size + _RESPONSE.size, max_bytes)
        return ExpertResponse(request_id, outputs, compute_s, scales)
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
    if flags != 0 and not (kind == KIND_REQUEST and flags in _FORMATS):
        raise WireError(
            f"unknown flags {flags:#x} in a message of kind {kind}; version {WIRE_VERSION} defines "
            f"only a request's answer format, one of {sorted(_FORMATS)}"
        )
    return int(kind)


def decode_tensor(
    data: bytes, offset: int, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensor that starts at ``offset`` and fills the rest of ``data``, and its row scales
    (None unless its code is a scaled format's)."""
    code, ndim = unpack(_TENSOR, data, offset, "tensor header")
    if code not in DTYPES and code not in SCALED_CODES:
        raise WireError(f"unknown dtype code {code}; known: {sorted(DTYPES) + sorted(SCALED_CODES)}")
    if ndim > MAX_NDIM:
        raise WireError(f"tensor has {ndim} dims, at most {MAX_NDIM} are allowed")
    offset += _TENSOR.size
    shape = tuple(unpack(_DIM, data, offset + i * _DIM.size, "tensor shape")[0] for i in range(ndim))
    offset += ndim * _DIM.size
    scaled = code in SCALED_CODES
    if scaled and ndim < 1:
        raise WireError(f"a tensor with row scales (code {code}) needs at least one dim, got {ndim}")
    dtype = SCALED_CODES[code] if scaled else DTYPES[code]
    check_extent(shape, torch.float32 if scaled else dtype, max_bytes)
    payload = len(data) - offset
    values_bytes = math.prod(shape) * dtype.itemsize  # exact: Python ints do not overflow
    expected = values_bytes + (4 * math.prod(shape[:-1]) if scaled else 0)
    if expected != payload:
        raise WireError(f"tensor {dtype} {list(shape)} needs {expected} bytes, the message carries {payload}")
    if not scaled:
        return build_tensor(data, offset, shape, dtype), None
    values = build_tensor(data[: offset + values_bytes], offset, shape, dtype)
    scales = build_tensor(data, offset + values_bytes, shape[:-1], torch.float32)
    if bool((scales < 0).any() | torch.isinf(scales).any()):
        raise WireError("row scales must be finite and ≥ 0 (NaN: a row that held NaN/inf)")
    return values, scales


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
