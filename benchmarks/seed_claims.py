"""The seed's claims on the default model and the `paper` cell: WDMoE-θ against vanilla top-k.

    python benchmarks/seed_claims.py [--limit N] [--out benchmarks/results/seed_claims.jsonl]

Every point runs on the simulated cell of the current code (link outage, deadlines, a channel that
moves layer by layer: README "The simulated cell"); records made on an older cell carry other
config keys, so give a new --out to keep the two apart (benchmarks/results/seed_claims.cell.jsonl
holds the run on the issue-11 cell).

The goal (issue 4): ≥ 1.65× lower mean end-to-end latency than vanilla top-k (equal bandwidth, as
the paper's Mixtral baseline) with ≤ 2 points lower accuracy on ARC-Easy and PIQA (dev files, all
items: no --limit), and at least one beyond-paper policy that dominates WDMoE-θ (no lower accuracy
at lower latency). Every configuration below runs on the same channel trace (seed 0); records go to
a resumable JSON Lines file (rerun the same command to continue an interrupted run), then the
comparison table is printed and written next to it as JSON.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

from wdmoe.eval.results import read_records
from wdmoe.simulate import SimSettings
from wdmoe.studies.runner import EvalPoint, Evaluator, PolicySpec

TASKS = ("arc_easy", "piqa")
# (label, policy, params, allocator): the baseline first, then WDMoE-θ (k-scaled: θ·2/k at k = 7),
# then the beyond-paper policies.
CONFIGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("topk (equal)", "topk", {}, "equal"),
    ("topk + minmax", "topk", {}, "minmax"),
    ("wdmoe θ=0.1", "wdmoe", {"theta": 0.1, "k_scaled": True}, "minmax"),
    ("wdmoe θ=0.2", "wdmoe", {"theta": 0.2, "k_scaled": True}, "minmax"),
    ("joint θ=0.1", "joint", {"theta": 0.1, "k_scaled": True}, "minmax"),
    ("joint θ=0.2", "joint", {"theta": 0.2, "k_scaled": True}, "minmax"),
    ("budget τ=100ms", "budget", {"tau_s": 0.1}, "minmax"),
    ("budget τ=300ms", "budget", {"tau_s": 0.3}, "minmax"),
]


def label_of(record: dict[str, Any]) -> str | None:
    cfg = record["config"]
    for label, policy, params, allocator in CONFIGS:
        if cfg["policy"] == {"name": policy, "params": params} and cfg["allocator"] == allocator:
            return label
    return None


def table(records: list[dict[str, Any]], limit: int | None) -> dict[str, dict[str, dict[str, float]]]:
    """label → task → acc, acc_norm, mean latency (s), speed-up and accuracy change vs topk (equal)."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        label = label_of(r)
        if label is not None and r["config"]["limit"] == limit:
            rows.setdefault(label, {})[r["task"]] = {
                "n": r["n"],
                "acc": r["metrics"]["acc"],
                "acc_norm": r["metrics"]["acc_norm"],
                "mean_s": r["latency"]["mean_s"],
                "p50_s": r["latency"]["p50_s"],
                "experts_per_token": r["latency"]["experts_per_token"],
                "outage_requests": r["latency"].get("outage_requests", float("nan")),
                "late_requests": r["latency"].get("late_requests", float("nan")),
            }
    base = rows.get("topk (equal)", {})
    for per_task in rows.values():
        for task, v in per_task.items():
            if task in base:
                v["speedup"] = base[task]["mean_s"] / v["mean_s"]
                v["p50_speedup"] = base[task]["p50_s"] / v["p50_s"]
                v["acc_change_points"] = 100 * (v["acc"] - base[task]["acc"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seed_claims.jsonl")
    parser.add_argument("--only", default=None, help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    evaluator = Evaluator()
    wanted = None if args.only is None else {x.strip() for x in args.only.split(",")}
    for label, policy, params, allocator in CONFIGS:
        if wanted is not None and label not in wanted:
            continue
        sim = SimSettings(allocator=allocator, seed=0)
        point = EvalPoint(policy=PolicySpec(policy, params), sim=sim, limit=args.limit)
        start = time.perf_counter()
        evaluator.run(point, TASKS, args.out)
        print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = table(read_records(args.out), args.limit)
    print(
        f"\n{'config':<16} {'task':<9} {'n':>5} {'acc':>6} {'Δacc pt':>8} {'mean s':>8} {'p50 s':>7} "
        f"{'×mean':>6} {'×p50':>6} {'exp/tok':>7} {'outage%':>7}"
    )
    for label, per_task in rows.items():
        for task, v in per_task.items():
            print(
                f"{label:<16} {task:<9} {v['n']:>5} {v['acc']:>6.3f} {v.get('acc_change_points', 0):>+8.1f} "
                f"{v['mean_s']:>8.3f} {v['p50_s']:>7.3f} {v.get('speedup', 1):>6.2f} "
                f"{v.get('p50_speedup', 1):>6.2f} {v['experts_per_token']:>7.2f} "
                f"{100 * v['outage_requests']:>7.1f}"
            )
    summary = args.out.with_suffix(f".{args.limit or 'all'}.summary.json")
    summary.write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=2))
    print(f"\nrecords: {args.out}\nsummary: {summary}")


if __name__ == "__main__":
    main()
