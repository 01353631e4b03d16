"""Tokens per expert, per row of a forward, from the recorded layer traces.

A forward's rows (its batch) may be separate requests (a scorer's batch of sequences): every
token belongs to one row, padding to none. Per row r, layer l and expert e:
    sent[r, l, e]     tokens the policy sent to e (answered or not),
    kept[r, l, e]     tokens e answered for (what the model combined),
    dropped[r, l, e]  the router's candidates that did not run (dropped by the policy or lost),
and the share of router importance kept per token, averaged over the row's tokens and layers.
"""

from dataclasses import dataclass

import torch

from wdmoe.channel.units import FloatArray
from wdmoe.types import LayerTrace


@dataclass(frozen=True)
class RowLoads:
    """Expert loads of R rows: sent, kept, dropped [R, L, E]; retained importance [R]."""

    sent: FloatArray
    kept: FloatArray
    dropped: FloatArray
    mass: list[float]



def _count(
    idx: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor, rows: int, experts: int
) -> torch.Tensor:
    flat = (idx[:, None] * experts + candidates).reshape(-1)
    return torch.bincount(flat, mask.reshape(-1).double(), rows * experts).reshape(rows, experts)


def row_loads(traces: list[LayerTrace], num_experts: int, row: torch.Tensor, rows: int) -> RowLoads:
    """Per row r < ``rows`` of a forward (``row`` [T]: each token's row, −1 for padding), in one
    pass per layer (module doc)."""
    real = row >= 0
    idx = row.clamp_min(0).long()
    shape = (rows, len(traces), num_experts)
    sent, kept, dropped = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
    share_sum = torch.zeros(rows, dtype=torch.float64)
    for layer, t in enumerate(traces):
        keep = t.keep & real[:, None]
        sent[:, layer] = _count(idx, t.candidates, t.sent & real[:, None], rows, num_experts)
        kept[:, layer] = _count(idx, t.candidates, keep, rows, num_experts)
        dropped[:, layer] = _count(idx, t.candidates, ~t.keep & real[:, None], rows, num_experts)
        imp = torch.softmax(t.logits.double(), -1).gather(-1, t.candidates)
        share = (imp * t.keep).sum(-1) / imp.sum(-1).clamp_min(1e-30)
        share_sum += torch.bincount(idx[real], share[real], rows)
    count = torch.bincount(idx[real], minlength=rows).double() * len(traces)
    mass = torch.where(count > 0, share_sum / count.clamp_min(1), 1.0)
    return RowLoads(sent.numpy(), kept.numpy(), dropped.numpy(), [float(m) for m in mass])


def expert_loads(traces: list[LayerTrace], num_experts: int) -> RowLoads:
    """The loads of a forward taken as one request (every token in row 0)."""
    return row_loads(traces, num_experts, torch.zeros(len(traces[0].keep), dtype=torch.long), 1)


def token_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The row of every token [B·S] (row-major over [B, S], as the MoE blocks flatten), −1 for
    padding; a mask wider than the ids (a cached forward's) is read on its last S columns."""
    b, s = int(input_ids.shape[0]), int(input_ids.shape[-1])
    rows = torch.arange(b)[:, None].expand(b, s)
    if attention_mask is None:
        return rows.reshape(-1)
    return torch.where(attention_mask[:, -s:].bool(), rows, -1).reshape(-1)


def row_lengths(row: torch.Tensor, rows: int) -> list[int]:
    """Real tokens per row, from :func:`token_rows`."""
    return [int(n) for n in torch.bincount(row[row >= 0], minlength=rows)]
