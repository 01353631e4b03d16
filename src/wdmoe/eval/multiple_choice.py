"""Multiple choice by log-likelihood, batched: acc (best sum) and acc_norm (best sum per character)."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wdmoe.eval.tasks import ChoiceItem


@dataclass(frozen=True)
class ChoiceScores:
    """Accuracy and length-normalised accuracy over ``n`` items, with standard errors."""

    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / max(n - 1, 1))


def encode_pair(tok: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], int]:
    """Ids of context+continuation and how many trailing ids are the continuation (lm-eval's split)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    return whole, max(len(whole) - n_ctx, 1)


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, requests: Sequence[tuple[list[int], int]], batch_size: int = 32, pad_id: int = 0
) -> list[float]:
    """Σ log p(continuation | context) per request, batched by length (right padding)."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out = [0.0] * len(requests)
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
            pos = torch.arange(len(seq) - n_cont, len(seq))
            out[i] = float(logp[r, pos - 1, torch.tensor(seq[-n_cont:])].sum())
    return out


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
        norm = [v / len(c) for v, c in zip(ll, item.continuations, strict=True)]
        hits += int(max(range(k), key=ll.__getitem__) == item.gold)
        hits_norm += int(max(range(k), key=norm.__getitem__) == item.gold)
        pos += k
    n = len(items)
    acc, acc_norm = hits / n, hits_norm / n
    return ChoiceScores(acc, acc_norm, stderr(acc, n), stderr(acc_norm, n), n)
