"""Multiple choice by log-likelihood, batched: acc (best sum) and acc_norm (best sum per character)."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wdmoe.eval.tasks import ChoiceItem, PartialItem


@dataclass(frozen=True)
class ChoiceScores:
    """Accuracy and length-normalised accuracy over ``n`` items, with standard errors."""

    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int


@dataclass(frozen=True)
class PartialScores:
    """WinoGrande's partial scoring: accuracy over ``n`` items (no acc_norm: the continuation is shared)."""

    acc: float
    acc_stderr: float
    n: int


def stderr(p: float, n: int) -> float:
    """Standard error of a mean of ``n`` 0/1 outcomes with mean ``p`` (sample variance, as lm-eval)."""
    return math.sqrt(p * (1 - p) / max(n - 1, 1))


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


def loglikelihoods(
    model: nn.Module, requests: Sequence[Request], batch_size: int = 32, pad_id: int = 0
) -> list[float]:
    """Σ log p(continuation | context) per request, batched by length (right padding)."""
    return [ll for ll, _ in continuation_logprobs(model, requests, batch_size, pad_id)]


def score_choices(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[ChoiceItem],
    batch_size: int = 32,
) -> ChoiceScores:
    """acc / acc_norm of ``model`` on ``items`` (lm-eval's definitions)."""
    requests = [encode_pair(tok, item.context, c) for item in items for c in item.continuations]
    lls = loglikelihoods(model, requests, batch_size, pad_id=tok.pad_token_id or 0)
    hits = hits_norm = 0
    pos = 0
    for item in items:
        k = len(item.continuations)
        ll = lls[pos : pos + k]
        # lm-eval divides by the choice's characters, without the target delimiter (the leading space)
        norm = [v / max(len(c.removeprefix(" ")), 1) for v, c in zip(ll, item.continuations, strict=True)]
        hits += int(max(range(k), key=ll.__getitem__) == item.gold)
        hits_norm += int(max(range(k), key=norm.__getitem__) == item.gold)
        pos += k
    n = len(items)
    acc, acc_norm = hits / n, hits_norm / n
    return ChoiceScores(acc, acc_norm, stderr(acc, n), stderr(acc_norm, n), n)


def score_partial(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[PartialItem],
    batch_size: int = 32,
) -> PartialScores:
    """The shared continuation scored after each context option; the best sum is the answer (lm-eval)."""
    requests = [encode_pair(tok, c, item.continuation) for item in items for c in item.contexts]
    lls = loglikelihoods(model, requests, batch_size, pad_id=tok.pad_token_id or 0)
    hits = pos = 0
    for item in items:
        ll = lls[pos : pos + len(item.contexts)]
        hits += int(max(range(len(ll)), key=ll.__getitem__) == item.gold)
        pos += len(ll)
    acc = hits / len(items)
    return PartialScores(acc, stderr(acc, len(items)), len(items))
