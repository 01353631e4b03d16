"""Continuous batching (wdmoe.serving): the running batch's caches, the engine against each request
alone, the simulator pricing a batched step once on its joint loads, the BS serving users
together with per-request books, and the simulator's load study."""

import threading
import time

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from lab import TOKEN
from tiny import tiny_model, tiny_tokenizer
from wdmoe.config import load_scenario
from wdmoe.generate import encode_prompt, generate
from wdmoe.latency.pricing import Calls, price_layer, rows_overheads
from wdmoe.models.install import install
from wdmoe.models.requests import serving_rows
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings, fit_scenario
from wdmoe.runtime.client import BSClient
from wdmoe.serving import Engine, Job
from wdmoe.serving.batch import sample, single
from wdmoe.serving.sim_load import simulate_load
from wdmoe.simulate import SimSettings, Simulation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["what is the router", "the expert of the cell", "a token", "router router expert is"]


def cache_of(rows: list[list[float]]) -> DynamicCache:
    """A one-layer cache whose keys/values [B, 1, L, 1] hold the given numbers."""
    t = torch.tensor(rows, dtype=torch.float32)[:, None, :, None]
    return DynamicCache([(t.clone(), t.clone() * 10)])


def test_a_row_joins_left_padded_and_finished_rows_leave_with_their_padding():
    batch = single(cache_of([[1.0, 2.0]]), token=7)
    batch.join(cache_of([[3.0, 4.0, 5.0, 6.0]]), token=8)
    keys = batch.cache.layers[0].keys[:, 0, :, 0]
    assert keys.tolist() == [[0.0, 0.0, 1.0, 2.0], [3.0, 4.0, 5.0, 6.0]]
    assert batch.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]] and batch.last.tolist() == [7, 8]
    assert batch.real_lengths().tolist() == [2, 4]
    inputs = batch.step_inputs()  # next positions: each row's own length
    assert inputs["position_ids"].tolist() == [[2], [4]] and inputs["attention_mask"].shape == (2, 5)
    batch.cache.update(torch.full((2, 1, 1, 1), 9.0), torch.full((2, 1, 1, 1), 90.0), 0)  # the forward
    batch.keep([0])  # the long row leaves: the columns that were padding in every row go
    assert batch.mask.tolist() == [[1, 1, 1]] and batch.cache.layers[0].values.shape[2] == 3
    assert batch.cache.layers[0].values[0, 0, :, 0].tolist() == [10.0, 20.0, 90.0]


def test_sampling_greedy_is_argmax_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert sample(logits, 0.0, 1.0, None) == 0
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.75, gen) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reach 0.75: tokens 2 and 3 are outside the nucleus
    again = torch.Generator().manual_seed(3)
    assert [sample(logits, 1.0, 1.0, again) for _ in range(5)] == [
        sample(logits, 1.0, 1.0, g) for g in [torch.Generator().manual_seed(3)] for _ in range(5)
    ]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_engine_greedy_answers_equal_each_request_alone(family):
    wm, tok = install(tiny_model(family)), tiny_tokenizer()
    alone = [generate(wm, tok, p, max_new_tokens=7, chat=False, record=False).text for p in PROMPTS]
    engine = Engine(wm, frozenset(), max_batch=3)  # 4 requests, 3 at once: the 4th joins later
    jobs = [engine.submit(Job(encode_prompt(tok, p, False, None)[0], 7)) for p in PROMPTS]
    while engine.busy():
        engine.step()
    assert [tok.decode(j.wait(0), skip_special_tokens=True) for j in jobs] == alone
    assert engine.forwards < 4 * 7  # batched: fewer forwards than one per request and token


def test_a_request_whose_callback_fails_ends_alone_and_eos_ends_a_request():
    wm, tok = install(tiny_model("mixtral")), tiny_tokenizer()
    ids = [encode_prompt(tok, p, False, None)[0] for p in PROMPTS[:3]]

    def boom(_: int) -> None:
        raise RuntimeError("the user went away")

    engine = Engine(wm, frozenset(), max_batch=4)
    ok, gone = engine.submit(Job(ids[0], 5)), engine.submit(Job(ids[1], 5, on_token=boom))
    while engine.busy():
        engine.step()
    assert len(ok.wait(0)) == 5 and isinstance(gone.error, RuntimeError) and len(gone.tokens) == 1
    first = ok.tokens[0]  # that request's first token, made an end-of-sequence token
    eos_engine = Engine(wm, frozenset({first}), max_batch=4)
    short = eos_engine.submit(Job(ids[0], 5))
    while eos_engine.busy():
        eos_engine.step()
    assert short.wait(0) == [first]


def test_the_simulator_prices_a_batched_step_once_on_the_rows_joint_loads():
    wm = install(tiny_model("mixtral"))
    scenario = fit_scenario(load_scenario("lab", ["cell.num_devices=4"]), wm, "mixtral")
    sim = Simulation(wm, scenario, SimSettings(allocator="minmax", channel_moves=False))
    ids = torch.tensor([[5], [9], [17]])
    with sim.attached(), torch.no_grad(), serving_rows(["a", "b", "c"], [0, 0, 0]):
        sim.time_s = 3.0
        wm.model(input_ids=ids)
    a, b, c = sim.records
    assert a.total_s == b.total_s == c.total_s  # one step: the same times for every row
    assert sim.time_s == pytest.approx(3.0 + a.total_s)
    snap = sim.cell.snapshot(3.0)
    for layer in range(a.device_tokens.shape[0]):  # each layer priced on the three rows' loads
        tokens = a.device_tokens[layer]
        assert tokens.sum() == sum(r.expert_tokens[layer].sum() for r in (a, b, c))
        rule = SimSettings().deadline
        priced = price_layer(snap.view, snap.true, sim.allocator, tokens, Calls(rule, snap.true_up))
        assert a.waiting_s[layer] == pytest.approx(float(priced.wait_s))
    bs_s, head_s = rows_overheads(scenario, [1, 1, 1], [0, 0, 0])
    assert a.head_s == pytest.approx(head_s) and a.bs_s == pytest.approx(bs_s)


