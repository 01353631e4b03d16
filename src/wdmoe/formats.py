"""Wire formats of hidden states: how many bits a token's row costs and what it loses (pure).

A hidden-state tensor x [..., D] (rows: tokens; D: hidden size) travels in one of five formats:

    format     storage             bits of one row            error per element (round to nearest)
    float32    float32             32·D                       0 (exact for float32 inputs)
    bfloat16   bfloat16            16·D                       ≤ 2^-8·|x|
    float16    float16             16·D                       ≤ 2^-11·|x| + 2^-25; |x| > 65504 → ±inf
    int8       int8 + s [..] f32   8·D + 32                   ≤ s/2,  s = max_row|x| / 127
    fp8        e4m3fn + s [..] f32 8·D + 32                   ≤ 2^-4·|x| + 2^-10·s,  s = max_row|x| / 448

int8 is symmetric absmax quantization per row (per token): q = round(x/s) ∈ [−127, 127], x̂ = q·s.
fp8 stores x/s as ``torch.float8_e4m3fn`` (3 mantissa bits, largest finite value 448, no inf):
the per-row scale s = max_row|x| / 448 maps each row onto e4m3's range, so nothing saturates,
and x̂ = fp8(x/s)·s has e4m3's relative error 2^-4 (subnormals, |x/s| < 2^-6: absolute 2^-10·s).
Both store the scale as one float32 per row; an all-zero row has s = 0 and decodes to zeros.
Non-finite inputs: float formats carry NaN/±inf as they are (float16 also turns |x| > 65504 into
±inf); int8 and fp8 cannot hold them, so a row holding any NaN/inf travels as zeros with s = NaN
and decodes to a row of NaN (the BS's check of an answer's values then refuses it, as for a
float answer holding NaN). Bounds hold up to float32 rounding of x/s and q·s (relative 2^-23).

:func:`choose_formats` is the adaptive rule: a device's format by its link quality on the BS's
estimate. Shapes: U devices; x [..., D].
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from wdmoe.errors import WdmoeError

if TYPE_CHECKING:  # not at run time: a device worker imports this module without the channel (scipy)
    from wdmoe.channel.state import ChannelState

FORMATS = ("float32", "bfloat16", "float16", "int8", "fp8")
STORAGE: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "fp8": torch.float8_e4m3fn,
}
SCALED = ("int8", "fp8")  # formats with one float32 scale per row
SCALE_BITS = 32
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
UNIT_ROUNDOFF = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11, "fp8": 2.0**-4}


class FormatError(WdmoeError, ValueError):
    """A format name that does not exist, or a tensor a format cannot carry."""


@dataclass(frozen=True)
class Encoded:
    """A tensor in a wire format: ``values`` [..., D] in the format's storage dtype, ``scales``
    [...] float32 (one per row; None for float formats)."""

    format: str
    values: torch.Tensor
    scales: torch.Tensor | None = None


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    if fmt not in allowed:
        raise FormatError(f"wire format {fmt!r} is unknown; allowed: {', '.join(allowed)}")
    return fmt


def row_bits(fmt: str, hidden_size: int) -> int:
    """Bits of one token's row of D = ``hidden_size`` elements: D·b (+ 32 for a row scale)."""
    scale = SCALE_BITS if check_format(fmt) in SCALED else 0
    return hidden_size * 8 * STORAGE[fmt].itemsize + scale


def bits_per_element(fmt: str, hidden_size: int) -> float:
    """b = row bits / D: the element's own bits plus its share of the row scale (int8: 8 + 32/D)."""
    return row_bits(fmt, hidden_size) / hidden_size


def encode(x: torch.Tensor, fmt: str) -> Encoded:
    """x [..., D] (floating, at least one dim) in format ``fmt`` (see the module doc)."""
    check_format(fmt)
    if not x.is_floating_point() or x.dim() < 1:
        raise FormatError(f"a wire format carries a floating tensor [..., D], got {x.dtype} {list(x.shape)}")
    if fmt not in SCALED:
        return Encoded(fmt, x.detach().to(STORAGE[fmt]))
    xf = x.detach().to(torch.float32)
    finite = torch.isfinite(xf).all(dim=-1)
    xf = torch.where(finite[..., None], xf, 0.0)
    absmax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    scales = absmax / (INT8_MAX if fmt == "int8" else FP8_MAX)
    safe = torch.where(scales > 0, scales, 1.0)[..., None]
    if fmt == "int8":
        values = torch.round(xf / safe).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        values = (xf / safe).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Encoded(fmt, values, torch.where(finite, scales, torch.nan))


