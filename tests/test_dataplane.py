"""The data plane of expert calls (wdmoe.runtime.dataplane): one persistent connection per device,
and every guarantee of the gRPC plane on it — the token by challenge–response, mutual TLS, per-call
deadlines, the frame limit, clear errors on malformed input, fail-over, rejoin, exact answers."""

import asyncio
import contextlib
import struct
import threading
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab import TOKEN
from wdmoe.errors import ConfigError
from wdmoe.runtime import api, dataplane, wire
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.cluster import round_robin
from wdmoe.runtime.dataplane import CallFailed, StreamClient, StreamServer, envelope, read_envelope
from wdmoe.runtime.device import RUN_EXPERT, serve
from wdmoe.runtime.placement import DeviceRegistry
from wdmoe.runtime.security import TLSFiles, bearer, make_test_pki
from wdmoe.runtime.wire import ExpertRequest, ExpertResponse, decode, decode_all, encode, encode_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.randint(4, 120, (2, 9), generator=torch.Generator().manual_seed(11))
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))  # hidden [T, D] of the tiny models


@pytest.fixture(scope="module")
def loop():
    """The BS's side of these tests runs on its own uvloop, as the BS's links do."""
    loop = dataplane.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def device(shards_by_family):
    """A device on loopback hosting layer 0's experts 0 and 1 of the tiny Mixtral."""
    by_key = shards_by_family["mixtral"]
    with serve([by_key[(0, 0)], by_key[(0, 1)]], token=TOKEN) as d:
        yield d


def request(expert=0, x=X, rid=1, deadline_s=5.0):
    return encode(ExpertRequest(0, expert, x, rid, deadline_s))


def call(loop, address, frame, timeout_s=5.0, token=TOKEN, tls=None):
    """One call on a fresh connection (closed afterwards)."""

    async def once():
        client = StreamClient(address, token, tls)
        try:
            return await client.call(frame, timeout_s)
        finally:
            await client.close()

    return loop.run_until_complete(once())


def refusal(loop, address, frame, **kwargs):
    with pytest.raises(CallFailed) as info:
        call(loop, address, frame, **kwargs)
    return info.value


# --- answers ----------------------------------------------------------------------------------


def test_a_call_is_answered_as_the_device_answers_on_grpc(loop, device):
    frame = encode_bundle([ExpertRequest(0, 1, X, 7, 5.0), ExpertRequest(0, 0, 2 * X, 8, 5.0)])
    got, _ = decode_all(call(loop, device.data_address, frame))
    with grpc.insecure_channel(device.address) as channel:
        want, _ = decode_all(channel.unary_unary(RUN_EXPERT)(frame, timeout=5, metadata=bearer(TOKEN)))
    assert [r.request_id for r in got] == [7, 8]
    assert all(torch.equal(a.outputs, b.outputs) for a, b in zip(got, want, strict=True))
    single = decode(call(loop, device.data_address, request(1)))
    assert isinstance(single, ExpertResponse) and torch.equal(single.outputs, got[0].outputs)


def test_a_device_refuses_with_the_codes_of_the_grpc_plane(loop, device):
    """Malformed → INVALID_ARGUMENT, an expert not hosted → NOT_FOUND, each with its reason."""
    old = bytearray(request())
    struct.pack_into("<H", old, 4, wire.WIRE_VERSION + 1)
    cases = {
        b"garbage!": ("INVALID_ARGUMENT", "magic"),
        bytes(old): ("INVALID_ARGUMENT", "version"),
        request(x=torch.randn(3, 31)): ("INVALID_ARGUMENT", "[n, 32]"),
        request(expert=5): ("NOT_FOUND", "does not host layer 0 expert 5"),
        encode(ExpertResponse(1, X, 0.0)): ("INVALID_ARGUMENT", "expected expert requests"),
    }
    for frame, (code, says) in cases.items():
        err = refusal(loop, device.data_address, frame)
        assert err.code == code and says in err.message, err
    assert call(loop, device.data_address, request())  # it still serves


