"""Text generation through a wdmoe-installed model, streaming tokens as they are decoded."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from wdmoe.errors import PromptError
from wdmoe.models.install import WirelessModel
from wdmoe.types import CausalLM


@dataclass(frozen=True)
class GenerationResult:
    """The generated text and what it cost in this process."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    experts_per_token: float  # mean experts run per token and MoE layer

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


class CallbackStreamer(BaseStreamer):
    """Decodes new tokens incrementally and hands each new piece of text to ``on_text``."""

    def __init__(self, tok: PreTrainedTokenizerBase, on_text: Callable[[str], None]) -> None:
        self.tok, self.on_text = tok, on_text
        self.ids: list[int] = []
        self.shown = 0
        self.skip_prompt = True
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:  # the first call carries the prompt
            self.skip_prompt = False
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(value.reshape(-1).tolist())
        text = str(self.tok.decode(self.ids, skip_special_tokens=True))
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            self.on_text(text[self.shown :])
            self.shown = len(text)

    def end(self) -> None:
        text = str(self.tok.decode(self.ids, skip_special_tokens=True))
        if len(text) > self.shown:
            self.on_text(text[self.shown :])


def encode_prompt(tok: PreTrainedTokenizerBase, prompt: str, chat: bool, system: str | None) -> torch.Tensor:
    """[1, T] prompt ids, through the chat template when the model has one and ``chat`` is set."""
    if not prompt.strip():
        raise PromptError("the prompt is empty; give some text to continue or a question to answer")
    if chat and tok.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        encoded: Any = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        ids = encoded["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    return torch.tensor([ids])


def context_length(model: CausalLM) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


@torch.no_grad()
def check_fits(wm: WirelessModel, prompt_tokens: int, max_new_tokens: int) -> None:
    """PromptError unless the prompt and the new tokens fit the model's context."""
    limit = context_length(wm.model)
    if prompt_tokens + max_new_tokens > limit:
        raise PromptError(
            f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens exceeds the model's context "
            f"of {limit} tokens; shorten the prompt or lower --max-new-tokens"
        )


def generate(
    wm: WirelessModel,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
    record: bool = True,
) -> GenerationResult:
    """Greedy (temperature 0) or sampled generation with the KV cache, streaming through ``on_text``.

    record: use the model's shared recorder for ``experts_per_token``; a server running several
    requests at once passes False (the recorder is not per request; experts_per_token is then nan).
    """
    ids = encode_prompt(tok, prompt, chat, system)
    check_fits(wm, int(ids.shape[1]), max_new_tokens)
    streamer = CallbackStreamer(tok, on_text or (lambda _: None))
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    torch.manual_seed(seed)
    if record:
        wm.recorder.clear()
        wm.recorder.enabled = True
    t0 = time.perf_counter()
    try:
        out = wm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            top_k=None,
            **sampling,
        )
    finally:
        if record:
            wm.recorder.enabled = False
    t1 = time.perf_counter()
    traces = wm.recorder.clear() if record else []
    kept = sum(int(t.keep.sum()) for t in traces)
    tokens = sum(int(t.keep.shape[0]) for t in traces)
    first = streamer.first_token_at or t1
    new = out[0, ids.shape[1] :]
    return GenerationResult(
        text=str(tok.decode(new, skip_special_tokens=True)),
        prompt_tokens=int(ids.shape[1]),
        new_tokens=int(new.numel()),
        prefill_s=first - t0,
        decode_s=t1 - first,
        experts_per_token=kept / max(tokens, 1) if record else float("nan"),
    )
