"""The BS's direct lanes (wdmoe.runtime.direct): blocking-free sockets driven from the caller's
thread keep every guarantee of the data plane — the token both ways, the device's refusals, the
per-call deadline with the late reply dropped, a lost connection failing UNAVAILABLE and the next
call reconnecting, a broken envelope failing WIRE — and answer exactly as the device does."""

import socket
import struct
import threading
import time

import pytest
import torch

from lab import TOKEN
from wdmoe.runtime import envelope as env
from wdmoe.runtime.device import serve
from wdmoe.runtime.direct import Lanes
from wdmoe.runtime.wire import ExpertRequest, ExpertResponse, decode, decode_all, encode, encode_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))  # hidden [T, D] of the tiny models


@pytest.fixture
def device(shards_by_family):
    by_key = shards_by_family["mixtral"]
    with serve([by_key[(0, 0)], by_key[(0, 1)]], token=TOKEN) as d:
        yield d


@pytest.fixture
def lanes():
    lanes = Lanes(TOKEN)
    yield lanes
    lanes.close()


def request(expert=0, x=X, rid=1, deadline_s=5.0):
    return encode(ExpertRequest(0, expert, x, rid, deadline_s))


def one(lanes, device, frame, budget_s=5.0):
    (o,) = lanes.run([(device.address, device.data_address, frame, budget_s)])
    return o


def test_answers_are_the_devices_own_and_a_lane_is_kept_between_calls(lanes, device):
    o = one(lanes, device, request(1, rid=7))
    assert o.error == ("", "") and o.sent_s <= o.answered_s
    got = decode(o.reply)
    want = device.worker.run_one(ExpertRequest(0, 1, X, 7, 5.0))
    assert isinstance(got, ExpertResponse) and got.request_id == 7 and torch.equal(got.outputs, want.outputs)
    lane = lanes.lanes[device.address]
    assert lane.ping_s is not None and 0 < lane.ping_s < 1.0
    bundle = encode_bundle([ExpertRequest(0, 0, X, 8, 5.0), ExpertRequest(0, 1, 2 * X, 9, 5.0)])
    replies, bundled = decode_all(one(lanes, device, bundle).reply)
    assert bundled and [r.request_id for r in replies] == [8, 9] and lanes.lanes[device.address] is lane


def test_a_large_frame_goes_out_in_pieces_and_comes_back_whole(lanes, device):
    x = torch.randn(20_000, 32, generator=torch.Generator().manual_seed(3))  # 2.5 MB each way
    o = one(lanes, device, request(0, x=x, rid=5))
    got = decode(o.reply)
    assert o.error == ("", "") and torch.equal(
        got.outputs, device.worker.run_one(ExpertRequest(0, 0, x, 5)).outputs
    )


def test_refusals_carry_the_devices_codes(lanes, device):
    o = one(lanes, device, request(expert=5))
    assert o.reply is None and o.error[0] == "NOT_FOUND" and "does not host layer 0 expert 5" in o.error[1]
    assert one(lanes, device, request()).reply is not None  # the lane still serves


def test_a_wrong_token_is_refused_and_an_impostor_device_unmasked(device):
    wrong = Lanes("not-the-token")
    try:
        o = one(wrong, device, request())
    finally:
        wrong.close()
    assert o.error[0] == "UNAUTHENTICATED" and "share one token" in o.error[1]

    listener = socket.create_server(("127.0.0.1", 0))

    def impostor():  # a "device" that does not know the token
        conn, _ = listener.accept()
        with conn:
            conn.sendall(bytes([env.VERSION]) + bytes(env.NONCE_BYTES))
            conn.recv(1 + 2 * env.NONCE_BYTES)
            conn.sendall(bytes([env.OK]) + bytes(env.MAC_BYTES))
            conn.recv(1)

    threading.Thread(target=impostor, daemon=True).start()
    lanes = Lanes(TOKEN)
    try:
        (o,) = lanes.run([("fake", f"127.0.0.1:{listener.getsockname()[1]}", request(), 5.0)])
    finally:
        lanes.close()
        listener.close()
    assert o.error[0] == "UNAUTHENTICATED" and "could not prove the shared token" in o.error[1]


