"""Multiple choice by log-likelihood, batched: acc (best sum) and acc_norm (best sum per character).

Two scorers give the same log-likelihoods (to float rounding):
- :func:`continuation_logprobs` runs every (context + continuation) as its own sequence;
- :func:`shared_context_logprobs` runs each distinct context once with a KV cache (the *context
  pass*, several contexts left padded in one forward) and then every continuation of those
  contexts on a copy of its context's cache (the *continuation pass*). The choices of an item
  share their context, so the model sees each context once instead of once per choice, and the
  LM head runs only where a log-probability is needed.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache, PreTrainedTokenizerBase

from wdmoe.eval.tasks import ChoiceItem, PartialItem
from wdmoe.models.requests import sharing_contexts


@dataclass(frozen=True)
class ChoiceScores:
    """Accuracy and length-normalised accuracy over ``n`` items, with standard errors;
    ``outcomes``: each item's 0/1 under ``acc``, in item order (for paired comparisons)."""

    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int
    outcomes: str = ""


@dataclass(frozen=True)
class PartialScores:
    """WinoGrande's partial scoring: accuracy over ``n`` items (no acc_norm: the continuation is
    shared); ``outcomes`` as in :class:`ChoiceScores`."""

    acc: float
    acc_stderr: float
    n: int
    outcomes: str = ""


def stderr(p: float, n: int) -> float:
    """Standard error of a mean of ``n`` 0/1 outcomes with mean ``p`` (sample variance, as lm-eval)."""
    return math.sqrt(p * (1 - p) / max(n - 1, 1))


def paired_difference(base: str, other: str) -> tuple[float, float]:
    """``other`` − ``base`` accuracy on the same items (two records' ``outcomes`` strings) and its
    paired standard error, sd(o_i − b_i)/√n: far below the unpaired √(se_b² + se_o²) when two runs
    answer most items alike, as two selection policies on one model do."""
    if len(base) != len(other) or not base:
        raise ValueError(f"paired outcomes need the same items: {len(base)} vs {len(other)} outcomes")
    d = [int(o) - int(b) for b, o in zip(base, other, strict=True)]
    n, mean = len(d), sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def encode_pair(tok: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], int]:
    """Ids of context+continuation and how many trailing ids are the continuation (lm-eval's split)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    return whole, max(len(whole) - n_ctx, 1)


Request = tuple[list[int], int]  # (context + continuation ids, how many trailing ids are the continuation)


def model_context(model: nn.Module) -> int:
    """The longest sequence the model accepts (its position embeddings)."""
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048))


def fit(request: Request, max_length: int) -> Request:
    """Drop context ids from the left so the request fits ``max_length`` (lm-eval truncates the same way)."""
    seq, n_cont = request
    assert n_cont < max_length, f"a continuation of {n_cont} tokens cannot fit a context of {max_length}"
    return seq[-max_length:], n_cont


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, requests: Sequence[Request], batch_size: int = 32, pad_id: int = 0
) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), whether greedy decoding gives the continuation) per request.

    Batched longest first with right padding; requests longer than the model's context are
    truncated from the left.
    """
    limit = model_context(model)
    requests = [fit(r, limit) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out = [(0.0, False)] * len(requests)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = len(requests[idx[0]][0])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            seq = requests[i][0]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logp = torch.log_softmax(
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1
        )
        for r, i in enumerate(idx):
            seq, n_cont = requests[i]
            pos = (
                torch.arange(len(seq) - n_cont, len(seq)) - 1
            )  # the logits that predict each continuation id
            target = torch.tensor(seq[-n_cont:])
            rows = logp[r, pos]
            out[i] = (
                float(rows[torch.arange(n_cont), target].sum()),
                bool((rows.argmax(-1) == target).all()),
            )
    return out


def group_by_context(requests: Sequence[Request]) -> tuple[list[list[int]], list[int]]:
    """The distinct contexts of ``requests`` (their ids ``seq[:-n_cont]``, first seen first) and
    the index of each request's context. Grouping by ids, not by text: tokenisation at the
    boundary can give one item's choices different context ids."""
    index: dict[tuple[int, ...], int] = {}
    for seq, n_cont in requests:
        assert 0 < n_cont < len(seq), f"a request needs context ids: {n_cont} of {len(seq)} ids continue"
    parents = [index.setdefault(tuple(seq[:-n_cont]), len(index)) for seq, n_cont in requests]
    return [list(ids) for ids in index], parents


def padded(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, S] and attention mask [N, S] (0 = padding) of ``rows``, padded on the left or right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def context_pass(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Cache]:
    """Left-padded contexts ids [C, S] → log p(next token | context) [C, V] and their KV cache.

    Positions count real tokens only (0 at each context's first id), so a padded row computes
    what the unpadded context would; left padding puts every context's last id in column S − 1.
    """
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].float(), -1), out.cache


