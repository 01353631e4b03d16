"""The BS under load and abuse: many users at once, a chronic straggler, lapsed heartbeats, devices
that answer garbage (on both data planes), clients of a silent BS, and the whole RPC surface fuzzed."""

import json
import math
import struct
import threading
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab import TOKEN
from wdmoe.runtime import api, dataplane, service
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.client import BSClient, BSError
from wdmoe.runtime.device import RUN_EXPERT, SERVICE
from wdmoe.runtime.security import bearer
from wdmoe.runtime.server import start_server
from wdmoe.runtime.wire import (
    _PREFIX,
    _RESPONSE,
    DTYPES,
    KIND_RESPONSE,
    MAGIC,
    WIRE_VERSION,
    ExpertRequest,
    ExpertResponse,
    decode_all,
    encode,
    encode_bundle,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.randint(4, 120, (1, 6), generator=torch.Generator().manual_seed(3))
PROMPT = "what is the router"


def events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(check, timeout_s=15.0, every_s=0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every_s)
    return False


# --- load and liveness ----------------------------------------------------------------------------


def test_twenty_users_at_once_lose_no_expert_and_stats_answers_at_once(lab_factory):
    """16 long-lived streams used to hold every worker of the BS's gRPC pool: heartbeats queued,
    live devices were declared gone and most experts dropped. Now they are coroutines."""
    lab = lab_factory(devices=4, settings=RuntimeSettings(heartbeat_s=0.2, grace_s=1.0))
    results, errors = {}, []

    def user(i):
        try:
            with BSClient(lab.server.address, TOKEN) as c:
                results[i] = c.generate(api.GenerateRequest(PROMPT, max_new_tokens=24))
        except BSError as err:
            errors.append(err)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start = time.monotonic()
    during = lab.client.stats()
    stats_s = time.monotonic() - start
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 20
    assert all(r["new_tokens"] == 24 for r in results.values())
    assert sum(r["dropped"] for r in results.values()) == 0, [r["dropped"] for r in results.values()]
    assert stats_s < 1.0, f"Stats took {stats_s:.2f} s under load"
    assert during["queue"]["active"] + during["queue"]["queued"] > 0
    summary = lab.bs.summary()
    assert summary["totals"]["dropped"] == 0 and all(d["state"] == "up" for d in summary["devices"])


def test_requests_beyond_the_queue_are_refused_and_queued_ones_hear_their_place(lab_factory, monkeypatch):
    monkeypatch.setattr(service, "QUEUED_EVERY_S", 0.05)
    # device 0 answers 30 ms late in wait mode: a request of 40 tokens runs for seconds
    settings = RuntimeSettings(max_active=1, max_queue=1, mode="wait", max_wait_s=5.0)
    lab = lab_factory(devices=2, settings=settings, delays={0: 0.03})
    out, places = {}, []

    def user(name, **kw):
        with BSClient(lab.server.address, TOKEN) as c:
            try:
                out[name] = c.generate(api.GenerateRequest(PROMPT, max_new_tokens=40), **kw)
            except BSError as err:
                out[name] = err

    first = threading.Thread(target=user, args=("first",))
    first.start()
    assert wait_for(lambda: lab.client.stats()["queue"]["active"] == 1)
    second = threading.Thread(target=user, args=("second",), kwargs={"on_queued": places.append})
    second.start()
    assert wait_for(lambda: lab.client.stats()["queue"]["queued"] == 1)
    user("third")
    first.join(60)
    second.join(60)
    assert isinstance(out["third"], BSError) and "RESOURCE_EXHAUSTED" in str(out["third"])
    assert "--max-queue" in str(out["third"])
    assert out["first"]["new_tokens"] == 40 and out["second"]["new_tokens"] == 40
    assert places and set(places) == {1}
    assert lab.client.stats()["queue"] == {"active": 0, "queued": 0, "refused": 1}


@pytest.mark.parametrize("plane", ["stream", "grpc"])
def test_a_chronic_straggler_is_benched_probed_and_readmitted(lab_factory, tmp_path, plane):
    log = tmp_path / "m.jsonl"
    settings = RuntimeSettings(grace_s=0.2, slack=2.0, bench_after=2, bench_s=0.3, data_plane=plane)
    lab = lab_factory(devices=4, settings=settings, delays={2: 1.0}, log=log)
    start = time.monotonic()
    m = lab.client.generate(api.GenerateRequest(PROMPT, max_new_tokens=8))
    took = time.monotonic() - start
    row = lab.bs.summary()["devices"][2]
    # benched after 2 misses: later layers and tokens do not wait out its deadline
    assert row["failures"].get("DEADLINE_EXCEEDED", 0) <= 4, row
    assert row["skipped"] > 0 and m["dropped"] >= row["skipped"]
    assert took < 4.0, f"the request took {took:.1f} s: the straggler was waited for"
    assert row["state"] in ("benched", "probing")
    benched = [e for e in events(log) if e["event"] == "device_benched"]
    assert benched and benched[0]["slot"] == 2 and "DEADLINE_EXCEEDED" in benched[0]["reason"]
    lab.devices[2].worker.delay_s = 0.0  # it recovers: a probe readmits it
    assert wait_for(lambda: lab.bs.summary()["devices"][2]["state"] == "up", timeout_s=20)
    assert any(e["event"] == "device_readmitted" and e["slot"] == 2 for e in events(log))
    answered = lab.bs.summary()["devices"][2]["answered"]
    lab.wm.model(IDS)
    assert lab.bs.summary()["devices"][2]["answered"] > answered


def test_lapsed_heartbeats_are_an_event_and_skipped_experts_are_counted(lab_factory, tmp_path):
    log = tmp_path / "m.jsonl"
    lab = lab_factory(devices=4, settings=RuntimeSettings(heartbeat_s=0.2), log=log)
    lab.devices[1].registrar.stop()  # alive but silent: only the heartbeats tell
    assert wait_for(lambda: any(e["event"] == "device_down" for e in events(log)), timeout_s=5)
    down = next(e for e in events(log) if e["event"] == "device_down")
    assert down["slot"] == 1 and "missed heartbeats" in down["reason"]
    m = lab.client.generate(api.GenerateRequest(PROMPT, max_new_tokens=4))
    summary = lab.bs.summary()
    t, row = summary["totals"], summary["devices"][1]
    assert row["state"] == "down" and row["calls"] == 0 and row["skipped"] > 0
    assert t["skipped"] == row["skipped"] == m["dropped"] and t["dropped"] == m["dropped"]


# --- what devices answer --------------------------------------------------------------------------


def tensor_bytes(code, dims, payload):
    return struct.pack("<BB", code, len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + payload


SPOIL = st.fixed_dictionaries(
    {
        "at": st.tuples(st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True)),
        "code": st.sampled_from(sorted(DTYPES)),
        "dims": st.lists(st.sampled_from([0, 1, 7, 2**31, 2**32, 2**63]), max_size=8),
        "payload": st.binary(max_size=64),
    }
)


def bad_response(request_id, hidden, how, spoil):
    """A response frame to ``hidden`` spoiled in the way ``how`` names (details drawn in ``spoil``:
    drawn in the test, as the device's handler runs in another thread)."""
    n, d = hidden.shape
    head = _PREFIX.pack(MAGIC, WIRE_VERSION, KIND_RESPONSE, 0) + _RESPONSE.pack(request_id, 0.001)
    if how == "huge_dims":
        return head + tensor_bytes(1, [2**32, 2**32, 0], b"")
    if how in ("nan", "inf"):
        y = torch.zeros(n, d)
        y[int(spoil["at"][0] * n), int(spoil["at"][1] * d)] = float(how)
        return encode(ExpertResponse(request_id, y, 0.001))
    if how == "shape":
        return encode(ExpertResponse(request_id, torch.zeros(n + 1, d), 0.001))
    if how == "dtype":
        return encode(ExpertResponse(request_id, torch.zeros(n, d, dtype=torch.int32), 0.001))
    if how == "other_id":
        return encode(ExpertResponse(request_id + 1, torch.zeros(n, d), 0.001))
    if how == "request":
        return encode(ExpertRequest(0, 0, torch.zeros(n, d), request_id, 1.0))
    return head + tensor_bytes(spoil["code"], spoil["dims"], spoil["payload"])


class BadDevice:
    """A device that hosts experts and answers each request with what ``answer`` makes of it."""

    def __init__(self, answer):
        self.answer = answer

    def reply(self, request, arrived_s=None):
        msgs, bundled = decode_all(request)
        frames = [self.answer(m.request_id, m.hidden) for m in msgs]
        if not bundled:
            return frames[0]
        return (
            _PREFIX.pack(MAGIC, WIRE_VERSION, 3, 0)
            + struct.pack("<H", len(frames))
            + b"".join(struct.pack("<Q", len(f)) + f for f in frames)
        )

    def handler(self):
        method = grpc.unary_unary_rpc_method_handler(lambda request, context: self.reply(request))
        return grpc.method_handlers_generic_handler(SERVICE, {"RunExpert": method})


HOW = ["huge_dims", "nan", "inf", "shape", "dtype", "other_id", "request", "random"]


@pytest.fixture(params=["grpc", "stream"])
def bad_lab(lab_factory, request):
    """A lab of 2 devices whose device 1 is a BadDevice hosting the same experts (on gRPC or streams)."""
    lab = lab_factory(devices=2, settings=RuntimeSettings(bench_after=10**6))
    state = {"answer": None}
    bad = BadDevice(lambda rid, hidden: state["answer"](rid, hidden))
    server, port = start_server(bad.handler(), TOKEN, "127.0.0.1", 0, None)
    stream = dataplane.StreamServer(bad.reply, TOKEN)
    data = f"127.0.0.1:{stream.port}" if request.param == "stream" else ""
    lab.devices[1].registrar.stop()
    experts = tuple(lab.devices[1].hosted)
    lab.bs.register(api.Registration(1, f"127.0.0.1:{port}", experts, "", data, dataplane.VERSION))
    yield lab, state
    stream.stop()
    server.stop(None).wait()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(HOW), spoil=SPOIL)
