"""MoEfication (Zhang et al., 2022): turn a dense SwiGLU FFN into E experts plus a router.

Each layer's F neurons are split into E equal groups by balanced k-means on the neurons' gate
weight vectors; expert e holds its group's rows of W_gate, W_up and columns of W_down, so the
dense FFN equals the sum of all experts exactly. A router per layer predicts each expert's output
log-norm log ‖expert_e(x)‖ from the FFN input x (a linear predictor fitted by ridge regression on
the model's own activations), and the top-k experts by predicted norm run. softmax(scores) is then
each expert's predicted share of the output norm: its importance to the token.
"""

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from wdmoe.models.experts import FusedExperts


class MoEfiedRouter(nn.Module):
    """Scores s = x·Wᵀ + b [T, E] (predicted log output norms of the experts); proposes the top-k.

    Returns (scores [T, E], combine weights [T, K] = 1, candidate ids [T, K]) like a
    transformers 5.x router, so the wireless block treats it like any other.
    """

    def __init__(self, num_experts: int, hidden_size: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = F.linear(x.reshape(-1, self.weight.shape[1]), self.weight, self.bias)
        _, candidates = torch.topk(scores, self.top_k, dim=-1)
        return scores, torch.ones_like(candidates, dtype=scores.dtype), candidates


class MoEfiedMLP(nn.Module):
    """A dense FFN split into experts: y = Σ_{e ∈ top-k(x)} expert_e(x)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, top_k: int, act: str) -> None:
        super().__init__()
        self.gate = MoEfiedRouter(num_experts, hidden_size, top_k)
        self.experts = FusedExperts(num_experts, hidden_size, expert_size, act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        _, _, candidates = self.gate(x)
        out = torch.zeros_like(x)
        for e in torch.unique(candidates).tolist():
            token = torch.where((candidates == e).any(-1))[0]
            gate, up = F.linear(x[token], self.experts.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, token, F.linear(self.experts.act_fn(gate) * up, self.experts.down_proj[e]))
        return out.reshape(hidden.shape)


def balanced_kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
    """Partition N points [N, P] into k clusters of exactly N/k points each → labels [N].

    Lloyd iterations whose assignment step is greedy under capacity: (point, centre) pairs are
    taken in order of increasing distance, each point once, each centre up to N/k times.
    """
    n = points.shape[0]
    assert n % k == 0, f"{n} neurons do not split into {k} equal experts"
    cap = n // k
    centres = points[rng.choice(n, size=k, replace=False)]
    labels = np.full(n, -1)
    for _ in range(iters):
        dist = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # [N, k]
        new = np.full(n, -1)
        fill = np.zeros(k, dtype=int)
        for flat in np.argsort(dist, axis=None, kind="stable"):
            i, c = divmod(int(flat), k)
            if new[i] < 0 and fill[c] < cap:
                new[i], fill[c] = c, fill[c] + 1
        if np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([points[labels == c].mean(0) for c in range(k)])
    return labels


def partition_layer(gate_w: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    """Neuron order [F] that groups each expert's neurons contiguously (expert-major, sorted)."""
    vecs = F.normalize(gate_w.detach().float(), dim=-1).numpy().astype(np.float64)
    labels = balanced_kmeans(vecs, num_experts, np.random.default_rng(seed))
    return torch.from_numpy(np.argsort(labels, kind="stable"))


def moefy_mlp(mlp: Any, order: torch.Tensor, num_experts: int, top_k: int, act: str) -> MoEfiedMLP:
    """Build a MoEfiedMLP from a dense LlamaMLP-like module and a neuron order [F]."""
    f, d = mlp.gate_proj.weight.shape
    fe = f // num_experts
    moe = MoEfiedMLP(num_experts, d, fe, top_k, act)
    gate = mlp.gate_proj.weight.detach()[order].reshape(num_experts, fe, d)
    up = mlp.up_proj.weight.detach()[order].reshape(num_experts, fe, d)
    down = mlp.down_proj.weight.detach()[:, order].reshape(d, num_experts, fe).permute(1, 0, 2)
    with torch.no_grad():
        moe.experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
        moe.experts.down_proj.copy_(down)
    return moe


def expert_output_norms(experts: FusedExperts, x: torch.Tensor) -> torch.Tensor:
    """‖expert_e(x_t)‖₂ for every token and expert: x [T, D] → [T, E] (the oracle's scores)."""
    h = torch.einsum("td,efd->etf", x, experts.gate_up_proj)
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("etf,edf->etd", experts.act_fn(gate) * up, experts.down_proj)
    return y.norm(dim=-1).T


def fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with an L2 penalty: min ‖[x 1]·[Wᵀ; b] − y‖² + l2·‖W‖² → (W [E, D], b [E])."""
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1).double()
    reg = torch.eye(xa.shape[1], dtype=torch.float64) * l2 * x.shape[0]
    reg[-1, -1] = 0.0
    sol = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y.double())
    return sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()


class OracleRouter(nn.Module):
    """Ranks experts by their true output norms (computes every expert): the reference a
    learned router is measured against. Same outputs as :class:`MoEfiedRouter`."""

    def __init__(self, experts: FusedExperts, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.experts = [experts]  # a list, so the experts are not registered twice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = expert_output_norms(self.experts[0], x.reshape(-1, x.shape[-1]))
        _, candidates = torch.topk(scores, self.top_k, dim=-1)
        return scores, torch.ones_like(candidates, dtype=scores.dtype), candidates
