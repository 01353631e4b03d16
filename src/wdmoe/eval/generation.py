"""GSM8K-style evaluation: greedy generation, batched, and exact match on the final number.

Two extractions, as lm-eval's gsm8k task: ``strict`` takes the number after the first "#### ",
``flexible`` the last number in the response. Both sides are normalised alike (commas, "$" and a
trailing "." removed) before comparing.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from wdmoe.errors import ConfigError
from wdmoe.eval.multiple_choice import model_context, stderr
from wdmoe.eval.tasks import GenerationItem

STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval's gsm8k "until"
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
INVALID = "[invalid]"


@dataclass(frozen=True)
class ExactMatchScores:
    """Exact match of the final number over ``n`` items: strict ("#### N") and flexible (last number)."""

    exact_match: float
    exact_match_stderr: float
    exact_match_flexible: float
    exact_match_flexible_stderr: float
    n: int


def normalise(answer: str) -> str:
    """lm-eval's regexes_to_ignore for gsm8k: ",", "$", everything up to "#### ", a trailing "."."""
    for pattern in (r",", r"\$", r"(?s).*#### ", r"\.$"):
        answer = re.sub(pattern, "", answer)
    return answer.strip().lower()


def extract_strict(response: str) -> str:
    match = STRICT.search(response)
    return match[1] if match else INVALID


def extract_flexible(response: str) -> str:
    matches = FLEXIBLE.findall(response)
    return next(g for g in matches[-1] if g) if matches else INVALID


def is_correct(extracted: str, gold: str) -> bool:
    return extracted != INVALID and normalise(extracted) == normalise(gold)


class StopOnStrings(StoppingCriteria):
    """Per-row stop once the text generated after the prompt contains a stop string."""

    def __init__(self, tok: PreTrainedTokenizerBase, prompt_len: int, stops: Sequence[str]) -> None:
        self.tok, self.prompt_len, self.stops = tok, prompt_len, stops

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len :])
        done = [any(s in text for s in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_batch(
    model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy continuations of ``prompts`` (left padding; prompts cut from the left to fit)."""
    keep = model_context(model) - max_new_tokens
    if keep < 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room in a context of {model_context(model)}"
        )
    encoded = [tok(p, add_special_tokens=False)["input_ids"][-keep:] for p in prompts]
    width = max(map(len, encoded))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, seq in enumerate(encoded):
        ids[r, width - len(seq) :] = torch.tensor(seq)
        mask[r, width - len(seq) :] = 1
    out = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        top_k=None,
        top_p=None,
        temperature=None,
        pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList([StopOnStrings(tok, width, STOP)]),
    )
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return [cut_at_stop(t, STOP) for t in texts]


def score_exact_match(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[GenerationItem],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> ExactMatchScores:
    """Greedy generation (at most ``max_new_tokens``), then exact match on the final number."""
    responses: list[str] = []
    for b in range(0, len(items), batch_size):
        responses += generate_batch(
            model, tok, [it.prompt for it in items[b : b + batch_size]], max_new_tokens
        )
    n = len(items)
    strict = sum(is_correct(extract_strict(r), it.answer) for r, it in zip(responses, items, strict=True)) / n
    flex = sum(is_correct(extract_flexible(r), it.answer) for r, it in zip(responses, items, strict=True)) / n
    return ExactMatchScores(strict, stderr(strict, n), flex, stderr(flex, n), n)