# --- authentication, mutual TLS --------------------------------------------------------------


def test_a_wrong_token_is_refused_both_ways_and_no_token_is_no_client(loop, device):
    err = refusal(loop, device.data_address, request(), token="not-the-token")
    assert err.code == "UNAUTHENTICATED" and "share one token" in err.message
    with pytest.raises(ConfigError, match="non-empty token"):
        StreamClient(device.data_address, "")
    with pytest.raises(ConfigError, match="non-empty token"):
        StreamServer(device.worker.respond, "")

    async def impostor(reader, writer):  # a "device" that does not know the token
        writer.write(bytes([dataplane.VERSION]) + bytes(32))
        await reader.readexactly(65)
        writer.write(bytes([dataplane.OK]) + bytes(32))
        await writer.drain()

    server = loop.run_until_complete(asyncio.start_server(impostor, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    err = refusal(loop, f"127.0.0.1:{port}", request())
    assert err.code == "UNAUTHENTICATED" and "could not prove the shared token" in err.message
    server.close()
    assert call(loop, device.data_address, request())  # the device still serves the BS


def test_the_token_never_travels(loop):
    """What the BS sends in the handshake: its version, a nonce and an HMAC — not the token."""
    token = "the-shared-secret-token"
    seen = {}

    async def device_side(reader, writer):
        writer.write(bytes([dataplane.VERSION]) + bytes(range(32)))
        seen["reply"] = await reader.readexactly(65)
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(device_side, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(CallFailed):
        call(loop, f"127.0.0.1:{port}", request(), token=token)
    server.close()
    reply = seen["reply"]
    assert reply[0] == dataplane.VERSION and token.encode() not in reply
    assert reply[33:] == dataplane.mac(token.encode(), b"bs", bytes(range(32)), reply[1:33])


def test_a_peer_that_never_proves_the_token_is_dropped(loop, device, monkeypatch):
    monkeypatch.setattr(dataplane, "HANDSHAKE_TIMEOUT_S", 0.3)

    async def silent():
        reader, writer = await asyncio.open_connection("127.0.0.1", device.data_port)
        await reader.readexactly(33)  # the challenge; no answer
        start = time.monotonic()
        assert await reader.read() == b""  # closed by the device
        writer.close()
        return time.monotonic() - start

    assert loop.run_until_complete(silent()) < 3.0


def test_mutual_tls_with_the_runtime_certificates_and_strangers_refused(loop, shards_by_family, tmp_path):
    pki = make_test_pki(tmp_path)
    node = TLSFiles(pki["node_cert"], pki["node_key"], pki["ca"])  # the BS's and the devices' own
    with serve([shards_by_family["mixtral"][(0, 0)]], token=TOKEN, tls=node) as d:
        assert decode(call(loop, d.data_address, request(), tls=node)).request_id == 1
        strangers = {
            "no certificate": TLSFiles(None, None, pki["ca"]),
            "another CA": TLSFiles(pki["other_client_cert"], pki["other_client_key"], pki["ca"]),
            "plaintext": None,
        }
        for who, tls in strangers.items():
            err = refusal(loop, d.data_address, request(), tls=tls, timeout_s=1.0)
            # a plaintext BS waits for a challenge that never comes (the device for a TLS hello)
            assert err.code == "UNAVAILABLE" or who == "plaintext", (who, err)
        wrong_name = TLSFiles(pki["node_cert"], pki["node_key"], pki["ca"], server_name="wrong.example")
        assert refusal(loop, d.data_address, request(), tls=wrong_name).code == "UNAVAILABLE"
        assert call(loop, d.data_address, request(), tls=node)  # still serving


# --- deadlines, connection loss ---------------------------------------------------------------


def test_a_request_whose_deadline_passed_is_refused_without_computing(loop, device, monkeypatch):
    ran = []
    monkeypatch.setattr(device.worker, "run_one", lambda req: ran.append(req))
    device.worker.delay_s = 0.2  # the request waits longer than its 50 ms budget
    err = refusal(loop, device.data_address, request(deadline_s=0.05))
    assert err.code == "DEADLINE_EXCEEDED" and "before it could run" in err.message and ran == []


def test_a_straggler_is_cut_at_the_deadline_and_its_late_reply_ignored(loop, device):
    client = StreamClient(device.data_address, TOKEN)
    device.worker.delay_s = 0.4

    async def run():
        start = time.monotonic()
        with pytest.raises(CallFailed) as info:
            await client.call(request(rid=1, deadline_s=0.0), 0.1)  # no device-side deadline
        took, first, device.worker.delay_s = time.monotonic() - start, client.writer, 0.0
        await asyncio.sleep(0.6)  # the late reply arrives meanwhile: nobody waits for it
        reply = decode(await client.call(request(rid=2), 5.0))
        same = client.writer is first
        await client.close()
        return info.value, took, reply, same

    err, took, reply, same_connection = loop.run_until_complete(run())
    assert err.code == "DEADLINE_EXCEEDED" and took < 0.35, (err, took)
    assert reply.request_id == 2 and same_connection and client.pending == {}


def test_a_lost_connection_fails_pending_calls_unavailable_and_the_next_call_reconnects(loop, device):
    client = StreamClient(device.data_address, TOKEN)
    device.worker.delay_s = 0.5

    def cut():  # the device cuts its connections
        writers = list(device.stream.connections.values())
        device.stream.loop.call_soon_threadsafe(lambda: [w.close() for w in writers])

    async def run():
        threading.Timer(0.15, cut).start()
        pending = [client.call(request(rid=i), 5.0) for i in (1, 2)]
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        forgotten = client.writer is None
        device.worker.delay_s = 0.0
        again = decode(await client.call(request(rid=3), 5.0))
        await client.close()
        return outcomes, forgotten, again

    outcomes, forgotten, again = loop.run_until_complete(run())
    assert all(isinstance(o, CallFailed) and o.code == "UNAVAILABLE" for o in outcomes), outcomes
    assert forgotten and again.request_id == 3


# --- the frame limit and malformed envelopes --------------------------------------------------


async def authenticated(port, token=TOKEN):
    """A raw connection that has passed the handshake (the BS's side of it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await StreamClient(f"127.0.0.1:{port}", token).handshake(reader, writer)
    return reader, writer


def test_an_oversized_length_is_refused_before_its_body(loop, device):
    async def run():
        reader, writer = await authenticated(device.data_port)
        start = time.monotonic()
        writer.write(struct.pack("<IQB", 2**32 - 1, 77, 0))  # announces 4 GiB, sends nothing more
        call_id, status, body = await asyncio.wait_for(read_envelope(reader), 5)
        closed = await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        return call_id, dataplane.STATUS[status], body.decode(), closed, time.monotonic() - start

    call_id, code, says, closed, took = loop.run_until_complete(run())
    assert (call_id, code, closed) == (77, "RESOURCE_EXHAUSTED", True) and "frame limit" in says
    assert took < 2.0
    with pytest.raises(CallFailed, match="RESOURCE_EXHAUSTED"):
        call(loop, device.data_address, b"W" * (wire.MAX_MESSAGE_BYTES + 1))  # the BS checks its own
    assert call(loop, device.data_address, request())


def test_a_ping_is_echoed_at_once_and_a_new_connection_times_its_round_trip(loop, device):
    """Version 2: status PING asks for the body back (no compute); a client times PINGS of them when
    it connects (the software's own round trip, :mod:`wdmoe.latency.overhead`)."""

    async def run():
        reader, writer = await authenticated(device.data_port)
        writer.write(envelope(5, dataplane.PING, b"hello") + envelope(6, dataplane.PING, b"x" * 65))
        echo, too_long = [await asyncio.wait_for(read_envelope(reader), 5) for _ in range(2)]
        writer.close()
        client = StreamClient(device.data_address, TOKEN)
        assert client.ping_s is None
        await client.call(request(), 5.0)
        ping_s = client.ping_s
        await client.close()
        return echo, too_long, ping_s

    echo, too_long, ping_s = loop.run_until_complete(run())
    assert dataplane.VERSION == 2 and echo == (5, dataplane.OK, b"hello")
    assert too_long[:2] == (6, dataplane.CODES["INVALID_ARGUMENT"]) and b"ping" in too_long[2]
    assert ping_s is not None and 0 < ping_s < 1.0


class OversizedReplies(StreamServer):
    """A device that answers every request with an envelope announcing 4 GiB, then stays silent."""

    async def read_requests(self, reader, conn):
        call_id, _, _ = await read_envelope(reader)
        conn.writer.write(struct.pack("<IQB", 2**32 - 1, call_id, 0))
        await asyncio.sleep(30)


def test_a_device_announcing_an_oversized_reply_fails_the_call_at_once(loop, device):
    bad = OversizedReplies(device.worker.respond, TOKEN)
    try:
        start = time.monotonic()
        err = refusal(loop, f"127.0.0.1:{bad.port}", request(), timeout_s=10.0)
        assert err.code == "WIRE" and "frame limit" in err.message and time.monotonic() - start < 3.0
    finally:
        bad.stop()


async def exchange_raw(port, data):
    """Send ``data`` after the handshake and end the stream; every envelope the device sends back."""
    reader, writer = await authenticated(port)
    writer.write(data)
    writer.write_eof()
    replies = []
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            replies.append(await asyncio.wait_for(read_envelope(reader), 10))
    writer.close()
    return replies


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=64) | st.binary(max_size=16).map(lambda b: envelope(3, 0, b)[:5] + b))
def test_fuzzed_envelopes_get_clear_errors_and_never_kill_the_device(loop, device, data):
    for call_id, status, body in loop.run_until_complete(exchange_raw(device.data_port, data)):
        assert status in dataplane.STATUS and status != dataplane.CODES["OK"], (call_id, status)
        assert body.decode()  # a refusal always says why


BODIES = st.one_of(
    st.binary(max_size=120),
    st.binary(max_size=80).map(lambda b: b"WDMO\x01\x00\x01\x00" + b),
    st.binary(max_size=80).map(lambda b: b"WDMO\x01\x00\x03\x00" + b),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 9)).map(
        lambda le: encode(ExpertRequest(le[0] % 3, le[1], torch.zeros(1, 32), 5, 1.0))
    ),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(BODIES, min_size=1, max_size=4), status=st.sampled_from([0, 0, 0, 1, 255]))
