"""Latency under load (pure, no I/O): request arrivals at a rate λ, one record per request, and
the percentiles, throughput and drop rate of a run.

Both faces write the same :class:`LoadRecord`: the simulator (``face="sim"``) and a load generator
against a running BS (``face="runtime"``). Times are seconds from the run's start (simulated
seconds for the simulator, wall seconds for the runtime).

    TTFT  time to first token = first token's time − arrival_s
    TPOT  time per output token after the first = (finished_s − arrival_s − TTFT) / (new_tokens − 1)
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wdmoe.errors import ConfigError

FACES = ("sim", "runtime")
STATUSES = ("ok", "refused", "failed")
PERCENTILES = (50, 95, 99)
# Request i asks DEFAULT_PROMPTS[i mod 8] unless the user gives prompts (short: load, not answers).
DEFAULT_PROMPTS = (
    "What is a router?",
    "Why is the sky blue?",
    "Name three primary colours.",
    "What does a base station do?",
    "How many days are in a leap year?",
    "What is the capital of France?",
    "Explain what an expert is in a mixture of experts.",
    "Write one sentence about the sea.",
)


def poisson_arrivals(rate_per_s: float, n: int, seed: int) -> np.ndarray:
    """``n`` arrival times [n] (s) of a Poisson process of rate λ = ``rate_per_s`` requests/s:
    the first at 0, then cumulative exponential gaps of mean 1/λ drawn from
    ``np.random.default_rng(seed)``. One seed draws the same unit gaps at every λ (the times
    scale as 1/λ), so the rates of a sweep differ in λ only."""
    if not (np.isfinite(rate_per_s) and rate_per_s > 0):
        raise ConfigError(f"arrival rate must be a positive number of requests per second, got {rate_per_s}")
    if n < 1:
        raise ConfigError(f"requests per rate must be ≥ 1, got {n}")
    gaps_s = np.random.default_rng(seed).exponential(1.0 / rate_per_s, size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps_s)])


def trace_arrivals(times: Iterable[float | str]) -> np.ndarray:
    """A replayed trace's arrival times [n] (s), sorted; each must be a finite number ≥ 0 (a bad
    entry raises ConfigError naming its position, counted from 1, and its value)."""
    values: list[float] = []
    for i, t in enumerate(times, 1):
        try:
            value = float(t)
        except (TypeError, ValueError):
            raise ConfigError(f"arrival {i} of the trace is not a number: {t!r}") from None
        if not np.isfinite(value) or value < 0:
            raise ConfigError(f"arrival {i} of the trace must be a finite time ≥ 0 s, got {t!r}")
        values.append(value)
    if not values:
        raise ConfigError("the arrival trace is empty: give one arrival time (s) per line")
    return np.sort(np.asarray(values, dtype=float))


@dataclass(frozen=True)
class LoadRecord:
    """One request of a load run. ``rate_per_s``: λ of its run (None: a replayed trace);
    ``request``: its index in the run's arrivals; ``arrival_s`` / ``finished_s``: seconds from the
    run's start (finished_s None: it never finished); ``ttft_s``: from arrival to its first token
    (None: no token came); ``status``: ok, refused (the BS turned it away: full) or failed
    (``error`` says why); ``dropped_experts``: expert calls dropped while serving it (-1: unknown);
    ``predicted_token_s``: the latency model's mean decode step for it (None: unknown);
    ``config``: what produced it (face options, seed, …), for the report."""

    face: str
    rate_per_s: float | None
    request: int
    arrival_s: float
    ttft_s: float | None
    finished_s: float | None
    new_tokens: int
    status: str
    error: str = ""
    dropped_experts: int = -1
    predicted_token_s: float | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.face not in FACES:
            raise ConfigError(f"load record face must be one of {FACES}, got {self.face!r}")
        if self.status not in STATUSES:
            raise ConfigError(f"load record status must be one of {STATUSES}, got {self.status!r}")

    @property
    def series(self) -> tuple[str, str]:
        """(face, configuration): the runs of one setting at several λ (:func:`config_key`)."""
        return (self.face, config_key(self.config))

    @property
    def key(self) -> tuple[str, str, float | None, int]:
        """(face, configuration, λ, request): what a resumed run of the same setting skips."""
        return (*self.series, self.rate_per_s, self.request)

    @property
    def tpot_s(self) -> float | None:
        """Seconds per output token after the first (None: fewer than 2 tokens, or unfinished)."""
        if self.ttft_s is None or self.finished_s is None or self.new_tokens < 2:
            return None
        return (self.finished_s - self.arrival_s - self.ttft_s) / (self.new_tokens - 1)


def config_key(config: Mapping[str, Any]) -> str:
    """A configuration as one comparable string (sorted JSON): records of different settings
    never mix in a run, a resume or a summary."""
    return json.dumps(dict(config), sort_keys=True, default=str)


def _stats(values: Sequence[float], name: str) -> dict[str, float]:
    """{name_p50, name_p95, name_p99, name_mean} (s) by numpy's linear percentiles; nan when empty."""
    arr = np.asarray(values, dtype=float)
    out = {f"{name}_p{p}": float(np.percentile(arr, p)) if arr.size else float("nan") for p in PERCENTILES}
    out[f"{name}_mean"] = float(arr.mean()) if arr.size else float("nan")
    return out