def continuation_pass(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Cache, ctx_mask: torch.Tensor
) -> torch.Tensor:
    """Right-padded continuations ids [R, W] on ``cache`` (already expanded to R rows, their
    contexts' masks ``ctx_mask`` [R, S]) → log p of each next continuation id [N, V], row-major
    over the (row, position) pairs whose next id is real (position j predicts id j + 1)."""
    positions = ctx_mask.sum(-1, keepdim=True) + torch.arange(ids.shape[1])  # after the real context
    wanted = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1).bool()
    out = model(
        input_ids=ids,
        attention_mask=torch.cat([ctx_mask, mask], 1),  # [R, S + W]
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=wanted,  # the LM head runs on these positions only
    )
    return torch.log_softmax(out.logits.float(), -1)


def score_on_shared_contexts(
    model: nn.Module,
    contexts: Sequence[list[int]],
    conts: Sequence[list[int]],
    parents: Sequence[int],
    pad_id: int,
) -> list[tuple[float, bool]]:
    """(Σ log p, greedy) of each continuation ``conts[r]`` after ``contexts[parents[r]]``: one
    context pass, the cache rows indexed by ``parents``, one continuation pass."""
    ctx_ids, ctx_mask = padded(contexts, pad_id, left=True)
    ids, mask = padded(conts, pad_id, left=False)
    parent = torch.tensor(parents, dtype=torch.long)
    with sharing_contexts(parents):
        first, cache = context_pass(model, ctx_ids, ctx_mask)
        cache.batch_select_indices(parent)  # row r: a copy of context row parents[r]
        rest = continuation_pass(model, ids, mask, cache, ctx_mask[parent])
    head = first[parent]  # [R, V]: predicts each continuation's first id
    later = mask[:, 1:].bool()  # [R, W − 1]: the real ids after the first, as ``rest`` holds them
    row, target = torch.arange(len(conts))[:, None].expand_as(later)[later], ids[:, 1:][later]
    logp = head.gather(-1, ids[:, :1])[:, 0].index_add(0, row, rest.gather(-1, target[:, None])[:, 0])
    misses = torch.bincount(row[rest.argmax(-1) != target], minlength=len(conts))
    greedy = (head.argmax(-1) == ids[:, 0]) & (misses == 0)
    return [(float(lp), bool(g)) for lp, g in zip(logp, greedy, strict=True)]


# What one forward costs beyond its tokens, in tokens' worth: on the CPU a forward of the default
# model reads every weight once (≈ 75 ms) and a token costs ≈ 2.6 ms more (measured on 1 thread).
FORWARD_COST_TOKENS = 30


def plan_passes(
    ctx_lengths: Sequence[int], cont_lengths: Sequence[Sequence[int]], max_contexts: int
) -> list[list[int]]:
    """Contexts (``ctx_lengths[c]`` ids, continuations of ``cont_lengths[c]`` ids) in batches of
    at most ``max_contexts``, one (context pass, continuation pass) each.

    A batch B costs |B|·max S + R·max W padded tokens (S: context length, W: continuation
    length, R: its continuations) plus 2 · FORWARD_COST_TOKENS. The contexts are sorted by their
    longest continuation, then their length (longest first); the cuts that minimise the total
    cost are found by dynamic programming over cut points (as a paragraph is broken into lines).
    """
    order = sorted(range(len(ctx_lengths)), key=lambda c: (-max(cont_lengths[c]), -ctx_lengths[c]))
    # best[j]: the cost of the cheapest plan of order[:j]; its last batch starts at cut[j]
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        width_s = width_w = rows = 0
        for i in range(j - 1, max(j - max_contexts, 0) - 1, -1):
            c = order[i]
            width_s, width_w = max(width_s, ctx_lengths[c]), max(width_w, *cont_lengths[c])
            rows += len(cont_lengths[c])
            cost = best[i] + 2 * FORWARD_COST_TOKENS + (j - i) * width_s + rows * width_w
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], len(order)
    while j:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


