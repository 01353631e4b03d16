"""The runtime's first slice: the wire format, device workers and the remote dispatcher on loopback."""

import contextlib
import socket
import struct
import time

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import failures, static_bs
from tiny import tiny_model
from wdmoe.models.install import install
from wdmoe.models.split import split_model
from wdmoe.runtime.device import RUN_EXPERT, bearer, serve
from wdmoe.runtime.wire import (
    DTYPES,
    KIND_RESPONSE,
    WIRE_VERSION,
    ExpertRequest,
    ExpertResponse,
    WireError,
    bundle_size,
    decode,
    decode_all,
    decode_request,
    encode,
    encode_bundle,
    encoded_size,
)

TOKEN = "s3cret"

# ---------------------------------------------------------------------------------------- wire


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    raw = draw(st.binary(min_size=dtype.itemsize * max(1, int(torch.Size(shape).numel()))))
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)[: dtype.itemsize * torch.Size(shape).numel()]
    return flat.view(dtype).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included)."""
    flat_a, flat_b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat_a, flat_b)


@settings(max_examples=200, deadline=None)
@given(
    t=tensors(),
    layer=st.integers(0, 2**32 - 1),
    expert=st.integers(0, 2**32 - 1),
    rid=st.integers(0, 2**64 - 1),
    secs=st.floats(0, 1e9),
)
def test_wire_round_trip(t, layer, expert, rid, secs):
    data = encode(ExpertRequest(layer, expert, t, rid, secs))
    assert len(data) == encoded_size(tuple(t.shape), t.dtype)
    req = decode_request(data)
    assert (req.layer, req.expert, req.request_id, req.deadline_s) == (layer, expert, rid, secs)
    assert same(req.hidden, t)
    resp = decode(encode(ExpertResponse(rid, t, secs)))
    assert isinstance(resp, ExpertResponse) and same(resp.outputs, t) and resp.compute_s == secs


def test_wire_round_trips_a_non_contiguous_view():
    x = torch.randn(4, 6)[:, ::2]
    assert torch.equal(decode_request(encode(ExpertRequest(0, 1, x))).hidden, x)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_bytes_raise_only_wire_error(data):
    with contextlib.suppress(WireError):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(t=tensors(), cut=st.integers(0, 10_000), flip=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_truncated_or_mutated_frames_raise_only_wire_error(t, cut, flip, byte):
    data = encode(ExpertRequest(1, 2, t, 3, 0.5))
    with pytest.raises(WireError):
        decode(data[: cut % len(data)])  # every strict prefix is malformed
    mutated = bytearray(data)
    mutated[flip % len(data)] = byte
    with contextlib.suppress(WireError):
        decode(bytes(mutated))


def test_decode_names_both_versions_and_limits():
    data = bytearray(encode(ExpertRequest(0, 0, torch.zeros(2, 3))))
    struct.pack_into("<H", data, 4, WIRE_VERSION + 6)
    with pytest.raises(WireError, match=rf"version {WIRE_VERSION + 6}.*version {WIRE_VERSION}"):
        decode(bytes(data))
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(encode(ExpertRequest(0, 0, torch.zeros(64, 64))), max_bytes=1000)
    with pytest.raises(WireError, match="expected an expert request"):
        decode_request(encode(ExpertResponse(0, torch.zeros(1), 0.0)))
    assert KIND_RESPONSE != 1
    for bad in (ExpertRequest(-1, 0, torch.zeros(1)), ExpertRequest(0, 0, torch.zeros(1), 0, float("nan"))):
        with pytest.raises(WireError):
            encode(bad)
    with pytest.raises(WireError, match="cannot travel"):
        encode(ExpertRequest(0, 0, torch.zeros(2, dtype=torch.bool)))


@settings(max_examples=100, deadline=None)
@given(ts=st.lists(tensors(), min_size=1, max_size=5), cut=st.integers(0, 10_000))
def test_bundles_round_trip_and_every_prefix_is_malformed(ts, cut):
    reqs = [ExpertRequest(i, 2 * i, t, 7 + i, 0.25) for i, t in enumerate(ts)]
    data = encode_bundle(reqs)
    assert len(data) == bundle_size([len(encode(r)) for r in reqs])
    messages, bundled = decode_all(data)
    assert bundled and [(m.layer, m.expert, m.request_id) for m in messages] == [
        (i, 2 * i, 7 + i) for i in range(len(ts))
    ]
    assert all(same(m.hidden, t) for m, t in zip(messages, ts, strict=True))
    with pytest.raises(WireError):
        decode_all(data[: cut % len(data)])
    single, bundled = decode_all(encode(reqs[0]))
    assert not bundled and single[0].request_id == 7


def test_bad_bundles_are_named():
    x = torch.zeros(2, 3)
    req, resp = ExpertRequest(0, 0, x), ExpertResponse(0, x, 0.0)
    with pytest.raises(WireError, match="only requests or only responses"):
        decode_all(encode_bundle([req, resp]))
    with pytest.raises(WireError, match="follow the bundle"):
        decode_all(encode_bundle([req]) + b"\x00")
    nested = bytearray(encode_bundle([req]))
    inner = encode_bundle([req])
    nested = bytes(nested[:10]) + struct.pack("<Q", len(inner)) + inner
    with pytest.raises(WireError, match="do not nest"):
        decode_all(nested)
    with pytest.raises(WireError, match="decode it with decode_all"):
        decode(encode_bundle([req]))
    with pytest.raises(WireError, match=r"1\.\.4096"):
        encode_bundle([])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_bundles_raise_only_wire_error(data):
    with contextlib.suppress(WireError):
        decode_all(b"WDMO\x01\x00\x03\x00" + data)


# ------------------------------------------------------------------------------------ runtime


@contextlib.contextmanager
def devices(shards, groups: int, tokens=None):
    """``groups`` device servers on loopback, shard i on device i % groups; always stopped."""
    servers = []
    try:
        for g in range(groups):
            token = tokens[g] if tokens else TOKEN
            servers.append(serve(shards[g::groups], port=0, token=token))
        yield servers
    finally:
        for server in servers:
            server.stop(0)


def placement_of(servers):
    return {key: s.address for s in servers for key in s.hosted}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    model = tiny_model("mixtral")
    shards = split_model(model, tmp_path_factory.mktemp("split"))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    return install(model), shards, ids, ref  # topk + in-process dispatcher reproduce the model


@pytest.fixture
def wm(split):
    handle = split[0]
    yield handle
    handle.set_dispatcher(handle.local_dispatcher())


def test_distributed_logits_equal_in_process(split, wm):
    _, shards, ids, ref = split
    with devices(shards, 3) as servers, static_bs(wm, placement_of(servers), timeout_s=10, token=TOKEN) as bs:
        logits = wm.model(ids).logits
        rows = bs.summary()["devices"]
    assert failures(bs) == {}
    assert sorted(k for s in servers for k in s.hosted) == [(la, e) for la in range(2) for e in range(8)]
    assert all(len(s.hosted) < 16 for s in servers)  # each device loaded only its own shards
    assert (logits - ref).abs().max() <= 1e-4
    assert all(r["answered"] > 0 and r["compute_s"] >= 0 for r in rows)


def test_wrong_token_is_refused_and_its_experts_dropped(split, wm):
    _, shards, ids, ref = split
    with devices(shards, 2, tokens=[TOKEN, "other"]) as servers:
        refused = set(servers[1].hosted)
        with static_bs(wm, placement_of(servers), timeout_s=10, token=TOKEN) as bs:
            logits = wm.model(ids).logits
        assert failures(bs) == {servers[1].address: {"UNAUTHENTICATED": len(refused)}}
        assert (logits - ref).abs().max() > 1e-4 and torch.isfinite(logits).all()
        channel = grpc.insecure_channel(servers[0].address)
        call = channel.unary_unary(RUN_EXPERT)
        good = encode(ExpertRequest(*servers[0].hosted[0], torch.randn(3, 32)))
        for metadata in (None, bearer("wrong")):
            with pytest.raises(grpc.RpcError) as err:
                call(good, timeout=5, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in err.value.details()
        old = bytearray(good)
        struct.pack_into("<H", old, 4, WIRE_VERSION + 1)
        narrow = encode(ExpertRequest(*servers[0].hosted[0], torch.randn(3, 31)))
        for bad, says in ((b"garbage!", "magic"), (bytes(old), "version"), (narrow, "[n, 32]")):
            with pytest.raises(grpc.RpcError) as err:
                call(bad, timeout=5, metadata=bearer(TOKEN))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in err.value.details()
        assert call(good, timeout=5, metadata=bearer(TOKEN))  # the device survived all of it
        channel.close()


def test_stopped_device_is_dropped_within_the_timeout(split, wm):
    _, shards, ids, ref = split
    with devices(shards, 2) as servers:
        servers[1].stop(0)
        with static_bs(wm, placement_of(servers), timeout_s=2, token=TOKEN) as bs:
            start = time.perf_counter()
            logits = wm.model(ids).logits
            elapsed = time.perf_counter() - start
    assert elapsed < 2 * 2 + 1  # two MoE layers, each bounded by one deadline
    assert list(failures(bs)) == [servers[1].address]
    assert torch.isfinite(logits).all() and (logits - ref).abs().max() > 1e-4


def test_silent_device_is_dropped_at_the_deadline(split, wm):
    """A listener that accepts and never answers: the call ends at the deadline, not later."""
    shards = split[1]
    with socket.socket() as silent, devices(shards, 2) as servers:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        placement = placement_of(servers[:1]) | {
            k: f"127.0.0.1:{silent.getsockname()[1]}" for k in servers[1].hosted
        }
        with static_bs(split[0], placement, timeout_s=0.5, token=TOKEN) as bs:
            start = time.perf_counter()
            out = bs.run_layer(0, {e: torch.randn(2, 32) for e in range(8)})
            elapsed = time.perf_counter() - start
    dead = {e for (layer, e) in servers[1].hosted if layer == 0}
    assert set(out) == set(range(8)) - dead
    assert [set(codes) for codes in failures(bs).values()] == [{"DEADLINE_EXCEEDED"}] and elapsed < 0.5 + 1.5
