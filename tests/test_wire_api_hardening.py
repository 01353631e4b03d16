"""Hostile but well-formed input: wire frames with absurd shapes, control JSON at the API's edges.

Each decoder may only return a valid value or raise its own error (WireError, ApiError)."""

import json
import math
import re
import struct

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from wdmoe.runtime import api
from wdmoe.runtime.wire import (
    DTYPES,
    KIND_BUNDLE,
    KIND_REQUEST,
    KIND_RESPONSE,
    MAX_NDIM,
    WIRE_VERSION,
    ExpertRequest,
    ExpertResponse,
    WireError,
    decode,
    decode_all,
    encode,
)

# ---------------------------------------------------------------------------------------- wire


def prefix(kind: int) -> bytes:
    return struct.pack("<4sHBB", b"WDMO", WIRE_VERSION, kind, 0)


def tensor_bytes(code: int, dims: list[int], payload: bytes = b"", ndim: int | None = None) -> bytes:
    head = struct.pack("<BB", code, len(dims) if ndim is None else ndim)
    return head + b"".join(struct.pack("<Q", d) for d in dims) + payload


def request_frame(tensor: bytes, deadline_s: float = 0.5) -> bytes:
    return prefix(KIND_REQUEST) + struct.pack("<IIQd", 1, 2, 3, deadline_s) + tensor


def response_frame(tensor: bytes, compute_s: float = 0.5) -> bytes:
    return prefix(KIND_RESPONSE) + struct.pack("<Qd", 3, compute_s) + tensor


def bundle(frames: list[bytes], count: int | None = None) -> bytes:
    head = prefix(KIND_BUNDLE) + struct.pack("<H", len(frames) if count is None else count)
    return head + b"".join(struct.pack("<Q", len(f)) + f for f in frames)


ABSURD = [[2**32, 2**32, 0], [0, 2**32, 2**32], [2**32, 0, 2**32, 2**32], [2**31, 2**31, 2**31, 0]]


@pytest.mark.parametrize("dims", ABSURD)
def test_empty_tensor_of_absurd_extent_is_a_wire_error(dims):
    tensor = tensor_bytes(1, dims)  # zero elements: the payload-size check alone passes
    for frame in (request_frame(tensor), response_frame(tensor)):
        with pytest.raises(WireError, match="counting empty dims as 1"):
            decode(frame)
        with pytest.raises(WireError, match="counting empty dims as 1"):
            decode_all(bundle([frame]))


def test_empty_tensors_of_ordinary_shape_still_travel():
    for shape in ((0, 4096), (0,), (3, 0, 7), (0, 2**20)):
        t = torch.empty(shape, dtype=torch.float32)
        assert decode(encode(ExpertRequest(0, 1, t))).hidden.shape == shape
        assert decode(encode(ExpertResponse(0, t, 0.0))).outputs.shape == shape
    with pytest.raises(WireError, match="above the limit of 1000 bytes"):
        decode(encode(ExpertRequest(0, 1, torch.empty(0, 251))), max_bytes=1000)


def test_torch_refusals_become_wire_errors():
    """A size limit so large that the extent check lets the absurd shape through: torch's own
    overflow must still surface as WireError."""
    with pytest.raises(WireError, match="cannot be built"):
        decode(request_frame(tensor_bytes(1, [2**32, 2**32, 0])), max_bytes=2**80)