@torch.no_grad()
def shared_context_logprobs(
    model: nn.Module, requests: Sequence[Request], batch_size: int = 32, pad_id: int = 0
) -> list[tuple[float, bool]]:
    """As :func:`continuation_logprobs`, each distinct context run once: up to ``batch_size``
    contexts per context pass (batched by :func:`plan_passes` to waste little on padding), then
    all their continuations in one continuation pass.

    Requests longer than the model's context are truncated from the left first (as there), and
    grouped by the context ids left after that.
    """
    limit = model_context(model)
    requests = [fit(r, limit) for r in requests]
    contexts, parent_of = group_by_context(requests)
    children: list[list[int]] = [[] for _ in contexts]
    for i, c in enumerate(parent_of):
        children[c].append(i)
    cont_lengths = [[requests[i][1] for i in kids] for kids in children]
    out = [(0.0, False)] * len(requests)
    for batch in plan_passes([len(c) for c in contexts], cont_lengths, batch_size):
        rows = [(i, p) for p, c in enumerate(batch) for i in children[c]]
        conts = [requests[i][0][-requests[i][1] :] for i, _ in rows]
        scores = score_on_shared_contexts(
            model, [contexts[c] for c in batch], conts, [p for _, p in rows], pad_id
        )
        for (i, _), score in zip(rows, scores, strict=True):
            out[i] = score
    return out


def loglikelihoods(
    model: nn.Module,
    requests: Sequence[Request],
    batch_size: int = 32,
    pad_id: int = 0,
    share_context: bool = False,
) -> list[float]:
    """Σ log p(continuation | context) per request: each request a sequence of its own (right
    padding, batched by length), or each distinct context run once (``share_context``)."""
    scorer = shared_context_logprobs if share_context else continuation_logprobs
    return [ll for ll, _ in scorer(model, requests, batch_size, pad_id)]


def score_choices(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[ChoiceItem],
    batch_size: int = 32,
    share_context: bool = True,
) -> ChoiceScores:
    """acc / acc_norm of ``model`` on ``items`` (lm-eval's definitions). ``share_context``: run
    each context once for all its choices (``batch_size`` contexts per forward), else every
    (context + choice) alone (``batch_size`` of them per forward); the scores are the same."""
    lls = loglikelihoods(model, choice_requests(tok, items), batch_size, tok.pad_token_id or 0, share_context)
    return choice_scores(items, lls)


def choice_requests(tok: PreTrainedTokenizerBase, items: Sequence[ChoiceItem]) -> list[Request]:
    """Every (context, choice) pair encoded, in item then choice order."""
    return [encode_pair(tok, item.context, c) for item in items for c in item.continuations]


def choice_scores(items: Sequence[ChoiceItem], lls: Sequence[float]) -> ChoiceScores:
    """acc / acc_norm from the log-likelihoods of every item's choices, in item then choice order."""
    hits: list[int] = []
    hits_norm = 0
    pos = 0
    for item in items:
        k = len(item.continuations)
        ll = lls[pos : pos + k]
        # lm-eval divides by the choice's characters, without the target delimiter (the leading space)
        norm = [v / max(len(c.removeprefix(" ")), 1) for v, c in zip(ll, item.continuations, strict=True)]
        hits.append(int(max(range(k), key=ll.__getitem__) == item.gold))
        hits_norm += int(max(range(k), key=norm.__getitem__) == item.gold)
        pos += k
    n = len(items)
    acc, acc_norm = sum(hits) / n, hits_norm / n
    return ChoiceScores(acc, acc_norm, stderr(acc, n), stderr(acc_norm, n), n, "".join(map(str, hits)))


def score_partial(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[PartialItem],
    batch_size: int = 32,
) -> PartialScores:
    """The shared continuation scored after each context option; the best sum is the answer (lm-eval)."""
    requests = [encode_pair(tok, c, item.continuation) for item in items for c in item.contexts]
    lls = loglikelihoods(model, requests, batch_size, pad_id=tok.pad_token_id or 0)
    hits: list[int] = []
    pos = 0
    for item in items:
        ll = lls[pos : pos + len(item.contexts)]
        hits.append(int(max(range(len(ll)), key=ll.__getitem__) == item.gold))
        pos += len(ll)
    acc = sum(hits) / len(items)
    return PartialScores(acc, stderr(acc, len(items)), len(items), "".join(map(str, hits)))
