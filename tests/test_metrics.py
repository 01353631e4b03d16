"""The BS's Prometheus metrics: /metrics parses with prometheus_client's own parser, and its
numbers are the books' (the Stats RPC's) and the requests'."""

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import TOKEN
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.service import serve_bs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scrape(url: str) -> dict[str, list]:
    """{family name: [samples]} of /metrics."""
    with urllib.request.urlopen(url + "metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` (e.g. ``…_total``, ``…_count``) with ``labels``."""
    samples = [s for family in families.values() for s in family if s.name == name]
    assert samples, f"no sample {name}"
    return sum(s.value for s in samples if labels.items() <= s.labels.items())


def test_metrics_parse_and_count_requests_calls_failures_and_latency(lab_factory):
    lab = lab_factory(devices=2, settings=RuntimeSettings(grace_s=0.3, slack=2.0), delays={1: 3.0})
    server = serve_bs(lab.bs, TOKEN, dashboard=("127.0.0.1", 0))  # a second face on the same BS
    try:
        m = lab.client.generate(api.GenerateRequest("what is the router", max_new_tokens=4))
        families = scrape(server.dashboard.url)
    finally:
        server.dashboard.close()
        server.server.stop(None)
        server.service.workers.shutdown()
    rows = lab.bs.summary()["devices"]
    assert value(families, "wdmoe_requests_total") == 1
    assert value(families, "wdmoe_generated_tokens_total") == m["new_tokens"]
    assert value(families, "wdmoe_ttft_seconds_count") == 1
    assert value(families, "wdmoe_tpot_seconds_count") == 1
    for r in rows:
        slot = str(r["slot"])
        assert value(families, "wdmoe_device_calls_total", slot=slot) == r["calls"]
        assert value(families, "wdmoe_device_bytes_total", slot=slot, direction="downlink") == r["bytes_dl"]
    assert value(families, "wdmoe_device_failures_total", slot="1", code="DEADLINE_EXCEEDED") > 0
    assert value(families, "wdmoe_experts_dropped_total") == lab.bs.books.dropped > 0
    assert value(families, "wdmoe_forward_seconds_count", source="predicted") == m["forwards"]
    assert value(families, "wdmoe_forward_seconds_count", source="measured") == m["forwards"]
    assert {"wdmoe_link_outage", "wdmoe_link_snr_db", "wdmoe_device_usable", "wdmoe_requests"} <= set(
        families
    )
    for name, family in families.items():
        assert name.startswith("wdmoe_"), name
        assert all(s.name.startswith("wdmoe_") for s in family)
