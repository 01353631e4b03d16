"""What a selection costs on a channel (pure, vectorised; SPEC §4).

For MoE layer l and device u with n_u tokens routed to it:
    S(n)  = n·round(D·b_u) + H·[n > 0]        bits of one message (D hidden, b_u bits/element of
                                             device u's wire format, row scales included; H header)
    t_u   = S(n_u)/R_u^DL + n_u·F_tok/C_u + S(n_u)/R_u^UL + τ0·[n_u > 0]
            F_tok = 2·3·D·F (one SwiGLU expert, one token), C_u the device's effective FLOP/s
    T_l   = max_{u: n_u > 0} t_u               (the BS waits for the slowest selected device)
    total = Σ_l (T_l + BS compute of layer l) + LM head
Shapes: tokens [..., L, U] (any leading axes: decode steps, trials), rates [..., L, U] or anything
that broadcasts (e.g. [U]); a prefill passes all prompt tokens of a layer at once, a decode step
one token per user per layer.
"""

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from wdmoe.channel.state import ChannelState
from wdmoe.channel.units import FloatArray
from wdmoe.formats import bits_per_element as format_bits

if TYPE_CHECKING:
    from wdmoe.config import ModelConfig, ScenarioConfig


def payload_bits(tokens: Any, hidden_size: int, bits_per_element: Any, header_bits: int) -> Any:
    """Bits of one message carrying ``tokens`` hidden states: n·round(D·b) + H, and 0 when n = 0.

    b: one value, or one per device [U] (broadcast against tokens [..., U]); a row of D elements
    is a whole number of bits (b = 8 + 32/D for int8 with a float32 row scale: D·b = 8·D + 32).
    The runtime's wire protocol sizes its messages with this same function.
    """
    n = np.asarray(tokens)
    return n * np.rint(hidden_size * np.asarray(bits_per_element)) + header_bits * (n > 0)


def expert_flops_per_token(hidden_size: int, ffn_size: int) -> float:
    """FLOPs of one SwiGLU expert on one token: 3 matmuls of D×F, 2 FLOPs per multiply-add."""
    return 2.0 * 3.0 * hidden_size * ffn_size


def transfer_s(bits: Any, rate_bps: Any) -> Any:
    """bits / rate [s]; 0 when nothing is sent, inf when bits are sent at rate 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(bits) > 0, np.divide(bits, rate_bps), 0.0)


@dataclass(frozen=True)
class ExpertCost:
    """The cost of serving tokens on a device: message sizes, FLOPs, overhead τ0. ``formats``: the
    wire format of each device [U] (:mod:`wdmoe.formats`; empty: ``wire.format = "none"``, values
    exact), whose bits per element ``bits_per_element`` then holds [U]."""

    hidden_size: int
    bits_per_element: float | FloatArray
    header_bits: int
    flops_per_token: float
    overhead_s: float | FloatArray = 0.0  # τ0; per device [U] with the software's own cost priced
    formats: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, scenario: "ScenarioConfig") -> "ExpertCost":
        """The scenario's cost; with a wire format, its bits (``adaptive`` without a channel: the
        strong links' format, :meth:`with_formats` sets one per device)."""
        m, w = scenario.model, scenario.wire
        flops = expert_flops_per_token(m.hidden_size, m.ffn_size)
        fmt = w.adaptive_formats[0] if w.format == "adaptive" else w.format
        bits = w.bits_per_element if fmt == "none" else format_bits(fmt, m.hidden_size)
        return cls(m.hidden_size, bits, w.header_bits, flops, scenario.cell.overhead_s)

    def with_formats(self, formats: tuple[str, ...]) -> "ExpertCost":
        """The same cost with device u's hidden states in ``formats[u]`` (bits per element [U])."""
        bits = np.array([format_bits(f, self.hidden_size) for f in formats], dtype=np.float64)
        bits.setflags(write=False)
        return replace(self, bits_per_element=bits, formats=tuple(formats))

    def format_of(self, device: int) -> str:
        """Device ``device``'s wire format ("none" without formats)."""
        return self.formats[device] if self.formats else "none"

    def message_bits(self, tokens: Any) -> Any:
        return payload_bits(tokens, self.hidden_size, self.bits_per_element, self.header_bits)

    def fixed_s(self, tokens: Any, flops_per_s: Any) -> Any:
        """Seconds bandwidth cannot shorten: compute n·F_tok/C_u plus τ0 for a device with work."""
        n = np.asarray(tokens)
        return n * self.flops_per_token / flops_per_s + self.overhead_s * (n > 0)


@dataclass(frozen=True)
class DeviceTimes:
    """Per-device breakdown [..., U] in seconds: downlink, compute (+ τ0) and uplink."""

    downlink_s: FloatArray
    compute_s: FloatArray
    uplink_s: FloatArray

    @property
    def total_s(self) -> FloatArray:
        return self.downlink_s + self.compute_s + self.uplink_s


