"""The dashboard without a browser: the hub stays bounded, the BS's events reach a viewer, controls
need the token, a metrics log replays, the simulator publishes the same step shape."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from lab import TOKEN
from tiny import tiny_model, tiny_tokenizer
from wdmoe.config import load_scenario
from wdmoe.dashboard import DashboardServer, Hub
from wdmoe.dashboard.http import parse_address
from wdmoe.dashboard.hub import HISTORY, PER_VIEWER
from wdmoe.dashboard.replay import replay
from wdmoe.errors import ConfigError
from wdmoe.models.install import install
from wdmoe.policies import make_policy
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings, fit_scenario
from wdmoe.runtime.pulse import attach_dashboard
from wdmoe.simulate import SimSettings
from wdmoe.studies.demo import run_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_slow_viewer_loses_old_events_and_memory_stays_bounded():
    hub = Hub()
    _, viewer = hub.join()
    for i in range(10 * PER_VIEWER):
        hub.publish("step" if i % 2 else "text", {"i": i})
    assert len(hub.history) == HISTORY and len(viewer.queue) == PER_VIEWER
    assert viewer.lost == 10 * PER_VIEWER - PER_VIEWER
    events = viewer.take(timeout_s=0.0)
    steps = [v["i"] for k, v in events if k == "step"]
    assert steps == [10 * PER_VIEWER - 1]  # only the newest step: older ones are coalesced away
    assert len(events) == PER_VIEWER // 2 + 1


def test_a_new_viewer_gets_hello_then_recent_history():
    hub = Hub(lambda: [("cell", {"radius_m": 1.0})])
    hub.publish("text", {"id": 1, "text": "a"})
    _, viewer = hub.join()
    assert [k for k, _ in viewer.take(0.0)] == ["cell", "text"]


def test_parse_address():
    assert parse_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("8765", "host:", "host:99999", ":80"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_address(bad)


def read_events(url: str, out: list, stop: threading.Event) -> None:
    with urllib.request.urlopen(url + "events", timeout=60) as stream:
        for line in stream:
            if line.startswith(b"data:"):
                out.append(json.loads(line[5:]))
            if stop.is_set():
                return


def post(url: str, body: dict, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url + "control", json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def dropping_lab(lab_factory):
    """Two devices; device 1 sleeps 3 s per call, past its deadline: its experts are dropped."""
    lab = lab_factory(devices=2, settings=RuntimeSettings(grace_s=0.3, slack=2.0), delays={1: 3.0})
    page = attach_dashboard(lab.bs, "127.0.0.1", 0, TOKEN)
    yield lab, page
    page.close()


def test_the_bs_streams_steps_text_and_drops_to_a_viewer(dropping_lab):
    lab, page = dropping_lab
    got: list = []
    stop = threading.Event()
    reader = threading.Thread(target=read_events, args=(page.url, got, stop), daemon=True)
    reader.start()
    time.sleep(0.3)
    m = lab.client.generate(api.GenerateRequest("what is the router", max_new_tokens=5))
    time.sleep(1.5)  # the viewer's stream wakes at least once a second
    stop.set()
    kinds = [e["kind"] for e in got]
    assert kinds[:3] == ["cell", "devices", "controls"] and "step" in kinds and "request" in kinds
    text = "".join(e["v"]["text"] for e in got if e["kind"] == "text")
    assert text.strip() == m["text"].strip()
    last = [e["v"] for e in got if e["kind"] == "step"][-1]
    assert len(last["devices"]["share"]) == 2 and len(last["layers"]["wait_s"]) == len(lab.wm.blocks)
    assert last["totals"]["drops"][1] > 0 and m["dropped"] > 0
    assert 0.0 < sum(last["devices"]["share"]) <= 1.0 + 1e-9


def test_controls_need_the_bs_token_and_apply_between_forwards(dropping_lab):
    lab, page = dropping_lab
    change = {"policy": "wdmoe", "params": {"theta": 0.2}, "allocator": "minmax"}
    assert post(page.url, change, None)[0] == 401
    assert post(page.url, change, "not-the-token")[0] == 403
    assert lab.bs.settings.policy == "topk"  # nothing changed
    code, body = post(page.url, {"policy": "nonsense"}, TOKEN)
    assert code == 400 and "nonsense" in body["error"]
    code, body = post(page.url, change, TOKEN)
    assert code == 200 and body["policy"] == "wdmoe" and body["allocator"] == "minmax"
    assert lab.bs.settings.policy == "wdmoe" and lab.bs.dispatcher.settings.allocator == "minmax"
    assert type(lab.bs.dispatcher.allocator).__name__.lower().startswith("minmax")
    lab.client.generate(api.GenerateRequest("hello", max_new_tokens=2))  # still serves


def test_a_metrics_log_replays_onto_a_hub(lab_factory, tmp_path):
    log = tmp_path / "m.jsonl"
    lab = lab_factory(devices=2, log=log)
    lab.client.generate(api.GenerateRequest("hello", max_new_tokens=3))
    lab.close()
    hub = Hub()
    _, viewer = hub.join()
    count = replay(log, hub, speed=1000.0)
    kinds = [k for k, _ in viewer.take(0.0)]
    assert count == len(log.read_text().splitlines())
    assert {"cell", "device_up", "step", "request", "summary"} <= set(kinds)
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1"):
        replay(tmp_path / "bad.jsonl", hub)


def test_the_simulator_publishes_steps_of_the_same_shape():
    wm = install(tiny_model("mixtral"))
    scenario = fit_scenario(load_scenario("lab", ["cell.num_devices=4"]), wm, "mixtral")
    hub = Hub()
    server = DashboardServer(hub)
    try:
        _, viewer = hub.join()
        pieces: list[str] = []
        run_policy(
            wm,
            tiny_tokenizer(),
            scenario,
            "topk",
            make_policy("topk"),
            SimSettings(),
            ("what is the router",),
            4,
            pieces.append,
            hub,
        )
        events = viewer.take(0.0)
        with urllib.request.urlopen(server.url, timeout=10) as page:
            assert b"/static/app.js" in page.read()
        with urllib.request.urlopen(server.url + "static/app.js", timeout=10) as script:
            assert b"EventSource" in script.read()
    finally:
        server.close()
    step = next(v for k, v in events if k == "step")
    assert len(step["devices"]["share"]) == 4 and step["measured_s"] is None
    assert 0.0 < sum(step["devices"]["share"]) <= 1.0 + 1e-9 and step["layers"]["slowest"][0] >= 0
    done = next(v for k, v in events if k == "request")
    assert done["id"] == "topk · 1" and done["new_tokens"] >= 1
    answer = next(v for k, v in events if k == "answer")
    assert answer["text"].strip() == "".join(pieces).strip()