DIMS = st.one_of(
    st.integers(0, 6),
    st.sampled_from([0, 1, 2**16, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**62, 2**63, 2**64 - 1]),
)
SECONDS = st.one_of(st.floats(0, 1e9), st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def adversarial_tensors(draw: st.DrawFn) -> bytes:
    """A tensor header with a known or any dtype code, adversarial dims, and a payload that is
    either exactly the size the shape claims (when small) or arbitrary bytes."""
    code = draw(st.one_of(st.sampled_from(sorted(DTYPES)), st.integers(0, 255)))
    dims = draw(st.lists(DIMS, max_size=MAX_NDIM + 3))
    ndim = draw(st.one_of(st.just(len(dims)), st.integers(0, 255)))
    itemsize = DTYPES[code].itemsize if code in DTYPES else 1
    size = math.prod(dims) * itemsize
    exact = draw(st.binary(min_size=size, max_size=size)) if size <= 256 else b""
    payload = draw(st.one_of(st.just(exact), st.binary(max_size=64)))
    return tensor_bytes(code, dims, payload, ndim)


@st.composite
def adversarial_frames(draw: st.DrawFn) -> bytes:
    tensor = draw(adversarial_tensors())
    make = draw(st.sampled_from([request_frame, response_frame]))
    return make(tensor, draw(SECONDS))


def valid_or_wire_error(decoder, data: bytes) -> None:
    """The decoder returns messages whose tensors match their frames, or raises WireError."""
    try:
        out = decoder(data)
    except WireError:
        return
    messages = out[0] if isinstance(out, tuple) else [out]
    for m in messages:
        t = m.hidden if isinstance(m, ExpertRequest) else m.outputs
        assert t.numel() * t.element_size() <= len(data) and t.dim() <= MAX_NDIM


@settings(max_examples=300, deadline=None)
@given(frame=adversarial_frames())
@example(frame=request_frame(tensor_bytes(1, [2**32, 2**32, 0])))
@example(frame=response_frame(tensor_bytes(6, [2**63, 0])))
def test_fuzzed_structured_frames_raise_only_wire_error(frame):
    valid_or_wire_error(decode, frame)
    valid_or_wire_error(decode_all, frame)


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(adversarial_frames(), min_size=1, max_size=4),
    count=st.one_of(st.none(), st.integers(0, 2**16 - 1)),
)
@example(frames=[response_frame(tensor_bytes(1, [2**32, 2**32, 0]))], count=None)
def test_fuzzed_structured_bundles_raise_only_wire_error(frames, count):
    valid_or_wire_error(decode_all, bundle(frames, count))


# ----------------------------------------------------------------------------------------- api

REG = {"v": 1, "slot": 0, "address": "127.0.0.1:50051", "experts": [[1, 2]], "name": "dev0"}
GEN = {"v": 1, "prompt": "hi", "max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 5}


def message(base: dict, **fields) -> bytes:
    return json.dumps(base | fields).encode()


def refused(parse, data: bytes, says: str) -> str:
    """The parser's ApiError, checked to name ``says`` and to stay short."""
    with pytest.raises(api.ApiError, match=says) as err:
        parse(data)
    assert len(str(err.value)) < 500, str(err.value)[:600]
    return str(err.value)


def test_deeply_nested_json_is_an_api_error():
    deep = b'{"v":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for parse in (lambda d: api.load(d, "Stats"), api.parse_registration, api.parse_generate):
        refused(parse, deep, "nested too deeply")
    ok = f'{{"v":1,"x":{"[" * (api.MAX_DEPTH - 1)}{"]" * (api.MAX_DEPTH - 1)}}}'.encode()
    assert api.load(ok, "Stats")["v"] == 1
    too_deep = f'{{"v":1,"x":{"[" * api.MAX_DEPTH}{"]" * api.MAX_DEPTH}}}'.encode()
    refused(lambda d: api.load(d, "Stats"), too_deep, "nested too deeply")


def test_brackets_inside_strings_do_not_count_as_nesting():
    prompt = '[{"\\"' * 5000 + "\\\\"
    assert api.parse_generate(message(GEN, prompt=prompt)).prompt == prompt


def test_a_recursion_error_of_the_json_decoder_is_an_api_error(monkeypatch):
    monkeypatch.setattr(api, "MAX_DEPTH", 10**9)  # the pre-check off: json.loads itself recurses
    deep = b'{"v":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refused(lambda d: api.load(d, "Stats"), deep, "nested too deeply")


def test_integers_past_pythons_digit_limit_are_api_errors():
    refused(api.parse_registration, b'{"v":1,"slot":' + b"1" * 5000 + b"}", "not JSON")


@pytest.mark.parametrize("seed", [-1, -(2**63) - 1, 2**63, 2**64, 2**64 + 1, 10**30])
def test_seeds_outside_the_generator_range_are_refused(seed):
    refused(api.parse_generate, message(GEN, seed=seed), r"'seed' must be in \[0, 2\^63\)")


def test_seeds_inside_the_range_seed_torch():
    for seed in (0, 1, 2**32, 2**63 - 1):
        assert api.parse_generate(message(GEN, seed=seed)).seed == seed
        torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_huge_integer_sampling_values_are_api_errors(field):
    refused(api.parse_generate, message(GEN, **{field: 10**400}), "temperature")


@pytest.mark.parametrize(
    ("base", "parse", "field"),
    [
        (GEN, api.parse_generate, "prompt"),
        (GEN, api.parse_generate, "system"),
        (REG, api.parse_registration, "name"),
        (REG, api.parse_registration, "address"),
    ],
)
@pytest.mark.parametrize("text", ["\ud800", "ok\udfffok", "\udc00\ud800"])
def test_lone_surrogates_are_refused_naming_the_field(base, parse, field, text):
    data = message(base, **{field: text})
    assert b"\\ud" in data  # json escapes them: the message itself is valid JSON
    refused(parse, data, f"'{field}'")


GOOD_ADDRESSES = [
    "127.0.0.1:50051",
    "localhost:1",
    "dev-3.cell.example.com:65535",
    "[::1]:50051",
    "[fe80::1%eth0]:8080",
    "[::ffff:10.0.0.1]:443",
    "h" * 253 + ":80",
]
BAD_ADDRESSES = [
    "host:٥٠٠٥٠",  # Arabic-Indic digits pass str.isdigit
    "host:５００５１",  # fullwidth digits
    "host:0",
    "host:65536",
    "host:123456",
    "host:+80",
    "host:8_0",
    "host: 80",
    "host:80\n",
    ":80",
    "host:",
    "host",
    "::1:50051",  # unbracketed IPv6
    "[::1]",
    "hóst:80",
    "h" * 254 + ":80",
    "x" * 1_000_000 + ":1",
]


@pytest.mark.parametrize("address", GOOD_ADDRESSES)
def test_good_addresses_register(address):
    assert api.parse_registration(message(REG, address=address)).address == address


@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=lambda a: repr(a[:20]))
def test_bad_addresses_are_refused_without_echoing_them(address):
    said = refused(api.parse_registration, message(REG, address=address), "'address'")
    assert repr(address[:20])[1:-1] in said  # the value's start, cut short