def device_times(
    tokens: Any, rate_dl_bps: Any, rate_ul_bps: Any, flops_per_s: Any, cost: ExpertCost
) -> DeviceTimes:
    """t_u split into its parts for tokens [..., U] and rates/compute broadcastable to it."""
    bits = cost.message_bits(tokens)
    return DeviceTimes(
        downlink_s=transfer_s(bits, rate_dl_bps),
        compute_s=np.asarray(cost.fixed_s(tokens, flops_per_s), dtype=np.float64),
        uplink_s=transfer_s(bits, rate_ul_bps),
    )


def waiting_s(total_s: Any, tokens: Any) -> FloatArray:
    """Attention-waiting latency T = max over devices with work (last axis); 0 if none has work."""
    return np.asarray(np.max(np.where(np.asarray(tokens) > 0, total_s, 0.0), axis=-1, initial=0.0))


@dataclass(frozen=True)
class Latency:
    """A forward pass: device breakdown [..., L, U], waiting [..., L], BS compute [..., L]."""

    devices: DeviceTimes
    waiting_s: FloatArray
    bs_s: FloatArray
    head_s: float

    @property
    def total_s(self) -> FloatArray:
        """End-to-end latency [...] = Σ_l (T_l + BS_l) + LM head."""
        return np.asarray((self.waiting_s + self.bs_s).sum(axis=-1) + self.head_s)


def forward_latency(
    tokens: Any,
    rate_dl_bps: Any,
    rate_ul_bps: Any,
    flops_per_s: Any,
    cost: ExpertCost,
    bs_s: Any = 0.0,
    head_s: float = 0.0,
) -> Latency:
    """Latency of forward passes: tokens [..., L, U] routed per layer and device; ``bs_s`` the BS
    compute of each layer (broadcast to [..., L]); ``head_s`` the LM head."""
    times = device_times(tokens, rate_dl_bps, rate_ul_bps, flops_per_s, cost)
    wait = waiting_s(times.total_s, tokens)
    return Latency(times, wait, np.broadcast_to(np.asarray(bs_s, dtype=np.float64), wait.shape), head_s)


# --- the BS side ------------------------------------------------------------------------------


def bs_layer_flops(model: "ModelConfig", new_tokens: int, context_tokens: int) -> float:
    """FLOPs of one layer at the BS for ``new_tokens`` tokens after ``context_tokens`` cached ones.

    Projections 2·(2·D² + 2·D·D_kv) per token (Q, O and K, V with grouped-query heads); scores and
    weighted values 4·D per attended position, token i attending to context + i + 1; the router
    2·D·E per token. Norms and residuals are negligible.
    """
    d, t = model.hidden_size, new_tokens
    projections = t * 2.0 * (2 * d * d + 2 * d * model.kv_size)
    attention = 4.0 * d * (t * context_tokens + t * (t + 1) / 2)
    return projections + attention + t * 2.0 * d * model.num_experts


def lm_head_flops(model: "ModelConfig") -> float:
    """FLOPs of the LM head for one output token: 2·D·V."""
    return 2.0 * model.hidden_size * model.vocab_size


def bs_seconds(
    model: "ModelConfig", new_tokens: int, context_tokens: int, bs_flops_per_s: float
) -> FloatArray:
    """BS compute per layer [L] in seconds (prefill: new_tokens = prompt; decode: 1)."""
    per_layer_s = bs_layer_flops(model, new_tokens, context_tokens) / bs_flops_per_s
    return np.full(model.num_layers, per_layer_s)


# --- one layer on a channel snapshot (what allocators optimise) --------------------------------


@dataclass(frozen=True)
class LayerDemand:
    """What one MoE layer asks of each device [U]: tokens, bits per direction, fixed seconds."""

    tokens: FloatArray
    downlink_bits: FloatArray
    uplink_bits: FloatArray
    fixed_s: FloatArray

    @property
    def active(self) -> Any:
        return self.tokens > 0


def layer_demand(tokens: Any, flops_per_s: Any, cost: ExpertCost) -> LayerDemand:
    """The demand of tokens [U] on devices with compute C_u [U]."""
    n = np.asarray(tokens, dtype=np.float64)
    bits = np.asarray(cost.message_bits(n), dtype=np.float64)
    return LayerDemand(n, bits, bits, np.asarray(cost.fixed_s(n, flops_per_s), dtype=np.float64))


def device_time_s(demand: LayerDemand, channel: ChannelState, bandwidth_hz: Any) -> FloatArray:
    """t_u(B_u) [U] on a channel snapshot: transfers at the rates B_u gives, plus fixed seconds."""
    return DeviceTimes(
        downlink_s=transfer_s(demand.downlink_bits, channel.dl.rate_bps(bandwidth_hz)),
        compute_s=demand.fixed_s,
        uplink_s=transfer_s(demand.uplink_bits, channel.ul.rate_bps(bandwidth_hz)),
    ).total_s
