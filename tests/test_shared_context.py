"""Shared-context scoring (each context once, its choices on its KV cache) equals scoring every
(context + choice) alone; the annotation it gives the accounting; how it batches."""

import itertools
import os
import random
from pathlib import Path

import pytest
import torch

from tiny import FAMILIES, WORDS, tiny_model, tiny_tokenizer
from wdmoe.eval.multiple_choice import (
    FORWARD_COST_TOKENS,
    choice_requests,
    choice_scores,
    continuation_logprobs,
    encode_pair,
    group_by_context,
    plan_passes,
    score_choices,
    shared_context_logprobs,
)
from wdmoe.eval.tasks import ChoiceItem
from wdmoe.models.requests import SharedContexts, shared_contexts, sharing_contexts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_items(n: int, seed: int = 0, context_words: tuple[int, int] = (2, 14)) -> list[ChoiceItem]:
    """Items of 2–5 choices of 1–7 words, worded in the tiny tokenizer's vocabulary."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        k = rng.randint(2, 5)
        choices = tuple(" " + sentence(rng, rng.randint(1, 7)) for _ in range(k))
        items.append(
            ChoiceItem(f"question: {sentence(rng, rng.randint(*context_words))}", choices, rng.randrange(k))
        )
    return items


@pytest.fixture(scope="module")
def lm():
    return tiny_model("mixtral", seed=1), tiny_tokenizer()


def assert_same_scoring(model, tok, items, batch_size: int = 4) -> None:
    """Log-likelihoods within 1e-4, the same greedy flags, identical acc and acc_norm."""
    requests = choice_requests(tok, items)
    old = continuation_logprobs(model, requests, batch_size, tok.pad_token_id)
    new = shared_context_logprobs(model, requests, batch_size, tok.pad_token_id)
    assert [ll for ll, _ in new] == pytest.approx([ll for ll, _ in old], abs=1e-4)
    assert [g for _, g in new] == [g for _, g in old]
    assert choice_scores(items, [ll for ll, _ in new]) == choice_scores(items, [ll for ll, _ in old])


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_contexts_score_as_each_choice_alone(family):
    assert_same_scoring(tiny_model(family, seed=1), tiny_tokenizer(), random_items(12), batch_size=3)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_the_batch_size_changes_nothing(lm, batch_size):
    model, tok = lm
    assert_same_scoring(model, tok, random_items(9, seed=2), batch_size)


def test_score_choices_gives_the_same_scores_either_way(lm):
    model, tok = lm
    items = random_items(20, seed=5)
    shared = score_choices(model, tok, items, 4, share_context=True)
    assert shared == score_choices(model, tok, items, 4, share_context=False) and shared.n == 20


def test_greedy_flags_match_on_the_models_own_continuations(lm):
    """A continuation the model generates itself is greedy in both scorers; another is not."""
    model, tok = lm
    ids = tok("the router is", add_special_tokens=False)["input_ids"]
    generated = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)[0, len(ids) :]
    other = tok(" hello world", add_special_tokens=False)["input_ids"]
    requests = [(ids + generated.tolist(), 3), (ids + other, len(other))]
    new = shared_context_logprobs(model, requests, 4, tok.pad_token_id)
    assert [g for _, g in new] == [True, False] == [g for _, g in continuation_logprobs(model, requests)]


def test_choices_that_tokenise_the_context_differently_are_scored_exactly(lm):
    """'the rou' + 'ter is' is tokenised as 'the router' + 'is': that choice's context ids are not
    tok(context), so it is its own context; the other choices share theirs."""
    model, tok = lm
    items = [
        ChoiceItem("the rou", ("ter is", " device", " channel is slow"), 0),
        ChoiceItem("hello world", (" once", " upon a time"), 1),
    ]
    requests = choice_requests(tok, items)
    contexts, parents = group_by_context(requests)
    assert requests[0][0][: -requests[0][1]] != tok("the rou", add_special_tokens=False)["input_ids"]
    assert len(contexts) == 3 and parents == [0, 1, 1, 2, 2]
    assert_same_scoring(model, tok, items)


def test_over_long_requests_are_truncated_from_the_left_as_before(lm):
    model, tok = lm
    limit = model.config.max_position_embeddings
    items = random_items(6, seed=3, context_words=(limit - 10, limit + 40))
    requests = choice_requests(tok, items)
    assert max(len(seq) for seq, _ in requests) > limit  # some requests are truncated
    assert_same_scoring(model, tok, items, batch_size=2)


def test_a_request_without_context_ids_is_refused(lm):
    model, tok = lm
    with pytest.raises(AssertionError, match="context ids"):
        shared_context_logprobs(model, [encode_pair(tok, "", "hello world")])


class Calls:
    """A forward pre-hook that keeps the annotation and the inputs of every forward."""

    def __init__(self, model: torch.nn.Module, fail_at: int | None = None) -> None:
        self.seen: list[tuple[SharedContexts | None, dict]] = []
        self.fail_at = fail_at
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        self.seen.append((shared_contexts(), kwargs))
        if len(self.seen) == self.fail_at:
            raise RuntimeError("the forward failed")


def test_the_two_passes_run_annotated_and_the_annotation_ends_with_them(lm):
    model, tok = lm
    items = random_items(5, seed=4)
    requests = choice_requests(tok, items)
    calls = Calls(model)
    try:
        shared_context_logprobs(model, requests, batch_size=2, pad_id=tok.pad_token_id)
    finally:
        calls.handle.remove()
    assert shared_contexts() is None
    assert len(calls.seen) % 2 == 0 and all(a is not None for a, _ in calls.seen)
    contexts, _ = group_by_context(requests)
    scored = []
    for (first, ctx), (second, cont) in zip(calls.seen[::2], calls.seen[1::2], strict=True):
        assert first is second  # one annotation around the pair
        ctx_mask, cont_mask = ctx["attention_mask"], cont["attention_mask"]
        c, s = ctx["input_ids"].shape
        r, w = cont["input_ids"].shape
        assert ctx["use_cache"] and ctx.get("cache") is None and ctx_mask.shape == (c, s)
        assert cont["cache"] is not None and cont_mask.shape == (r, s + w) and len(first.parents) == r
        for row, p in enumerate(first.parents):  # each row: its context's real ids, then its own
            context = ctx["input_ids"][p][ctx_mask[p].bool()].tolist()
            continuation = cont["input_ids"][row][cont_mask[row, s:].bool()].tolist()
            assert cont_mask[row, :s].tolist() == ctx_mask[p].tolist()
            scored.append((context, continuation))
    want = [(seq[:-n], seq[-n:]) for seq, n in requests]
    assert sorted(scored) == sorted(want) and len({tuple(c) for c, _ in scored}) == len(contexts)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_the_annotation_is_unset_when_a_forward_raises(lm, fail_at):
    model, tok = lm
    calls = Calls(model, fail_at=fail_at)
    try:
        with pytest.raises(RuntimeError, match="the forward failed"):
            shared_context_logprobs(model, choice_requests(tok, random_items(2)), pad_id=tok.pad_token_id)
    finally:
        calls.handle.remove()
    assert calls.seen[-1][0] is not None and shared_contexts() is None


def test_sharing_contexts_nests_and_restores():
    assert shared_contexts() is None
    with sharing_contexts([0, 0, 1]) as outer:
        assert shared_contexts() == outer == SharedContexts((0, 0, 1))
        with sharing_contexts([0]):
            assert shared_contexts() == SharedContexts((0,))
        assert shared_contexts() is outer
    assert shared_contexts() is None


def brute_force_cost(ctx: list[int], conts: list[list[int]], max_contexts: int) -> float:
    """The cheapest cut of plan_passes' order into batches, trying every set of cut points."""
    order = sorted(range(len(ctx)), key=lambda c: (-max(conts[c]), -ctx[c]))
    best = float("inf")
    for mask in range(2 ** (len(order) - 1)):
        cuts = [0] + [i + 1 for i in range(len(order) - 1) if mask >> i & 1] + [len(order)]
        batches = [order[a:b] for a, b in itertools.pairwise(cuts)]
        if all(len(b) <= max_contexts for b in batches):
            best = min(best, sum(batch_cost(b, ctx, conts) for b in batches))
    return best


