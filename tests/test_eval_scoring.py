"""Scorers on a tiny random MoE: partial scoring, perplexity windows, generation, the harness."""

import json
import math
import uuid

import pytest
import torch

from tiny import tiny_model, tiny_tokenizer
from wdmoe.errors import ConfigError
from wdmoe.eval import multiple_choice
from wdmoe.eval.formats import register_jsonl_task
from wdmoe.eval.generation import generate_batch, score_exact_match
from wdmoe.eval.harness import EvalSettings, evaluate_task
from wdmoe.eval.multiple_choice import choice_scores, paired_difference, score_partial
from wdmoe.eval.perplexity import score_last_word, score_perplexity, windows
from wdmoe.eval.tasks import ChoiceItem, ContinuationItem, Document, GenerationItem, PartialItem

TEXT = (
    "the router is fast and the channel is slow so the base station sends the token to a device "
    "with a large bandwidth and the expert answers the question once upon a time there was a small cell"
)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("mixtral", seed=1), tiny_tokenizer()


def hand_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation ids | context ids), one unpadded forward, a plain loop over positions."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))


def test_winogrande_partial_scoring_matches_hand_loglikelihood(lm):
    model, tok = lm
    contexts = ("the router is fast so the device", "the router is fast so the channel")
    continuation = " is slow and the token waits"
    lls = [hand_loglikelihood(model, tok, c, continuation) for c in contexts]
    best = max(range(2), key=lls.__getitem__)
    assert abs(lls[0] - lls[1]) > 1e-4  # the test can tell the options apart
    right = PartialItem(contexts, continuation, best)
    wrong = PartialItem(contexts, continuation, 1 - best)
    assert score_partial(model, tok, [right]).acc == 1.0
    assert score_partial(model, tok, [wrong]).acc == 0.0
    both = score_partial(model, tok, [right, wrong, right], batch_size=2)
    assert both.n == 3 and both.acc == pytest.approx(2 / 3) and both.outcomes == "101"
    assert both.acc_stderr == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))


def test_choice_outcomes_follow_the_items_and_pair_two_runs():
    two = (" a", " bb")
    items = [ChoiceItem("q", two, 0), ChoiceItem("q", two, 1), ChoiceItem("q", (" a",), 0)]
    s = choice_scores(items, [-1.0, -2.0, -1.0, -2.0, -3.0])  # picks choice 0 of every item
    assert s.outcomes == "101" and s.acc == pytest.approx(2 / 3)
    # by hand: d = (0, +1, −1, 0) → mean 0, sample var 2/3, se √(2/3 / 4)
    assert paired_difference("1010", "1100") == pytest.approx((0.0, math.sqrt(2 / 3 / 4)))
    assert paired_difference("0000", "1111") == (1.0, 0.0)
    with pytest.raises(ValueError, match="same items: 3 vs 4"):
        paired_difference("101", "1010")


def direct_nll(model, ids: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))


def test_perplexity_in_one_window_equals_direct_computation(lm):
    model, tok = lm
    ids = [tok.bos_token_id, *tok(TEXT, add_special_tokens=False)["input_ids"]]
    assert len(ids) < 128  # fits the tiny model's context
    got = score_perplexity(model, tok, [Document("d", TEXT)])
    nll = direct_nll(model, ids)
    assert got.tokens == len(ids) - 1 and got.words == len(TEXT.split()) and got.n == 1
    assert got.nll_nats == pytest.approx(nll, rel=1e-5)
    assert got.token_perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert got.word_perplexity == pytest.approx(math.exp(nll / len(TEXT.split())), rel=1e-5)
    assert got.bits_per_byte == pytest.approx(nll / len(TEXT.encode()) / math.log(2), rel=1e-5)


def hf_recipe_nll(model, ids: list[int], max_length: int, stride: int) -> float:
    """The Hugging Face perplexity guide's loop, written out as a reference."""
    total, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].float(), -1)
        for t in range(max(prev_end, begin + 1), end):
            total -= float(logp[t - begin - 1, ids[t]])
        prev_end = end
        if end == len(ids):
            break
    return total


@pytest.mark.parametrize(("max_length", "stride"), [(8, 3), (8, 7), (16, 1), (5, 4)])
def test_sliding_window_matches_reference_and_scores_each_token_once(lm, max_length, stride):
    model, tok = lm
    ids = [tok.bos_token_id, *tok(TEXT, add_special_tokens=False)["input_ids"]]
    spans = windows(len(ids), max_length, stride)
    scored = [t for _, end, start in spans for t in range(start, end)]
    assert scored == list(range(1, len(ids)))
    assert all(end - begin <= max_length and begin < start for begin, end, start in spans)
    got = score_perplexity(
        model, tok, [Document("d", TEXT)], max_length=max_length, stride=stride, batch_size=3
    )
    assert got.nll_nats == pytest.approx(hf_recipe_nll(model, ids, max_length, stride), rel=1e-5)