def test_a_bad_answer_costs_that_expert_only(bad_lab, how, spoil):
    lab, state = bad_lab
    state["answer"] = lambda rid, hidden: bad_response(rid, hidden, how, spoil)
    before = lab.bs.summary()["devices"][1]
    logits = lab.wm.model(IDS).logits
    after = lab.bs.summary()["devices"][1]
    assert torch.isfinite(logits).all()
    failed = sum(after["failures"].values()) - sum(before["failures"].values())
    assert failed == after["calls"] - before["calls"] > 0 and after["answered"] == before["answered"]
    codes = set(after["failures"]) - {"DEADLINE_EXCEEDED"}
    assert codes <= {"WIRE", "NONFINITE"}, after["failures"]
    if how in ("nan", "inf"):
        assert after["failures"]["NONFINITE"] > before["failures"].get("NONFINITE", 0)


def test_a_request_survives_a_device_whose_every_answer_is_garbage(bad_lab):
    lab, state = bad_lab
    state["answer"] = lambda rid, hidden: bad_response(rid, hidden, "huge_dims", None)
    m = lab.client.generate(api.GenerateRequest(PROMPT, max_new_tokens=3))
    assert m["new_tokens"] == 3 and m["dropped"] > 0
    bad, links = lab.bs.registry.devices[1], lab.bs.links  # called on the plane the fixture chose
    stream = bool(bad.data_address)
    assert (bad.address in links.lanes.lanes, bad.address in links.channels) == (stream, not stream)