def test_the_simulated_load_run_times_every_request_and_refuses_beyond_the_queue():
    wm, tok = install(tiny_model("mixtral")), tiny_tokenizer()
    tok.chat_template = None
    scenario = fit_scenario(load_scenario("lab", ["cell.num_devices=4"]), wm, "mixtral")
    arrivals = np.array([0.0, 0.0, 0.0, 0.001, 5.0])
    seen = []
    records = simulate_load(
        wm, tok, scenario, SimSettings(), prompts=PROMPTS, arrivals_s=arrivals, max_new_tokens=4,
        max_batch=2, max_queue=1, rate_per_s=None, on_record=seen.append,
    )  # fmt: skip
    assert seen == records and sorted(r.request for r in records) == [0, 1, 2, 3, 4]
    by = {r.request: r for r in records}
    assert by[2].status == "ok"  # 2 running, 1 waiting: the 4th at the same moment is refused
    assert by[3].status == "refused" and by[3].new_tokens == 0 and by[3].error
    for r in (by[0], by[1], by[2], by[4]):
        assert r.status == "ok" and r.new_tokens == 4 and 0 < r.ttft_s <= r.finished_s - r.arrival_s
    assert by[2].ttft_s > by[0].ttft_s  # it waited for a place in the batch
    assert by[4].ttft_s < by[2].ttft_s  # it arrived to an idle BS


def test_the_bs_serves_users_together_with_answers_and_books_of_their_own(lab_factory):
    lab = lab_factory("mixtral", devices=4, settings=RuntimeSettings(max_active=8))
    req = lambda i: api.GenerateRequest(PROMPTS[i % 4], max_new_tokens=6, chat=False)  # noqa: E731
    alone = [lab.client.generate(req(i))["text"] for i in range(4)]
    results: dict[int, dict] = {}

    def user(i: int) -> None:
        with BSClient(lab.server.address, TOKEN) as c:
            results[i] = c.generate(req(i))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    before = lab.bs.engine.forwards
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i]["text"] for i in range(8)] == [alone[i % 4] for i in range(8)]
    assert lab.bs.engine.forwards - before < 8 * 6  # the users' decode steps were shared
    for m in results.values():
        assert m["new_tokens"] == 6 and m["forwards"] == 6 and m["expert_calls"] > 0
        assert m["bytes_dl"] > 0 and m["token_predicted_s"] > 0 and m["dropped"] == 0


STILL_CELL = ["channel.fading=none", "mobility.model=static", "channel.shadowing_std_db=0"]


def test_the_bs_and_the_simulator_price_a_batched_step_alike(lab_factory):
    """Three users' tokens in one forward: the BS (its devices called once per layer for all)
    and the simulator price the step the same, on the joint loads, with every row's BS compute."""
    from wdmoe.runtime.books import RequestStats

    lab = lab_factory("mixtral", devices=4, overrides=STILL_CELL, settings=RuntimeSettings(grace_s=5.0))
    ids = torch.tensor([[5, 8, 2], [9, 9, 4], [17, 3, 11]])
    requests = [RequestStats(i, 4) for i in range(3)]
    with torch.no_grad(), serving_rows(requests, [0, 0, 0]):
        got = lab.wm.model(input_ids=ids).logits
    sim = Simulation(lab.ref, lab.bs.scenario, SimSettings())
    with sim.attached(), torch.no_grad(), serving_rows(["a", "b", "c"], [0, 0, 0]):
        want = lab.ref.model(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-4
    priced = lab.bs.last_priced
    assert priced is not None and len(sim.records) == 3
    assert sim.records[0].total_s == pytest.approx(float(priced.latency.total_s), rel=1e-9)
    np.testing.assert_allclose(sim.records[0].device_tokens, priced.device_tokens)
    for r in requests:  # each request's books: the step's prediction, its own calls
        assert r.forwards[0]["predicted_s"] == pytest.approx(float(priced.latency.total_s))
        assert r.expert_calls > 0 and r.context_tokens == 3
    calls = sum(d["calls"] for d in lab.bs.summary()["devices"])
    assert calls > 0 and sum(r.expert_calls for r in requests) >= calls  # a call carries ≥ 1 request


def test_eight_users_at_once_all_finish_while_a_device_is_killed(lab_factory):
    lab = lab_factory("mixtral", devices=4, settings=RuntimeSettings(heartbeat_s=0.2, max_active=8))
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def user(i: int) -> None:
        try:
            with BSClient(lab.server.address, TOKEN) as c:
                req = api.GenerateRequest(PROMPTS[i % 4], max_new_tokens=12, chat=False)
                results[i] = c.generate(req)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while lab.bs.engine.forwards < 10 and time.monotonic() < deadline:
        time.sleep(0.005)
    lab.devices[2].stop()  # mid-answer: the users' requests are in the batch
    for t in threads:
        t.join(120)
    assert not errors and sorted(results) == list(range(8))
    assert all(m["new_tokens"] == 12 for m in results.values())
    assert sum(m["dropped"] for m in results.values()) > 0  # its experts were dropped, not waited for
    assert lab.bs.summary()["devices"][2]["usable"] is False
