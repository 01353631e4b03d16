"""Energy against latency: the `energy` allocator's trade-off curve on the paper cell.

    OMP_NUM_THREADS=1 WDMOE_DATA=/work/shared/benchmarks python benchmarks/energy_tradeoff.py \
        [--items 30] [--repeats 4] [--slacks 0,0.05,0.1,0.2,0.5,1.0] [--theta 0.1] [--seed 0]

No LLM runs per slack. The default model's router scores (topk) on the first ITEMS ARC-Easy items
are recorded once, and each item becomes one prefill request priced at the `paper` scenario's own
(Mixtral-8x7B) dimensions, exactly as the Mixtral latency study does
(:mod:`wdmoe.studies.latency_study`): request i (item i mod ITEMS, REPEATS passes over the items)
arrives at i·Δ (Δ = 1 s) on the seed's channel trace; WDMoE θ selects per layer on the BS's
view (the equal-split latency view: it does not depend on the allocator, so every allocator prices
the same loads, and comparisons are paired); :func:`wdmoe.latency.pricing.price_forward` prices
the loads with each allocator's split (calls settled by the default deadline rule) and
:func:`wdmoe.latency.energy.device_energy` gives the devices' compute + radio energy.

Per request: latency / prefill tokens (s per token) and energy / prefill tokens (J per token);
each row gives their mean over the n requests and its standard error (sample std / √n), the radio
and compute parts, and the per-request ratios to `minmax` (paired means). Rows: `equal` and
`minmax` (references), then `energy` at each slack. Writes benchmarks/results/energy_tradeoff.json;
`wdmoe report benchmarks/results/energy_tradeoff.json` turns it into a table and energy_tradeoff.png.
"""

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wdmoe.allocation import Allocator, make_allocator
from wdmoe.allocation.energy import energy_params
from wdmoe.config import ScenarioConfig, load_scenario
from wdmoe.latency.cell import Cell, CellSnapshot
from wdmoe.latency.deadline import DeadlineRule
from wdmoe.latency.energy import EnergyModel, device_energy
from wdmoe.latency.pricing import Calls, price_forward
from wdmoe.loads import expert_loads
from wdmoe.policies import Policy, make_policy
from wdmoe.studies.latency_study import (
    DEFAULT_INTERVAL_S,
    RouterSample,
    collect_logits,
    layer_logits,
    mixtral_route,
    one_thread,
    study_prompts,
)
from wdmoe.studies.runner import EvalPoint, Evaluator
from wdmoe.types import LayerTrace

OUT = Path(__file__).resolve().parent / "results" / "energy_tradeoff.json"
TASK = "arc_easy"


def request_loads(
    sample: RouterSample, scenario: ScenarioConfig, policy: Policy, snap: CellSnapshot
) -> tuple[np.ndarray, int]:
    """Device loads n [L, U] the policy keeps for one prompt on the BS's view, and its tokens (as
    :func:`wdmoe.studies.latency_study.price_request` forms them: unreachable experts skipped)."""
    m = scenario.model
    traces = []
    for layer, logits in enumerate(layer_logits(sample, m.num_layers, m.num_experts)):
        route = mixtral_route(logits, m.top_k)
        sel = policy.select(route, snap.view)
        traces.append(LayerTrace(layer, logits, route.candidates, sel.keep, sel.weights))
    kept = expert_loads(traces, m.num_experts).kept[0]
    kept = np.where(snap.view.unreachable_experts(), 0.0, kept)
    return np.asarray(snap.view.device_tokens(kept)), int(sample[0].shape[0])


def price(
    loads: np.ndarray, tokens: int, scenario: ScenarioConfig, allocator: Allocator, snap: CellSnapshot
) -> tuple[float, float, float]:
    """(latency s, compute J, radio J) of one prefill request's loads [L, U] under ``allocator``."""
    calls = Calls(DeadlineRule(), snap.true_up)
    priced = price_forward(snap.view, snap.true, allocator, scenario, loads, tokens, 0, calls)
    energy = EnergyModel.from_scenario(scenario, snap.true.num_devices)
    spent = device_energy(
        energy, priced.device_tokens, priced.latency.devices, snap.view.cost.flops_per_token
    )
    return float(priced.latency.total_s), float(spent.compute_j.sum()), float(spent.radio_j.sum())


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan


def summarise(
    label: str, slack: float | None, costs: np.ndarray, base: np.ndarray, tokens: np.ndarray
) -> dict:
    """One row from per-request costs [n, 3] (s, J compute, J radio) and minmax's [n, 3]."""
    latency, energy = costs[:, 0] / tokens, (costs[:, 1] + costs[:, 2]) / tokens
    row: dict[str, Any] = {"allocator": label, "slack": slack, "n": int(tokens.size)}
    for name, values in (
        ("latency_per_token_s", latency),
        ("energy_per_token_j", energy),
        ("radio_per_token_j", costs[:, 2] / tokens),
        ("compute_per_token_j", costs[:, 1] / tokens),
        ("latency_vs_minmax", costs[:, 0] / base[:, 0]),
        ("energy_vs_minmax", costs[:, 1:].sum(1) / base[:, 1:].sum(1)),
    ):
        row[f"{name}_mean"], row[f"{name}_stderr"] = mean_stderr(values)
    return row


def run(samples: list[RouterSample], scenario: ScenarioConfig, args: argparse.Namespace) -> list[dict]:
    """Every request on its own snapshot, priced by each allocator (paired); rows as summarise."""
    allocators: dict[str, tuple[float | None, Allocator]] = {
        "equal": (None, make_allocator("equal")),
        "minmax": (None, make_allocator("minmax")),
    }
    for slack in args.slacks:
        allocators[f"energy s={slack:g}"] = (
            slack,
            make_allocator("energy", **energy_params(scenario, slack)),
        )
    requests = len(samples) * args.repeats
    cell = Cell(scenario, int(requests * DEFAULT_INTERVAL_S // scenario.channel.coherence_s) + 1, args.seed)
    policy = make_policy("wdmoe", theta=args.theta)
    costs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in allocators}
    tokens = []
    for i in range(requests):
        snap = cell.snapshot(i * DEFAULT_INTERVAL_S)
        loads, n = request_loads(samples[i % len(samples)], scenario, policy, snap)
        tokens.append(n)
        for name, (_, allocator) in allocators.items():
            costs[name].append(price(loads, n, scenario, allocator, snap))
    base, count = np.array(costs["minmax"]), np.array(tokens, dtype=np.float64)
    return [summarise(name, s, np.array(costs[name]), base, count) for name, (s, _) in allocators.items()]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=30, help="ARC-Easy items (prompts)")
    p.add_argument("--repeats", type=int, default=4, help="passes over the items, each on new fades")
    p.add_argument(
        "--slacks", type=lambda t: [float(v) for v in t.split(",")], default=[0, 0.05, 0.1, 0.2, 0.5, 1.0]
    )
    p.add_argument("--theta", type=float, default=0.1, help="WDMoE θ (at the scenario's k = 2)")
    p.add_argument("--seed", type=int, default=0, help="channel trace seed")
    p.add_argument("--scenario", default="paper")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args()


def main() -> None:
    args = parse()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    wm, tok = Evaluator().model(EvalPoint(model="default"))
    prompts = study_prompts([TASK], args.items, None)
    samples = collect_logits(wm, tok, prompts)
    scores_s = time.perf_counter() - t0
    scenario = load_scenario(args.scenario, [])
    with one_thread():
        rows = run(samples, scenario, args)
    config = {
        "task": TASK,
        "items": len(samples),
        "repeats": args.repeats,
        "policy": "wdmoe",
        "theta": args.theta,
        "seed": args.seed,
        "interval_s": DEFAULT_INTERVAL_S,
        "source_model": "default (router scores, topk)",
        "scenario": scenario.to_dict(),
        "data_dir": os.environ.get("WDMOE_DATA"),
    }
    payload = {
        "study": "energy_tradeoff",
        "config": config,
        "rows": rows,
        "wall_s": {"router_scores": scores_s, "total": time.perf_counter() - t0},
        "cpu_s": time.process_time(),
        "host": {"python": platform.python_version(), "torch_threads": 1},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for r in rows:
        print(
            f"{r['allocator']:>16}  n={r['n']}  latency {1e3 * r['latency_per_token_s_mean']:.3f} ± "
            f"{1e3 * r['latency_per_token_s_stderr']:.3f} ms/token  "
            f"energy {r['energy_per_token_j_mean']:.4f} ± {r['energy_per_token_j_stderr']:.4f} J/token  "
            f"(×{r['latency_vs_minmax_mean']:.3f} latency, "
            f"×{r['energy_vs_minmax_mean']:.3f} energy vs minmax)"
        )
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s ({time.process_time():.0f} s of CPU)")


if __name__ == "__main__":
    main()