# --- clients --------------------------------------------------------------------------------------


@pytest.fixture
def frozen_bs():
    """A BS address whose Generate never says a word (as a BS stopped with SIGSTOP)."""
    release = threading.Event()

    def generate(request, context):
        release.wait(30)
        yield b"{}"

    methods = {"Generate": grpc.unary_stream_rpc_method_handler(generate)}
    handler = grpc.method_handlers_generic_handler(api.BS_SERVICE, methods)
    server, port = start_server(handler, TOKEN, "127.0.0.1", 0, None, workers=4)
    yield f"127.0.0.1:{port}"
    release.set()
    server.stop(None).wait()


def test_a_client_of_a_silent_bs_gives_up_after_its_idle_timeout(frozen_bs):
    start = time.monotonic()
    with BSClient(frozen_bs, TOKEN) as c, pytest.raises(BSError, match=r"sent nothing for 0.5 s"):
        c.generate(api.GenerateRequest(PROMPT), idle_s=0.5)
    assert time.monotonic() - start < 3.0


def test_a_client_deadline_is_named(frozen_bs):
    with BSClient(frozen_bs, TOKEN) as c, pytest.raises(BSError, match=r"DEADLINE_EXCEEDED.*--timeout-s"):
        c.generate(api.GenerateRequest(PROMPT), timeout_s=0.5, idle_s=None)


# --- the RPC surface, fuzzed ----------------------------------------------------------------------

FINE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["v", "slot", "address", "experts", "name", "prompt", "max_new_tokens", "temperature", "top_p"]
FIELDS += ["seed", "chat", "system"]


