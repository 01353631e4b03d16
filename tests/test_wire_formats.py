"""Wire formats sized to the link (issue 14 item 4): codecs and their error bounds, frames in every
format, devices answering in the format asked for, pricing from the real frame bits (the simulator
and the BS alike), the adaptive rule on hand-made SNRs, and float32 bit-identical to no format."""

import contextlib
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny import TINY, tiny_model
from wdmoe import formats
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError
from wdmoe.formats import FORMATS, FormatError, choose_formats, round_trip
from wdmoe.latency.cell import Cell
from wdmoe.latency.model import ExpertCost
from wdmoe.models.install import install
from wdmoe.runtime.bs import RuntimeSettings, runtime_scenario
from wdmoe.runtime.device import DeviceWorker
from wdmoe.runtime.wire import (
    KIND_REQUEST,
    KIND_RESPONSE,
    WIRE_VERSION,
    ExpertRequest,
    ExpertResponse,
    WireError,
    decode,
    decode_all,
    encode,
    encode_bundle,
    encoded_size,
    in_format,
    value_of,
)
from wdmoe.simulate import SimSettings, Simulation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.randint(4, 120, (1, 7), generator=torch.Generator().manual_seed(11))
SLACK = 1 + 2.0**-20  # float32 rounding of x/s and q·s on top of the format's own bound