def test_names_are_bounded():
    name = "n" * api.MAX_NAME_CHARS
    assert api.parse_registration(message(REG, name=name)).name == name
    refused(api.parse_registration, message(REG, name=name + "n"), "'name' has 129 characters, at most 128")
    refused(api.parse_registration, message(REG, name="n" * 500_000), "'name'")


def test_wrong_values_are_quoted_briefly():
    refused(api.parse_registration, message(REG, slot="s" * 500_000), "'slot' must be int")
    refused(api.parse_registration, message(REG, experts=[[0, 1]] * 100_000 + ["x"]), "'experts'")
    refused(api.parse_generate, message(GEN, prompt=[[[[[["deep"]]]]]] * 50_000), "'prompt' must be str")
    refused(api.parse_generate, message(GEN, v="v" * 500_000), "API version")


def test_slots_and_experts_fit_the_wire():
    refused(api.parse_registration, message(REG, slot=2**32), r"'slot' must be in \[0, 2\^32\)")
    refused(api.parse_registration, message(REG, experts=[[2**32, 0]]), r"\[0, 2\^32\)")
    refused(api.parse_registration, message(REG, experts=[[0, True]]), "'experts'")
    reg = api.parse_registration(message(REG, slot=2**32 - 1, experts=[[2**32 - 1, 0]]))
    assert reg.slot == 2**32 - 1 and reg.experts == ((2**32 - 1, 0),)