def test_bad_stride(lm):
    model, tok = lm
    with pytest.raises(ConfigError, match="stride"):
        score_perplexity(model, tok, [Document("d", TEXT)], max_length=8, stride=8)


def test_last_word_accuracy_and_perplexity(lm):
    model, tok = lm
    context = "the router is fast and the"
    ids = tok(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        top = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    greedy_word = tok.convert_ids_to_tokens(top)
    other = "channel" if greedy_word != "channel" else "device"
    items = [ContinuationItem(context, f" {greedy_word}"), ContinuationItem(context, f" {other}")]
    got = score_last_word(model, tok, items)
    lls = [hand_loglikelihood(model, tok, context, it.continuation) for it in items]
    assert got.acc == 0.5 and got.n == 2
    assert got.perplexity == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-5)


def test_batched_generation_equals_one_at_a_time_and_respects_the_cap(lm):
    model, tok = lm
    prompts = ["the router is", "what is the channel of the base station", "hello"]
    batched = generate_batch(model, tok, prompts, max_new_tokens=6)
    single = [generate_batch(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 6 for t in batched)


def test_exact_match_on_generated_text(lm, monkeypatch):
    model, tok = lm
    replies = iter(["so 3 + 4 = 7\n#### 7", "the answer is 12", "#### 5"])
    monkeypatch.setattr(
        "wdmoe.eval.generation.generate_batch", lambda m, t, prompts, n: [next(replies) for _ in prompts]
    )
    items = [GenerationItem("q", "7"), GenerationItem("q", "12"), GenerationItem("q", "6")]
    got = score_exact_match(model, tok, items, batch_size=2)
    assert (got.exact_match, got.exact_match_flexible, got.n) == (
        pytest.approx(1 / 3),
        pytest.approx(2 / 3),
        3,
    )


def test_generation_cap_must_leave_room_for_the_prompt(lm):
    model, tok = lm
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_batch(model, tok, ["hello"], max_new_tokens=128)


ROWS = {
    "multiple_choice": {"query": "the router is", "choices": ["fast", "slow"], "gold": 0},
    "winogrande": {"context_options": ["the router", "the device"], "continuation": "is fast", "gold": 1},
    "generate_exact": {"context": "what is the answer", "answer": "7"},
    "last_word": {"context": "the router is", "continuation": "fast"},
    "perplexity": {"text": TEXT, "name": "t"},
}


@pytest.mark.parametrize("kind", list(ROWS))
def test_user_task_of_each_kind_runs_end_to_end(lm, tmp_path, kind):
    model, tok = lm
    path = tmp_path / f"{kind}.jsonl"
    path.write_text((json.dumps(ROWS[kind]) + "\n") * 3)
    name = f"user_{kind}_{uuid.uuid4().hex[:6]}"
    register_jsonl_task(name, path, kind)  # type: ignore[arg-type]
    result = evaluate_task(name, model, tok, limit=2, settings=EvalSettings(batch_size=2, max_new_tokens=4))
    assert (result.task, result.kind, result.n) == (name, kind, 2)
    metric = {
        "multiple_choice": "acc_norm",
        "winogrande": "acc",
        "generate_exact": "exact_match",
        "last_word": "perplexity",
        "perplexity": "word_perplexity",
    }[kind]
    assert math.isfinite(result.metrics[metric])
    record = result.as_record()
    assert record["n"] == 2 and all(f"{k}_stderr" in record for k in result.stderr)


def test_multiple_choice_scores_the_same_with_and_without_shared_contexts(lm, tmp_path, monkeypatch):
    model, tok = lm
    rows = [
        {"query": "the router is", "choices": ["fast", "slow", "a device"], "gold": 0},
        {"query": "what is the channel of the", "choices": ["base station", "cell"], "gold": 1},
        {"query": "once upon a time there was", "choices": ["a small expert", "hello", "the end"], "gold": 2},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = f"user_mc_{uuid.uuid4().hex[:6]}"
    register_jsonl_task(name, path, "multiple_choice")
    shared_calls = []
    real = multiple_choice.shared_context_logprobs
    monkeypatch.setattr(
        multiple_choice, "shared_context_logprobs", lambda *a: shared_calls.append(1) or real(*a)
    )
    assert EvalSettings().share_context
    results = [
        evaluate_task(name, model, tok, settings=EvalSettings(batch_size=2, share_context=share))
        for share in (True, False)
    ]
    assert results[0] == results[1] and results[0].n == 3
    assert len(shared_calls) == 1  # only share_context=True took the shared path
