"""Expert placement by channel vs round-robin, side by side in one run.

    OMP_NUM_THREADS=1 WDMOE_DATA=/work/shared/benchmarks python benchmarks/placement.py \
        [--items 40] [--seed 0] [--out benchmarks/results/placement.json]

On the `paper` cell (8 devices dropped at 10–300 m with 8 dB shadowing: unequal links; the
default model's dimensions) with the default model, top-k and the equal split: router usage on
calibration text (16 × 128 tokens, never benchmark data), then three placements —
round-robin (expert e on device e mod 8), the plan with round-robin's memory (30 shards per
device) and the plan with each device class's memory — each priced two ways: the latency model's
expected layer latency J on the average channel (what the planner minimises), and a simulated
ARC-Easy eval of the first ``--items`` items on the same channel trace (seed), every (context +
choice) one request: mean / median latency, n, standard error, the mean ratio to round-robin,
accuracy and the expert-drop rate (top-k skips experts whose device's link is in outage).
J is also priced over 256 fading blocks of the trace (outage skipped as the simulator skips it).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from wdmoe.config import load_scenario
from wdmoe.models.install import install
from wdmoe.models.loading import load_checkpoint
from wdmoe.planning.files import placement_dict, write_placement
from wdmoe.planning.inputs import calibration_usage, memory_capacity, plan_problem
from wdmoe.planning.optimise import PlanProblem, expected_layer_s, plan, round_robin_placement
from wdmoe.simulate import SimSettings
from wdmoe.studies.runner import EvalPoint, Evaluator, PolicySpec, scenario_overrides

SCENARIO, TASK = "paper", "arc_easy"
FADING_SAMPLES = 256  # fading blocks of the trace J is also priced on (outage skipped)


def plans(seed: int, folder: Path) -> tuple[PlanProblem, list[dict[str, Any]]]:
    """The three placements, their J (average channel: what the plans minimise; and over
    ``FADING_SAMPLES`` fading blocks), and the files of the two plans."""
    cfg = load_scenario(SCENARIO, scenario_overrides("default", []))
    net, tok = load_checkpoint("default")
    wm = install(net)
    usage = calibration_usage(wm, tok)
    u, (layers, experts) = cfg.cell.num_devices, (cfg.model.num_layers, cfg.model.num_experts)
    rr = round_robin_placement(layers, experts, u)
    out = []
    for name, capacity in (
        ("plan, rr memory", np.full(u, layers * experts // u)),
        ("plan, class memory", memory_capacity(cfg)),
    ):
        problem = plan_problem(cfg, usage, capacity, seed=seed)
        t0 = time.perf_counter()
        placement = plan(problem)
        took_s = time.perf_counter() - t0
        path = folder / f"{name.split(', ')[1].replace(' ', '_')}.json"
        write_placement(path, placement_dict(placement, sorted(wm.blocks), u))
        out.append(
            {
                "name": name,
                "J_s": placement.expected_layer_s,
                "file": path,
                "capacity": capacity.tolist(),
                "plan_s": took_s,
                "shards": [len(s) for s in placement.shards(u)],
                "primary": placement.primary,
            }
        )
    problem = plan_problem(cfg, usage, np.full(u, layers * experts), seed=seed)
    fading = plan_problem(cfg, usage, np.full(u, layers * experts), seed=seed, samples=FADING_SAMPLES)
    rr_row = {
        "name": "round-robin",
        "J_s": expected_layer_s(problem, rr),
        "file": None,
        "capacity": None,
        "plan_s": 0.0,
        "shards": np.bincount(rr.ravel(), minlength=u).tolist(),
        "primary": rr,
    }
    rows = [rr_row, *out]
    for row in rows:
        row["J_fading_s"] = expected_layer_s(fading, row.pop("primary"))
    return problem, rows


def simulate(row: dict[str, Any], items: int, seed: int, folder: Path) -> dict[str, Any]:
    """The simulated ARC-Easy eval of one placement (topk, equal split, channel trace ``seed``)."""
    overrides = () if row["file"] is None else (f"cell.placement={row['file']}",)
    point = EvalPoint(
        model="default",
        policy=PolicySpec("topk"),
        scenario=SCENARIO,
        overrides=overrides,
        sim=SimSettings(seed=seed),
        limit=items,
    )
    (record,) = Evaluator().run(point, [TASK], folder / f"{row['name'].replace(' ', '_')}.jsonl")
    lat = np.asarray(record["latency"]["per_request_s"], dtype=np.float64)
    return {
        "n": int(lat.size),
        "mean_s": float(lat.mean()),
        "median_s": float(np.median(lat)),
        "stderr_s": float(lat.std(ddof=1) / np.sqrt(lat.size)),
        "drop_rate": float(record["latency"]["drop_rate"]),
        "acc": record["metrics"],
        "items": record["n"],
        "config": record["config"],
    }


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, tokens: float) -> None:
    base = rows[0]
    print(
        f"{SCENARIO} cell, default model, topk, equal split, seed {args.seed}, {TASK} first "
        f"{args.items} items, plan for T = {tokens:g} tokens/forward"
    )
    head = [
        "placement",
        "J avg ms",
        "J fade ms",
        "×J fade",
        "mean ms",
        "median ms",
        "stderr ms",
        "n",
        "×mean",
        "acc",
    ]
    print(f"{head[0]:20} " + " ".join(f"{h:>9}" for h in head[1:]))
    for r in rows:
        cells = [
            1e3 * r["J_s"],
            1e3 * r["J_fading_s"],
            base["J_fading_s"] / r["J_fading_s"],
            1e3 * r["mean_s"],
            1e3 * r["median_s"],
            1e3 * r["stderr_s"],
        ]
        acc = next(iter(r["acc"].values()))
        tail = f"{r['n']:9d} {base['mean_s'] / r['mean_s']:9.2f} {acc:9.3f} {r['drop_rate']:9.4f}"
        print(f"{r['name']:20} " + " ".join(f"{c:9.2f}" for c in cells) + " " + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/placement.json"))
    args = ap.parse_args()
    start_s = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wdmoe-placement-") as tmp:
        folder = Path(tmp)
        problem, rows = plans(args.seed, folder)
        for row in rows:
            row.update(simulate(row, args.items, args.seed, folder))
            row["file"] = None if row["file"] is None else Path(row["file"]).name
    print_table(rows, args, problem.tokens)
    print(f"wall time {time.perf_counter() - start_s:.0f} s")
    base = rows[0]
    result = {
        "scenario": SCENARIO,
        "task": TASK,
        "items": args.items,
        "seed": args.seed,
        "tokens": problem.tokens,
        "rows": [{k: v for k, v in r.items() if k != "config"} for r in rows],
        "config": base["config"],
        "argv": sys.argv[1:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