@st.composite
def control_message(draw):
    """Raw bytes, or a JSON object of version 1 with fields of any type and value."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    obj = {"v": 1} | draw(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6))
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def surface(shards_by_family):
    from lab import Lab

    lab = Lab("mixtral", shards_by_family["mixtral"], devices=2)
    channel = grpc.insecure_channel(lab.server.address)
    device = grpc.insecure_channel(lab.devices[0].address)
    yield lab, channel, device
    channel.close()
    device.close()
    lab.close()


def first_message(stream):
    """Read one message of a stream, then cancel it (a fuzzed request may ask for 65536 tokens)."""
    next(stream, None)
    stream.cancel()


def status_of(call):
    try:
        call()
    except grpc.RpcError as err:
        return None if err.code() == grpc.StatusCode.CANCELLED else err.code()
    return grpc.StatusCode.OK


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from([api.REGISTER, api.STATS, api.GENERATE]), body=control_message())
def test_the_bs_answers_any_control_message_with_a_status_never_an_error(surface, method, body):
    _, channel, _ = surface
    if method == api.GENERATE:
        call = lambda: first_message(channel.unary_stream(method)(body, metadata=bearer(TOKEN), timeout=30))  # noqa: E731
    else:
        call = lambda: channel.unary_unary(method)(body, metadata=bearer(TOKEN), timeout=30)  # noqa: E731
    assert status_of(call) in FINE | {grpc.StatusCode.OK, None}


@st.composite
def device_request(draw):
    """Raw bytes, or well-formed prefixes and headers around adversarial tensors and bundles."""
    kind = draw(st.sampled_from(["bytes", "request", "bundle", "response"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    layer, expert = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
    head = _PREFIX.pack(MAGIC, WIRE_VERSION, 1, 0) + struct.pack(
        "<IIQd", layer, expert, draw(st.integers(0, 2**64 - 1)), draw(st.floats(allow_nan=True))
    )
    dims = draw(st.lists(st.sampled_from([0, 1, 2, 16, 2**32, 2**63]), max_size=9))
    code = draw(st.integers(0, 255))
    n = math.prod(dims) if all(d < 64 for d in dims) else 0
    frame = head + tensor_bytes(code, dims, bytes(min(n * 4, 4096)))
    if kind == "request":
        return frame
    if kind == "response":
        return encode(ExpertResponse(0, torch.zeros(1, 16), 0.0))
    return encode_bundle([ExpertRequest(0, 0, torch.zeros(1, 16))])[:-64] + frame[:64]


@settings(max_examples=150, deadline=None)
@given(body=device_request())
def test_a_device_answers_any_request_with_a_status_never_an_error(surface, body):
    _, _, device = surface
    call = lambda: device.unary_unary(RUN_EXPERT)(body, metadata=bearer(TOKEN), timeout=30)  # noqa: E731
    assert status_of(call) in FINE | {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}


def test_the_fuzzed_device_and_bs_still_serve(surface):
    """After the fuzzing above, both servers still answer health checks and the model still runs."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, channel, device = surface
    for ch in (channel, device):
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_generate_at_a_silent_bs_ends_with_one_line_and_status_2(frozen_bs):
    from typer.testing import CliRunner

    from wdmoe.cli import app

    args = ["generate", "hello", "--bs", frozen_bs, "--token", TOKEN, "--idle-timeout-s", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "sent nothing for 0.5 s" in result.output, result.output
    bad = CliRunner().invoke(app, [*args[:6], "--timeout-s", "-1"])
    assert bad.exit_code == 2 and "--timeout-s must be > 0" in bad.output


def test_generate_reaches_a_tls_bs_with_its_tls_options(lab_factory, tmp_path):
    from typer.testing import CliRunner

    from wdmoe.cli import app
    from wdmoe.runtime.security import TLSFiles, make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    lab = lab_factory(devices=2, tls=TLSFiles(pki["node_cert"], pki["node_key"], pki["ca"]))
    args = ["generate", "hello", "--bs", lab.server.address, "--token", TOKEN, "--max-new-tokens", "2"]
    tls = [
        "--tls-cert",
        str(pki["client_cert"]),
        "--tls-key",
        str(pki["client_key"]),
        "--tls-ca",
        str(pki["ca"]),
    ]
    result = CliRunner().invoke(app, [*args, *tls])
    assert result.exit_code == 0 and "2 new tok" in result.output, result.output
    plain = CliRunner().invoke(app, [*args, "--idle-timeout-s", "5", "--timeout-s", "5"])
    assert plain.exit_code == 2 and "error" in plain.output