def test_a_registration_without_a_data_plane_still_parses_and_one_with_it_round_trips():
    old = api.parse_registration(message(REG))  # as devices sent it before the data plane
    assert (old.data_address, old.data_version) == ("", 0)
    new = api.Registration(3, "10.0.0.7:50051", ((1, 2),), "dev3", "10.0.0.7:50061", 1)
    assert api.parse_registration(api.encode_registration(new)) == new
    assert b'"data"' not in api.encode_registration(old)
    later = api.parse_registration(message(REG, data={"v": 7, "address": "h:1", "extra": True}))
    assert (later.data_address, later.data_version) == ("h:1", 7)  # the BS decides what it speaks


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("h:1", "'data' must be dict"),
        ({"address": "h:1"}, "lacks the field 'v'"),
        ({"v": 0, "address": "h:1"}, r"'v' must be in 1\.\.255"),
        ({"v": True, "address": "h:1"}, "'v' must be int"),
        ({"v": 1}, "lacks the field 'address'"),
        ({"v": 1, "address": "::1:50061"}, "data field 'address' must be HOST:PORT"),
        ({"v": 1, "address": "x" * 100_000 + ":1"}, "data field 'address'"),
    ],
)
def test_a_bad_data_plane_in_a_registration_is_named(data, says):
    refused(api.parse_registration, message(REG, data=data), says)


def test_booleans_are_still_not_versions():
    for v in (True, "1", None, [1]):
        refused(api.parse_generate, message(GEN, v=v), "API version")


# ------------------------------------------------------------------------------- api, fuzzed

SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc00", "٥٠٠٥٠"])
STRINGS = st.one_of(
    st.text(max_size=20),
    SURROGATES,
    st.lists(st.one_of(st.characters(), SURROGATES), max_size=6).map("".join),
    st.sampled_from(GOOD_ADDRESSES[:-1] + BAD_ADDRESSES[:-1]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70_000),
    st.integers(-(10**30), 10**30),
    st.sampled_from([2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    STRINGS,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=3),
    max_leaves=10,
)
ABSENT = object()


@st.composite
def mutated(draw: st.DrawFn, base: dict) -> bytes:
    """``base`` with one to three fields dropped or replaced by an arbitrary JSON value (few enough
    that the parser often gets past the others and must check the odd one)."""
    obj = dict(base)
    for name in draw(st.sets(st.sampled_from(sorted(base)), min_size=1, max_size=3)):
        new = draw(st.one_of(st.just(ABSENT), JSON_VALUES))
        if new is ABSENT:
            del obj[name]
        else:
            obj[name] = new
    return json.dumps(obj).encode()


ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.%A-Za-z0-9_-]+\]|[A-Za-z0-9_.-]{1,253}):[0-9]{1,5}")


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parsed_or_refused(parse, data: bytes):
    try:
        return parse(data)
    except api.ApiError as err:
        said = str(err)
        assert len(said) < 1000 and ("message" in said or "field" in said or "Generate" in said), said
        return None


@settings(max_examples=200, deadline=None)
@given(data=mutated(REG | {"slot": 3, "experts": [[0, 1], [2, 3]], "data": {"v": 1, "address": "h:2"}}))
def test_fuzzed_registrations_parse_within_range_or_raise_api_error(data):
    reg = parsed_or_refused(api.parse_registration, data)
    if reg is None:
        return
    assert type(reg.slot) is int and 0 <= reg.slot < 2**32
    assert ADDRESS.fullmatch(reg.address) and reg.address.isascii()
    assert 0 < int(reg.address.rpartition(":")[2]) < 65536
    assert reg.experts and all(type(v) is int and 0 <= v < 2**32 for pair in reg.experts for v in pair)
    assert isinstance(reg.name, str) and len(reg.name) <= 128 and utf8(reg.name)
    assert reg.data_address == "" or ADDRESS.fullmatch(reg.data_address)
    assert type(reg.data_version) is int and (reg.data_version == 0) == (reg.data_address == "")


@settings(max_examples=200, deadline=None)
@given(data=mutated(GEN | {"chat": False, "system": "be brief"}))
def test_fuzzed_generate_requests_parse_within_range_or_raise_api_error(data):
    req = parsed_or_refused(api.parse_generate, data)
    if req is None:
        return
    assert isinstance(req.prompt, str) and utf8(req.prompt)
    assert req.system is None or (isinstance(req.system, str) and utf8(req.system))
    assert type(req.max_new_tokens) is int and 1 <= req.max_new_tokens <= 65536
    assert type(req.temperature) is float and 0.0 <= req.temperature <= 100.0
    assert type(req.top_p) is float and 0.0 < req.top_p <= 1.0
    assert type(req.seed) is int and 0 <= req.seed < 2**63
    assert type(req.chat) is bool
    torch.Generator().manual_seed(req.seed)