def hidden(rows: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, with an outlier, as hidden states have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * torch.logspace(-3, 3, max(rows, 1))[:rows, None]
    if rows:
        x[0, 0] = 40.0 * x[0].abs().max()
    return x


# --- codecs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_round_trip_stays_within_the_formats_bound(fmt, rows):
    x = hidden(rows)
    enc = formats.encode(x, fmt)
    assert enc.values.dtype == formats.STORAGE[fmt] and enc.values.shape == x.shape
    assert (enc.scales is None) == (fmt not in formats.SCALED)
    y = formats.decode(enc)
    assert y.shape == x.shape and y.dtype == torch.float32
    err, bound = (y - x).abs(), formats.error_bound(x, fmt)
    assert bool((err <= bound * SLACK + 1e-30).all()), f"{fmt}: worst excess {(err - bound).max()}"
    if fmt == "float32":
        assert torch.equal(y, x) and round_trip(x, fmt) is x
    elif rows:
        assert (err > 0).any()  # a lossy format loses something on these rows


def test_int8_error_is_at_most_half_a_step_of_the_row_scale():
    x = hidden(5)
    enc = formats.encode(x, "int8")
    assert enc.scales is not None
    torch.testing.assert_close(enc.scales, x.abs().amax(dim=1) / 127, rtol=0, atol=0)
    err = (formats.decode(enc) - x).abs()
    assert bool((err <= enc.scales[:, None] / 2 * SLACK).all())
    assert enc.values.abs().max() == 127  # each row's largest value uses the full range


def test_relative_bounds_of_the_float_formats_are_tight_enough_to_mean_something():
    x = torch.linspace(1.0, 2.0, 1001)[None, :]
    for fmt, u in (("bfloat16", 2.0**-8), ("float16", 2.0**-11), ("fp8", 2.0**-4)):
        rel = ((formats.decode(formats.encode(x, fmt)) - x).abs() / x).max().item()
        assert u / 2 < rel <= u * SLACK, (fmt, rel)


def test_non_finite_rows_decode_as_nan_and_leave_the_other_rows_alone():
    x = hidden(4)
    x[1, 3], x[2, 0] = float("inf"), float("nan")
    for fmt in formats.SCALED:
        y = formats.decode(formats.encode(x, fmt))
        assert y[1].isnan().all() and y[2].isnan().all()
        ok = [0, 3]
        assert bool(((y[ok] - x[ok]).abs() <= formats.error_bound(x[ok], fmt) * SLACK).all())
    assert formats.decode(formats.encode(x, "bfloat16"))[1, 3] == float("inf")
    assert formats.decode(formats.encode(torch.tensor([[7e4]]), "float16")).isinf().all()  # > 65504


def test_all_zero_rows_and_empty_rows_survive():
    z = torch.zeros(2, 8)
    for fmt in FORMATS:
        assert torch.equal(formats.decode(formats.encode(z, fmt)), z)
        assert formats.decode(formats.encode(torch.zeros(3, 0), fmt)).shape == (3, 0)


def test_codecs_refuse_what_they_cannot_carry():
    with pytest.raises(FormatError, match=r"int4.*allowed: float32"):
        formats.encode(torch.zeros(1, 4), "int4")
    with pytest.raises(FormatError, match="floating tensor"):
        formats.encode(torch.zeros(1, 4, dtype=torch.int32), "int8")
    with pytest.raises(FormatError, match="floating tensor"):
        formats.encode(torch.tensor(1.0), "int8")


def test_bits_per_element_count_the_row_scale():
    assert formats.row_bits("float32", 576) == 576 * 32
    assert formats.row_bits("bfloat16", 576) == formats.row_bits("float16", 576) == 576 * 16
    assert formats.row_bits("int8", 576) == formats.row_bits("fp8", 576) == 576 * 8 + 32
    assert formats.bits_per_element("int8", 576) == pytest.approx(8 + 32 / 576)


# --- frames -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_frames_carry_every_format_and_their_size_is_exact(fmt):
    x = hidden(3, 32)
    values, scales = in_format(x, fmt)
    req = ExpertRequest(1, 2, values, 9, 0.5, scales, answer=fmt)
    data = encode(req)
    assert len(data) == encoded_size((3, 32), fmt)
    got = decode(data)
    assert isinstance(got, ExpertRequest) and got.answer == fmt
    assert torch.equal(got.hidden.view(torch.uint8), values.contiguous().view(torch.uint8))
    assert torch.equal(value_of(got.hidden, got.scales), formats.decode(formats.encode(x, fmt)))
    resp = ExpertResponse(9, values, 0.25, scales)
    assert len(encode(resp)) == encoded_size((3, 32), fmt, KIND_RESPONSE)
    messages, bundled = decode_all(encode_bundle([resp, resp]))
    assert bundled and all(
        torch.equal(value_of(m.outputs, m.scales), value_of(values, scales)) for m in messages
    )


def test_frames_of_before_formats_still_decode_as_they_did():
    old = (
        struct.pack("<4sHBB", b"WDMO", WIRE_VERSION, KIND_REQUEST, 0)
        + encode(ExpertRequest(0, 1, hidden(2)))[8:]
    )
    req = decode(old)
    assert isinstance(req, ExpertRequest) and req.answer == "" and req.scales is None


def test_scaled_frames_are_decoded_strictly():
    values, scales = in_format(hidden(2, 8), "int8")
    data = bytearray(encode(ExpertResponse(1, values, 0.0, scales)))
    data[7] = 9  # an answer format only a request may name
    with pytest.raises(WireError, match="unknown flags"):
        decode(bytes(data))
    bad = bytearray(encode(ExpertRequest(0, 0, values, 1, 0.0, scales)))
    bad[7] = 77
    with pytest.raises(WireError, match="unknown flags"):
        decode(bytes(bad))
    with pytest.raises(WireError, match="row scales must be finite"):
        decode(encode(ExpertRequest(0, 0, values, 1, 0.0, -scales)))
    good = encode(ExpertRequest(0, 0, values, 1, 0.0, scales))
    with pytest.raises(WireError, match="needs 24 bytes"):
        decode(good[:-1])
    with pytest.raises(WireError, match="row scales of"):
        encode(ExpertRequest(0, 0, values, 1, 0.0, scales[:1]))
    with pytest.raises(WireError, match="cannot travel without row scales"):
        encode(ExpertRequest(0, 0, formats.encode(hidden(1, 4), "fp8").values))
    with pytest.raises(WireError, match="answer format 'int4'"):
        encode(ExpertRequest(0, 0, hidden(1, 4), answer="int4"))


@settings(max_examples=200, deadline=None)
@given(
    code=st.sampled_from([9, 10]),
    dims=st.lists(st.integers(0, 5), max_size=3),
    payload=st.binary(max_size=80),
    answer=st.integers(0, 12),
)
def test_fuzzed_scaled_frames_raise_only_wire_error(code, dims, payload, answer):
    tensor = struct.pack("<BB", code, len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + payload
    frame = struct.pack("<4sHBB", b"WDMO", WIRE_VERSION, KIND_REQUEST, answer)
    frame += struct.pack("<IIQd", 1, 2, 3, 0.5) + tensor
    with contextlib.suppress(WireError):
        msg = decode(frame)
        assert isinstance(msg, ExpertRequest) and msg.scales is not None
        assert msg.hidden.numel() * msg.hidden.element_size() <= len(frame)


# --- the device answers in the format asked for ------------------------------------------------


@pytest.mark.parametrize("ask", ["", *FORMATS])
def test_a_device_decodes_any_format_and_answers_in_the_one_asked_for(shards_by_family, ask):
    worker = DeviceWorker.from_shards([shards_by_family["mixtral"][(0, 0)]])
    x = hidden(3, 32)
    exact = worker.run_one(ExpertRequest(0, 0, x, 1)).outputs
    for sent in FORMATS:
        values, scales = in_format(x, sent)
        reply = decode(
            worker.respond(encode(ExpertRequest(0, 0, values, 1, 5.0, scales, ask)), time.monotonic())
        )
        assert isinstance(reply, ExpertResponse)
        answer = ask or sent
        assert reply.outputs.dtype == formats.STORAGE[answer] and (reply.scales is not None) == (
            answer in formats.SCALED
        )
        y = value_of(reply.outputs, reply.scales).float()
        assert (y - exact).abs().max() <= 0.1 * exact.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "adaptive"])