def batch_cost(batch: list[int], ctx: list[int], conts: list[list[int]]) -> float:
    rows = sum(len(conts[c]) for c in batch)
    width = max(max(conts[c]) for c in batch)
    return 2 * FORWARD_COST_TOKENS + len(batch) * max(ctx[c] for c in batch) + rows * width


@pytest.mark.parametrize("seed", range(6))
def test_plan_passes_finds_the_cheapest_cuts(seed):
    rng = random.Random(seed)
    n, max_contexts = rng.randint(1, 9), rng.randint(1, 4)
    ctx = [rng.randint(1, 200) for _ in range(n)]
    conts = [[rng.randint(1, 40) for _ in range(rng.randint(1, 5))] for _ in range(n)]
    plan = plan_passes(ctx, conts, max_contexts)
    assert sorted(c for b in plan for c in b) == list(range(n))
    assert all(1 <= len(b) <= max_contexts for b in plan)
    assert sum(batch_cost(b, ctx, conts) for b in plan) == brute_force_cost(ctx, conts, max_contexts)


SHARED = Path(os.environ.get("WDMOE_DATA", "/work/shared/benchmarks"))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "arc_easy.jsonl").is_file(), reason=f"no benchmark folder {SHARED}")
def test_the_default_model_scores_arc_easy_the_same_both_ways():
    from wdmoe.eval.tasks import get_task
    from wdmoe.models.loading import load_checkpoint

    model, tok = load_checkpoint("default")
    items = get_task("arc_easy").load(SHARED, 10)
    assert_same_scoring(model, tok, items, batch_size=16)