def decode(enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x̂ [..., D] in ``dtype``: the values cast back, times their row scales when scaled."""
    if enc.scales is None:
        return enc.values.to(dtype)
    return (enc.values.to(torch.float32) * enc.scales[..., None]).to(dtype)


def round_trip(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x as the far end of a link in ``fmt`` sees it, in x's own dtype (x itself for float32 x
    in float32: bit-identical)."""
    if fmt == "float32" and x.dtype == torch.float32:
        return x
    return decode(encode(x, fmt), x.dtype)


def error_bound(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The largest |x̂ − x| per element [..., D] the format allows for finite x (module doc),
    before float32 rounding of the scale arithmetic."""
    check_format(fmt)
    xa = x.detach().to(torch.float32).abs()
    absmax = xa.amax(dim=-1, keepdim=True) if xa.shape[-1] else xa
    if fmt == "int8":
        return (absmax / INT8_MAX / 2).expand_as(xa)
    if fmt == "fp8":
        return UNIT_ROUNDOFF["fp8"] * xa + 2.0**-10 * absmax / FP8_MAX
    tiny = 2.0**-25 if fmt == "float16" else 0.0  # float16 subnormals; bfloat16 has float32's range
    return UNIT_ROUNDOFF[fmt] * xa + tiny


# --- the adaptive rule ------------------------------------------------------------------------


def link_snr_db(channel: "ChannelState") -> NDArray[np.float64]:
    """A device's link quality [U] in dB: the weaker of its downlink and uplink SNR at the equal
    share B/U of the band, on ``channel`` (the BS's estimate): min(SNR_DL, SNR_UL)."""
    share_hz = channel.equal_share_hz()
    snr = np.minimum(channel.dl.snr(share_hz), channel.ul.snr(share_hz))
    with np.errstate(divide="ignore"):
        return np.asarray(10.0 * np.log10(snr), dtype=np.float64)


def check_rule(formats: tuple[str, ...], thresholds_db: tuple[float, ...]) -> None:
    """FormatError unless ``formats`` (strong link → weak) are known and ``thresholds_db`` are
    len(formats) − 1 finite values in strictly decreasing order."""
    if not formats:
        raise FormatError("the adaptive rule needs at least one format; allowed: " + ", ".join(FORMATS))
    for fmt in formats:
        check_format(fmt)
    if len(thresholds_db) != len(formats) - 1:
        raise FormatError(
            f"the adaptive rule has {len(formats)} formats {list(formats)} and {len(thresholds_db)} "
            f"SNR thresholds {list(thresholds_db)}; allowed: exactly {len(formats) - 1} thresholds"
        )
    steps = np.diff(np.asarray(thresholds_db, dtype=np.float64))
    if not np.all(np.isfinite(thresholds_db)) or np.any(steps >= 0):
        raise FormatError(f"SNR thresholds {list(thresholds_db)} dB must be finite and strictly decreasing")


def choose_formats(
    snr_db: Any, formats: tuple[str, ...], thresholds_db: tuple[float, ...]
) -> tuple[str, ...]:
    """The adaptive rule, one format per device [U]: device u gets formats[i] with i the number
    of thresholds its SNR is not above, i = #{j: ¬(SNR_u ≥ θ_j)}: SNR ≥ θ_0 → formats[0] (the
    strong links' format), θ_1 ≤ SNR < θ_0 → formats[1], …; NaN → the last (weakest link's)."""
    check_rule(formats, thresholds_db)
    snr = np.asarray(snr_db, dtype=np.float64).reshape(-1, 1)
    tiers = (~(snr >= np.asarray(thresholds_db, dtype=np.float64)[None, :])).sum(axis=1)
    return tuple(formats[int(i)] for i in tiers)