def test_the_runtime_carries_the_format_and_books_its_real_bytes(lab_factory, fmt):
    lab = lab_factory(devices=4, settings=RuntimeSettings(wire_dtype=fmt))
    got, want = lab.wm.model(IDS).logits, lab.ref.model(IDS).logits
    assert (got - want).abs().max().item() < 0.1 and not torch.equal(got, want)
    assert lab.bs.scenario.wire.format == fmt
    rows = lab.bs.summary()["devices"]
    assert all(r["failures"] == {} for r in rows) and sum(r["bytes_dl"] for r in rows) > 0


# --- pricing from the real frame bits -----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_latency_model_prices_the_frames_bits(fmt):
    scenario = runtime_scenario(load_scenario("paper", TINY), fmt)
    cost = ExpertCost.from_config(scenario)
    d = scenario.model.hidden_size
    tokens = np.array([0, 1, 5, 40])
    want = [0] + [8 * encoded_size((n, d), fmt) for n in tokens[1:]]
    assert cost.message_bits(tokens).tolist() == want


def test_adaptive_views_price_each_device_in_its_own_format():
    scenario = runtime_scenario(load_scenario("paper", TINY), "adaptive")
    snap = Cell(scenario, 4, seed=1).snapshot(0.0)
    cost, d = snap.view.cost, scenario.model.hidden_size
    snr = formats.link_snr_db(snap.estimate)
    assert cost.formats == choose_formats(snr, ("bfloat16", "int8"), (15.0,))
    assert set(cost.formats) == {"bfloat16", "int8"}  # this seed has strong and weak links
    bits = cost.message_bits(np.full(len(snr), 3))
    assert bits.tolist() == [8 * encoded_size((3, d), f) for f in cost.formats]


def test_the_simulator_and_the_bs_price_adaptive_frames_alike(lab_factory):
    """As tests/test_one_core.py, with each device in its adaptive format: same waits, same UL."""
    settings = RuntimeSettings(emulate_links=True, allocator="minmax", wire_dtype="adaptive")
    still = ["cell.num_devices=8", "channel.coherence_s=10", "mobility.model=static"]
    cell = load_scenario("lab", still)
    snr = formats.link_snr_db(Cell(cell, 1, cell.seed).snapshot(0.0).estimate)
    split = [*still, f"wire.adaptive_snr_db=[{float(np.median(snr))}]"]  # strong and weak links
    lab = lab_factory(devices=8, settings=settings, overrides=split)
    lab.bs.t0 = time.monotonic()
    lab.wm.model(IDS)
    at_bs = lab.bs.last_priced
    assert len(set(lab.bs.cell.snapshot(0.0).view.cost.formats)) == 2
    sim = Simulation(lab.ref, lab.bs.scenario, SimSettings(allocator="minmax"))
    with sim.attached():
        lab.ref.model(IDS)
    step = sim.records[-1]
    assert at_bs is not None
    np.testing.assert_allclose(at_bs.wait_s, step.waiting_s, rtol=1e-12)
    np.testing.assert_allclose(at_bs.latency.devices.uplink_s, step.uplink_s, rtol=1e-12)


# --- the adaptive rule --------------------------------------------------------------------------


def test_the_adaptive_rule_on_hand_made_snrs():
    snr = [30.0, 15.0, 14.9, -np.inf, np.nan]
    assert choose_formats(snr, ("bfloat16", "int8"), (15.0,)) == ("bfloat16",) * 2 + ("int8",) * 3
    three = choose_formats([40, 20, 10, 0], ("float32", "float16", "fp8"), (25.0, 5.0))
    assert three == ("float32", "float16", "float16", "fp8")
    assert choose_formats([1.0, 99.0], ("int8",), ()) == ("int8", "int8")


def test_the_adaptive_rule_and_wire_config_are_validated():
    with pytest.raises(FormatError, match="exactly 1 thresholds"):
        choose_formats([0.0], ("bfloat16", "int8"), ())
    with pytest.raises(FormatError, match="strictly decreasing"):
        choose_formats([0.0], ("float32", "bfloat16", "int8"), (5.0, 10.0))
    with pytest.raises(ConfigError, match=r"wire\.format = 'int4'.*adaptive"):
        load_scenario("paper", ["wire.format=int4"])
    with pytest.raises(ConfigError, match=r"wire\.adaptive_formats"):
        load_scenario("paper", ["wire.adaptive_formats=['bfloat16', 'int3']"])
    with pytest.raises(ValueError, match="wire_dtype"):
        RuntimeSettings(wire_dtype="int4")


# --- the simulator applies the format ----------------------------------------------------------


def simulate(fmt: str) -> torch.Tensor:
    wm = install(tiny_model("mixtral"))
    scenario = load_scenario("paper", [*TINY, f"wire.format={fmt}"])
    sim = Simulation(wm, scenario, SimSettings(seed=2))
    with sim.attached():
        logits = wm.model(IDS).logits
    assert len(sim.records) == 1
    return logits


def test_float32_on_the_wire_is_bit_identical_and_int8_is_not():
    none, f32, int8 = simulate("none"), simulate("float32"), simulate("int8")
    assert torch.equal(none, f32)
    assert not torch.equal(none, int8) and (int8 - none).abs().max().item() < 0.1