def test_a_straggler_is_cut_at_the_deadline_and_its_late_reply_dropped(lanes, device):
    assert one(lanes, device, request()).reply is not None  # connected: the whole budget is the call's
    device.worker.delay_s = 0.4
    start = time.monotonic()
    o = one(lanes, device, request(rid=1, deadline_s=0.0), budget_s=0.1)
    took = time.monotonic() - start
    assert o.error[0] == "DEADLINE_EXCEEDED" and "within 0.100 s" in o.error[1] and took < 0.35, (
        o.error,
        took,
    )
    lane = lanes.lanes[device.address]
    device.worker.delay_s = 0.0
    time.sleep(0.6)  # the late reply is on the wire meanwhile
    again = one(lanes, device, request(rid=2))
    assert (
        decode(again.reply).request_id == 2 and lanes.lanes[device.address] is lane and lane.sock is not None
    )


def test_a_lost_connection_fails_unavailable_and_the_next_call_reconnects(lanes, device):
    assert one(lanes, device, request()).reply is not None
    device.worker.delay_s = 0.5

    def cut():  # the device cuts its connections while the call computes
        writers = list(device.stream.connections.values())
        device.stream.loop.call_soon_threadsafe(lambda: [w.close() for w in writers])

    threading.Timer(0.15, cut).start()
    o = one(lanes, device, request(rid=3))
    assert o.error[0] == "UNAVAILABLE" and "was lost" in o.error[1]
    assert lanes.lanes[device.address].sock is None
    device.worker.delay_s = 0.0
    assert decode(one(lanes, device, request(rid=4)).reply).request_id == 4


def test_no_device_listening_is_unavailable_and_quick(lanes):
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()
    start = time.monotonic()
    (o,) = lanes.run([("gone", f"127.0.0.1:{port}", request(), 2.0)])
    assert o.error[0] == "UNAVAILABLE" and "cannot reach" in o.error[1] and time.monotonic() - start < 1.0


def test_a_broken_envelope_fails_wire_and_drops_the_connection(lanes):
    listener = socket.create_server(("127.0.0.1", 0))
    token = TOKEN.encode()

    def rogue():  # passes the handshake and pings, then answers a call with a 4 GiB length
        conn, _ = listener.accept()
        with conn:
            nonce = b"n" * env.NONCE_BYTES
            conn.sendall(bytes([env.VERSION]) + nonce)
            reply = conn.recv(1 + 2 * env.NONCE_BYTES, socket.MSG_WAITALL)
            conn.sendall(bytes([env.OK]) + env.mac(token, b"device", nonce, reply[1 : 1 + env.NONCE_BYTES]))
            for _ in range(3):  # pings: echoed
                _, call_id, _ = env.ENVELOPE.unpack(conn.recv(env.ENVELOPE.size, socket.MSG_WAITALL))
                body = conn.recv(8, socket.MSG_WAITALL)
                conn.sendall(env.envelope(call_id, env.OK, body))
            length, call_id, _ = env.ENVELOPE.unpack(conn.recv(env.ENVELOPE.size, socket.MSG_WAITALL))
            conn.recv(length - env.HEAD, socket.MSG_WAITALL)
            conn.sendall(struct.pack("<IQB", 2**32 - 1, call_id, 0))
            time.sleep(0.5)

    threading.Thread(target=rogue, daemon=True).start()
    try:
        (o,) = lanes.run([("rogue", f"127.0.0.1:{listener.getsockname()[1]}", request(), 5.0)])
    finally:
        listener.close()
    assert o.error[0] == "WIRE" and "frame limit" in o.error[1] and lanes.lanes["rogue"].sock is None


def test_lanes_of_several_devices_are_awaited_together(lanes, shards_by_family):
    """Two devices, each 0.3 s slow: one run takes one delay, not two."""
    by_key = shards_by_family["mixtral"]
    with serve([by_key[(0, 0)]], token=TOKEN) as a, serve([by_key[(0, 1)]], token=TOKEN) as b:
        jobs = [(d.address, d.data_address, request(e, rid=e + 1), 5.0) for e, d in enumerate((a, b))]
        lanes.run(jobs)  # connected
        a.worker.delay_s = b.worker.delay_s = 0.3
        start = time.monotonic()
        outs = lanes.run(jobs)
        took = time.monotonic() - start
    assert [decode(o.reply).request_id for o in outs] == [1, 2] and took < 0.55, took