def test_fuzzed_bodies_are_answered_each_with_a_reply_or_a_reason(loop, device, bodies, status):
    data = b"".join(envelope(i + 1, status, body) for i, body in enumerate(bodies))
    replies = loop.run_until_complete(exchange_raw(device.data_port, data))
    assert sorted(r[0] for r in replies) == list(range(1, len(bodies) + 1))
    for _, code, body in replies:
        if code == dataplane.CODES["OK"]:
            assert isinstance(decode(body), ExpertResponse)
        else:
            assert dataplane.STATUS[code] in ("INVALID_ARGUMENT", "NOT_FOUND") and body.decode()


# --- through the BS ---------------------------------------------------------------------------


def same_as_in_process(lab):
    return (lab.wm.model(IDS).logits - lab.ref.model(IDS).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("plane", ["stream", "grpc"])
def test_a_forward_through_loopback_devices_equals_the_in_process_model(lab_factory, plane):
    lab = lab_factory(devices=4, settings=RuntimeSettings(data_plane=plane))
    assert same_as_in_process(lab)
    links = lab.bs.links
    # stream, no TLS, no emulated delays: every layer's calls travel on the direct lanes
    lanes = len(links.lanes.lanes)
    assert (lanes, len(links.streams), len(links.channels)) == ((4, 0, 0) if plane == "stream" else (0, 0, 4))
    rows = lab.bs.summary()["devices"]
    assert all(r["answered"] > 0 and not r["failures"] for r in rows), rows


def test_a_device_killed_mid_answer_fails_over_to_its_replica_in_the_same_layer(lab_factory):
    # time_scale 1e6: a wall second is a simulated microsecond, so the channel block stays put
    lab = lab_factory(devices=2, replicas=2, settings=RuntimeSettings(time_scale=1e6, grace_s=5.0))
    best = int(lab.bs.begin_forward(None).per_token_s.argmin())
    inputs = {e: torch.randn(2, 32, generator=torch.Generator().manual_seed(e)) for e in range(8)}
    lab.devices[best].worker.delay_s = 2.0  # mid-answer when it dies
    killer = threading.Timer(0.3, lab.devices[best].stop)
    killer.start()
    start = time.monotonic()
    out = lab.bs.run_layer(0, inputs)
    took = time.monotonic() - start
    killer.join()
    want = lab.ref.local_dispatcher().run(0, inputs)
    assert sorted(out) == list(range(8)) and took < 1.8, took
    assert all((out[e] - want[e]).abs().max().item() <= 1e-5 for e in inputs)
    rows = lab.bs.summary()["devices"]
    assert set(rows[best]["failures"]) == {"UNAVAILABLE"} and not rows[best]["usable"], rows
    assert rows[1 - best]["answered"] == 8


def test_a_restarted_device_is_used_again(lab_factory, shards_by_family):
    lab = lab_factory(devices=4, settings=RuntimeSettings(heartbeat_s=0.2))
    lab.wm.model(IDS)
    old = lab.devices[2]
    old.stop()
    lab.wm.model(IDS)  # its experts fail UNAVAILABLE: down
    assert not lab.bs.summary()["devices"][2]["usable"]
    keys = round_robin(sorted(shards_by_family["mixtral"]), 4)[2]
    back = serve([shards_by_family["mixtral"][k] for k in keys], port=old.port, token=TOKEN)
    back.register(lab.server.address, TOKEN, 2)
    lab.devices[2] = back
    deadline = time.monotonic() + 10
    while not lab.bs.summary()["devices"][2]["usable"] and time.monotonic() < deadline:
        time.sleep(0.05)
    answered = lab.bs.summary()["devices"][2]["answered"]
    assert same_as_in_process(lab) and lab.bs.summary()["devices"][2]["answered"] > answered
    assert lab.bs.registry.devices[2].data_address == back.data_address
    assert lab.bs.links.lanes.lanes[back.address].address == back.data_address


def test_a_moved_data_plane_is_a_new_device_and_static_ones_have_none():
    reg = DeviceRegistry(2, (0,), 2)
    entry, came_up = reg.register(0, "h:1", [(0, 0)], data_address="h:2")
    assert came_up and reg.register(0, "h:1", [(0, 0)], data_address="h:2") == (entry, False)
    moved, came_up = reg.register(0, "h:1", [(0, 0)], data_address="h:3")
    assert came_up and (entry.data_address, moved.data_address) == ("h:2", "h:3")
    assert reg.register(1, "h:4", [(0, 1)], static=True)[0].data_address == ""


def test_a_registration_of_another_data_plane_version_is_called_over_grpc(lab_factory):
    lab = lab_factory(devices=2)
    d = lab.devices[1]
    d.registrar.stop()
    newer = api.Registration(1, d.address, tuple(d.hosted), "", d.data_address, dataplane.VERSION + 1)
    assert lab.bs.register(newer).data_address == "" and same_as_in_process(lab)
    assert d.address in lab.bs.links.channels and d.address not in lab.bs.links.streams
