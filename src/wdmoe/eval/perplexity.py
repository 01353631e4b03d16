"""Perplexity of text with a sliding window, and LAMBADA's last-word accuracy and perplexity."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from wdmoe.errors import ConfigError
from wdmoe.eval.multiple_choice import Request, continuation_logprobs, encode_pair, model_context, stderr
from wdmoe.eval.tasks import ContinuationItem, Document


@dataclass(frozen=True)
class PerplexityScores:
    """Perplexity of ``n`` documents: per token (tokenizer-dependent), per word, and bits per UTF-8 byte.

    token_perplexity = exp(-Σ log p / tokens), word_perplexity = exp(-Σ log p / words),
    bits_per_byte = -Σ log p / (bytes · ln 2); Σ log p in nats over every token of the text.
    """

    token_perplexity: float
    word_perplexity: float
    bits_per_byte: float
    nll_nats: float
    tokens: int
    words: int
    bytes: int
    n: int


@dataclass(frozen=True)
class LastWordScores:
    """LAMBADA: acc = greedy decoding gives the last word; perplexity = exp(-mean log p(last word))."""

    acc: float
    acc_stderr: float
    perplexity: float
    n: int


def windows(n_ids: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ids[0:n_ids], where ids[0] is a prefix.

    The Hugging Face perplexity recipe: windows ids[begin:begin + max_length] for begin = 0, stride,
    2·stride, …; each scores only the ids the previous one did not reach, so every position
    1 … n_ids-1 is scored exactly once, with at least ``max_length - stride`` ids of context after
    the first window. stride = max_length - 1 gives lm-eval's disjoint rolling windows.
    """
    if not 1 <= stride < max_length:
        raise ConfigError(f"stride must be in [1, max_length - 1] = [1, {max_length - 1}], got {stride}")
    out, scored = [], 1
    for begin in range(0, n_ids, stride):
        end = min(begin + max_length, n_ids)
        if end > scored:
            out.append((begin, end, scored))
            scored = end
        if end == n_ids:
            break
    return out


def window_requests(ids: list[int], max_length: int, stride: int) -> list[Request]:
    """The windows as log-likelihood requests: (window ids, how many trailing ids it scores)."""
    return [(ids[begin:end], end - scored) for begin, end, scored in windows(len(ids), max_length, stride)]


def score_perplexity(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> PerplexityScores:
    """Perplexity of ``docs`` with a sliding window of ``max_length`` ids (default: the model's context).

    Each document is prefixed with the BOS id (else EOS), as lm-eval does, so its first token is
    scored too. ``stride`` defaults to ``max_length - 1`` (disjoint windows, lm-eval's rolling).
    """
    max_length = min(max_length or model_context(model), model_context(model))
    stride = stride or max_length - 1
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start each document with")
    requests = []
    for doc in docs:
        ids = [prefix, *tok(doc.text, add_special_tokens=False)["input_ids"]]
        requests += window_requests(ids, max_length, stride)
    scores = continuation_logprobs(model, requests, batch_size, pad_id=tok.pad_token_id or 0)
    nll = -sum(ll for ll, _ in scores)
    tokens = sum(n for _, n in requests)
    words = sum(len(doc.text.split()) for doc in docs)
    nbytes = sum(len(doc.text.encode("utf-8")) for doc in docs)
    return PerplexityScores(
        token_perplexity=math.exp(nll / max(tokens, 1)),
        word_perplexity=math.exp(nll / max(words, 1)),
        bits_per_byte=nll / max(nbytes, 1) / math.log(2),
        nll_nats=nll,
        tokens=tokens,
        words=words,
        bytes=nbytes,
        n=len(docs),
    )


def score_last_word(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[ContinuationItem],
    batch_size: int = 32,
) -> LastWordScores:
    """lm-eval's lambada: acc = is_greedy over all continuation ids; perplexity = exp(-mean Σ log p)."""
    requests = [encode_pair(tok, item.context, item.continuation) for item in items]
    scores = continuation_logprobs(model, requests, batch_size, pad_id=tok.pad_token_id or 0)
    n = len(items)
    acc = sum(greedy for _, greedy in scores) / n
    return LastWordScores(acc, stderr(acc, n), math.exp(-sum(ll for ll, _ in scores) / n), n)