def offered_rps(records: Sequence[LoadRecord]) -> float:
    """λ of the run if it has one, else the trace's rate: (n − 1) / (last − first arrival); nan
    for a single arrival or a trace whose arrivals all coincide."""
    if records[0].rate_per_s is not None:
        return float(records[0].rate_per_s)
    arrivals = [r.arrival_s for r in records]
    span_s = max(arrivals) - min(arrivals)
    return (len(records) - 1) / span_s if span_s > 0 else float("nan")


def summarize(records: Sequence[LoadRecord]) -> dict[str, Any]:
    """The figures of one run (one face and λ): n requests, completed (ok) / refused / failed
    counts, drop_rate = (refused + failed) / n, dropped_experts_mean (expert calls dropped per
    completed request where known, else nan), TTFT and TPOT p50/p95/p99 and mean (s) over the
    completed requests (nan when none), throughput over the span from the first arrival to the last
    finish: tokens_per_s (output tokens of completed requests) and requests_per_s (completed), and
    offered_rps (:func:`offered_rps`)."""
    if not records:
        raise ConfigError("no load records to summarize")
    ok = [r for r in records if r.status == "ok"]
    finishes = [r.finished_s for r in ok if r.finished_s is not None]
    span_s = max(finishes) - min(r.arrival_s for r in records) if finishes else 0.0
    known_drops = [r.dropped_experts for r in ok if r.dropped_experts >= 0]
    n = len(records)
    refused = sum(r.status == "refused" for r in records)
    failed = sum(r.status == "failed" for r in records)
    tokens = sum(r.new_tokens for r in ok)
    return {
        "face": records[0].face,
        "rate_per_s": records[0].rate_per_s,
        "offered_rps": offered_rps(records),
        "n": n,
        "completed": len(ok),
        "refused": refused,
        "failed": failed,
        "drop_rate": (refused + failed) / n,
        "dropped_experts_mean": float(np.mean(known_drops)) if known_drops else float("nan"),
        **_stats([r.ttft_s for r in ok if r.ttft_s is not None], "ttft"),
        **_stats([t for r in ok if (t := r.tpot_s) is not None], "tpot"),
        "span_s": span_s,
        "tokens_per_s": tokens / span_s if span_s > 0 else float("nan"),
        "requests_per_s": len(ok) / span_s if span_s > 0 else float("nan"),
    }


RunKey = tuple[str, str, float | None]  # (face, configuration, λ)


def group_runs(records: Iterable[LoadRecord]) -> dict[RunKey, list[LoadRecord]]:
    """Records by (face, configuration, λ): faces in FACES order, then configurations, then rates
    ascending (a trace, λ None, last)."""
    groups: dict[RunKey, list[LoadRecord]] = {}
    for r in records:
        groups.setdefault((*r.series, r.rate_per_s), []).append(r)
    order = sorted(groups, key=lambda k: (FACES.index(k[0]), k[1], k[2] is None, k[2] or 0.0))
    return {k: sorted(groups[k], key=lambda r: r.request) for k in order}


def summarize_runs(records: Iterable[LoadRecord]) -> list[dict[str, Any]]:
    """:func:`summarize` of every (face, configuration, λ) run, in :func:`group_runs` order."""
    return [summarize(rs) for rs in group_runs(records).values()]
