"""Prometheus metrics of one BS (``prometheus-client``, a registry of its own per BS).

Two sources, so that scraping costs the forwards nothing:

- at scrape time, a collector reads the BS's books (the numbers the ``Stats`` RPC serves):
  per-device calls, answers, failures by gRPC/data-plane code, experts not sent, fallbacks,
  bytes per direction, compute and latency seconds predicted and measured, whether the slot is usable;
- from the events (:meth:`BSMetrics.observe`, subscribed to :class:`~wdmoe.runtime.books.Books`):
  requests, tokens, TTFT / TPOT histograms, each forward's measured and predicted seconds, the
  experts left out by the policy, and each link's outage and SNR at the last forward.

Names follow the Prometheus conventions: ``wdmoe_`` prefix, ``_total`` counters, base units
(``_seconds`` of the cell, ``_bytes``); ``slot`` labels a device slot, ``code`` a failure.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wdmoe.runtime.bs import BaseStation

# seconds of the cell: a token on a fast LAN (ms) up to a narrow, faded band (tens of s)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DEVICE_COUNTERS = {  # DeviceStats field → (metric name without wdmoe_device_, help)
    "calls": ("calls", "Expert calls sent to the device slot."),
    "answered": ("answered", "Expert calls the device answered in time."),
    "skipped": ("skipped", "Experts not sent: the slot was down, benched or in outage, no replica."),
    "fallbacks": ("fallbacks", "Experts of the slot run at the BS instead (fallback mode)."),
    "probes": ("probes", "Probes of the benched slot."),
    "compute_s": ("compute_seconds", "Compute seconds the device reported (wall)."),
    "measured_s": ("measured_seconds", "Measured layer seconds of the cell where the slot had work."),
    "predicted_s": ("predicted_seconds", "Predicted DL + compute + UL seconds of the cell."),
}


class BooksCollector(Collector):
    """Reads the BS's books at scrape time (see the module doc)."""

    def __init__(self, bs: "BaseStation") -> None:
        self.bs = bs

    def collect(self) -> Iterator[Any]:
        rows = self.bs.summary()["devices"]
        for field, (name, doc) in DEVICE_COUNTERS.items():
            family = CounterMetricFamily(f"wdmoe_device_{name}", doc, labels=["slot"])
            for r in rows:
                family.add_metric([str(r["slot"])], float(r[field]))
            yield family
        failures = CounterMetricFamily(
            "wdmoe_device_failures", "Expert calls that failed, by code.", labels=["slot", "code"]
        )
        sent = CounterMetricFamily(
            "wdmoe_device_bytes", "Bytes of expert calls, by direction.", labels=["slot", "direction"]
        )
        usable = GaugeMetricFamily("wdmoe_device_usable", "1 if the slot takes calls now.", labels=["slot"])
        for r in rows:
            slot = str(r["slot"])
            for code, n in sorted(r["failures"].items()):
                failures.add_metric([slot, code], float(n))
            sent.add_metric([slot, "downlink"], float(r["bytes_dl"]))
            sent.add_metric([slot, "uplink"], float(r["bytes_ul"]))
            usable.add_metric([slot], 1.0 if r["usable"] else 0.0)
        yield from (failures, sent, usable)
        with self.bs.books.lock:
            dropped, fallbacks = self.bs.books.dropped, self.bs.books.fallbacks
        yield CounterMetricFamily(
            "wdmoe_experts_dropped", "Experts the model went without (no answer in time).", value=dropped
        )
        yield CounterMetricFamily("wdmoe_experts_fallback", "Experts run at the BS instead.", value=fallbacks)


class BSMetrics:
    """The BS's metrics (see the module doc); ``exposition()`` is what /metrics serves."""

    def __init__(self, bs: "BaseStation") -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        r.register(BooksCollector(bs))
        self.requests = Counter("wdmoe_requests", "Generate requests answered.", registry=r)
        self.tokens = Counter("wdmoe_generated_tokens", "Tokens generated for users.", registry=r)
        self.prompt = Counter("wdmoe_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        b = LATENCY_BUCKETS_S
        self.ttft = Histogram("wdmoe_ttft_seconds", "Time to first token (wall).", buckets=b, registry=r)
        self.tpot = Histogram(
            "wdmoe_tpot_seconds", "Mean time per output token of a request (cell).", buckets=b, registry=r
        )
        self.tpot_predicted = Histogram(
            "wdmoe_tpot_predicted_seconds",
            "The latency model's TPOT of a request (cell).",
            buckets=b,
            registry=r,
        )
        self.forward = Histogram(
            "wdmoe_forward_seconds",
            "Forward latency (cell), measured and predicted.",
            ["source"],
            buckets=b,
            registry=r,
        )
        self.left_out = Counter(
            "wdmoe_policy_left_out", "Router candidates (token, expert) the policy did not run.", registry=r
        )
        self.outage = Gauge("wdmoe_link_outage", "1 if the slot's link was in outage.", ["slot"], registry=r)
        self.outages = Counter(
            "wdmoe_link_outage_steps", "Forwards the slot's link was in outage.", ["slot"], registry=r
        )
        self.snr = Gauge(
            "wdmoe_link_snr_db", "True DL SNR at an equal band share (dB).", ["slot"], registry=r
        )
        self.steps = Counter("wdmoe_forwards", "Forwards (steps) the BS ran.", registry=r)

    def observe(self, kind: str, values: dict[str, Any]) -> None:
        """A Books subscriber: the histograms and counters fed by events (cheap, any thread)."""
        if kind == "request":
            self.requests.inc()
            self.tokens.inc(values.get("new_tokens", 0))
            self.prompt.inc(values.get("prompt_tokens", 0))
            if values.get("ttft_s") is not None:
                self.ttft.observe(values["ttft_s"])
            if values.get("forwards", 0) > 1:
                self.tpot.observe(values["token_measured_s"])
                self.tpot_predicted.observe(values["token_predicted_s"])
        elif kind == "step":
            self.observe_step(values)

    def observe_step(self, values: dict[str, Any]) -> None:
        self.steps.inc()
        self.forward.labels("measured").observe(values["measured_s"])
        self.forward.labels("predicted").observe(values["predicted_s"])
        self.left_out.inc(sum(values.get("left_out") or []))
        devices = values.get("devices")
        if devices is None:
            return
        for u, (up, snr) in enumerate(zip(devices["up"], devices["snr_db"], strict=True)):
            self.outage.labels(str(u)).set(0.0 if up else 1.0)
            if not up:
                self.outages.labels(str(u)).inc()
            self.snr.labels(str(u)).set(snr)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
