"""The running batch of a continuous-batching server: its rows' KV caches side by side.

Rows of different lengths share one transformers ``DynamicCache`` of shape [B, heads, L, d] per
layer, left-padded: row b's real tokens are the last ``mask[b].sum()`` columns (``mask`` [B, L],
1 = real). A new row joins with its own prefilled cache (the shorter side is padded on the left);
finished rows leave (their rows removed, then columns that are padding in every row). Positions
are explicit (each row's real length), so a row's attention and rotary embeddings are those it
would have alone; padded keys are masked out.

Only caches whose every layer is a plain growing ``DynamicLayer`` can be joined this way (a
sliding-window or linear-attention layer keeps another shape): :func:`joinable` says so, and the
engine then serves one request at a time.
"""

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def joinable(cache: DynamicCache) -> bool:
    """Whether rows of this cache can be joined and split (every layer a plain DynamicLayer)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def kv_layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, each holding ``keys`` / ``values`` [B, h, L, d] (see :func:`joinable`)."""
    return list(cache.layers)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, h, L, d] → [B, h, n + L, d], zeros in front."""
    return t if n == 0 else torch.nn.functional.pad(t, (0, 0, n, 0))


@dataclass
class Batch:
    """The running rows' cache and mask; ``last`` [B]: each row's newest token (its next input)."""

    cache: DynamicCache
    mask: torch.Tensor
    last: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def real_lengths(self) -> torch.Tensor:
        """Tokens each row has cached [B] (its next token's position)."""
        return self.mask.sum(dim=1)

    def join(self, cache: DynamicCache, token: int) -> None:
        """Append a row: ``cache`` of one prefilled request [1, h, L', d]; ``token`` its next input."""
        new_len = cache.get_seq_length()
        width = max(self.length, new_len)
        for mine, theirs in zip(kv_layers(self.cache), kv_layers(cache), strict=True):
            pad_mine, pad_theirs = width - self.length, width - new_len
            mine.keys = torch.cat([_pad_left(mine.keys, pad_mine), _pad_left(theirs.keys, pad_theirs)])
            mine.values = torch.cat([_pad_left(mine.values, pad_mine), _pad_left(theirs.values, pad_theirs)])
        row = torch.cat(
            [torch.zeros(width - new_len, dtype=self.mask.dtype), torch.ones(new_len, dtype=self.mask.dtype)]
        )
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (width - self.length, 0)), row[None]])
        self.last = torch.cat([self.last, torch.tensor([token])])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop the columns that are padding in all of them."""
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        real = mask.any(dim=0)
        first = int(real.nonzero()[0]) if bool(real.any()) else mask.shape[1]
        for layer in kv_layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = mask[:, first:]
        self.last = self.last.index_select(0, index)

    def step_inputs(self) -> dict[str, torch.Tensor]:
        """The decode forward's inputs: every row's newest token at its own position."""
        positions = self.real_lengths()[:, None]
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=self.mask.dtype)], dim=1)
        return {"input_ids": self.last[:, None], "attention_mask": self.mask, "position_ids": positions}


def single(cache: DynamicCache, token: int) -> Batch:
    """A batch of one prefilled request."""
    n = cache.get_seq_length()
    return Batch(cache, torch.ones(1, n, dtype=torch.long), torch.tensor([token]))


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token from one row's logits [V]: argmax at temperature 0, else a draw from the
    nucleus (the smallest set of tokens whose probability reaches ``top_p``) at ``temperature``."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p  # mass before it reaches top_p
        sorted_p[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
