"""The BS's running estimates of its own cost per forward (bookkeeping; the sample is
:func:`wdmoe.latency.overhead.bs_own_sample_s`, the update
:func:`~wdmoe.latency.overhead.running_estimate_s`).

Kept by the kind of forward: a decode step of R rows (one token each; the nearest R seen stands in
for an R not seen yet) and a prefill, per prompt token. What a forward is predicted to cost the BS
beyond the model is read *before* its own sample is noted: a prediction from earlier forwards.
"""

from dataclasses import dataclass, field

from wdmoe.latency.overhead import running_estimate_s


@dataclass
class OwnCost:
    """Estimates (s of the cell): per decode batch size R, and per prefill token."""

    decode_s: dict[int, float] = field(default_factory=dict)
    prefill_token_s: float | None = None

    def estimate_s(self, rows: int, new_tokens: int, decode: bool) -> float:
        """What a forward of ``rows`` rows and ``new_tokens`` tokens each costs the BS beyond the
        model (0 before anything was measured)."""
        if not decode:
            return (self.prefill_token_s or 0.0) * new_tokens * rows
        if rows in self.decode_s:
            return self.decode_s[rows]
        if not self.decode_s:
            return 0.0
        nearest = min(self.decode_s, key=lambda r: abs(r - rows))
        return self.decode_s[nearest]

    def note(self, rows: int, new_tokens: int, decode: bool, sample_s: float) -> None:
        """One forward's measured own cost."""
        if decode:
            self.decode_s[rows] = running_estimate_s(self.decode_s.get(rows), sample_s)
        else:
            per_token = sample_s / max(new_tokens * rows, 1)
            self.prefill_token_s = running_estimate_s(self.prefill_token_s, per_token)
