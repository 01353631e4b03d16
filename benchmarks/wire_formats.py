"""Issue 14 item 4: activations sized to the link. Accuracy per wire format applied on every link
(float32, bfloat16, float16, int8 and fp8 with per-token scales) and the adaptive rule
(``wire.format=adaptive``: each device per layer by its link SNR on the BS's estimate), on ARC-Easy
and PIQA (dev files, the first ``--limit`` items: the same items for every format), the default
model on the `paper` cell (top-k, min-max bandwidth, channel seed ``--seed``).

    OMP_NUM_THREADS=1 python benchmarks/wire_formats.py [--limit 100] [--seed 0]   # --limit 0: all items
    python benchmarks/wire_formats.py --table        # only the table of the records so far

Every format runs the same requests on the same channel trace (from t = 0), so latencies are
paired by request: the adaptive rule's gain against float32 and bfloat16 is mean(other) /
mean(adaptive) over the requests of a task, with its standard error by the delta method on the
paired per-request latencies. The pairing is by item, not by channel: simulated time advances by
each run's own latency, so request i meets a different fading block in each run (the gap between
float16 and bfloat16, equal bits, shows the size of that and of routing differences).
Records go to a resumable JSON Lines file (rerun the same command to continue); the
summary (with n, stderr, seed and the resolved wire config) is written next to it as JSON.
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from wdmoe.eval.multiple_choice import paired_difference
from wdmoe.eval.results import read_records
from wdmoe.simulate import SimSettings
from wdmoe.studies.runner import EvalPoint, Evaluator, PolicySpec

RESULTS = Path(__file__).parent / "results"
TASKS = ("arc_easy", "piqa")
ALLOCATOR = "minmax"
FORMATS = ("float32", "bfloat16", "float16", "int8", "fp8", "adaptive")
BASELINES = ("float32", "bfloat16")


def point(fmt: str, seed: int, limit: int | None) -> EvalPoint:
    return EvalPoint(
        policy=PolicySpec("topk"),
        overrides=(f"wire.format={fmt}",),
        sim=SimSettings(allocator=ALLOCATOR, seed=seed),
        limit=limit,
    )


def find(records: list[dict[str, Any]], fmt: str, task: str, seed: int, limit: int | None) -> dict | None:
    """The newest record of format ``fmt`` on ``task``."""
    hits = [
        r
        for r in records
        if r["task"] == task
        and r["config"]["scenario"]["resolved"]["wire"]["format"] == fmt
        and r["config"]["seeds"]["channel"] == seed
        and r["config"]["limit"] == limit
        and r["config"]["allocator"] == ALLOCATOR
    ]
    return hits[-1] if hits else None


def ratio_with_stderr(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """R = mean(num)/mean(den) over paired samples and its delta-method standard error:
    se² = R²·(s_a²/a² + s_b²/b² − 2·s_ab/(a·b)) / n."""
    n = len(num)
    a, b = float(num.mean()), float(den.mean())
    cov = np.cov(np.stack([num, den]))
    r = a / b
    var = r * r * (cov[0, 0] / a**2 + cov[1, 1] / b**2 - 2 * cov[0, 1] / (a * b)) / n
    return r, math.sqrt(max(var, 0.0))


def cost_vs_float32(rows: dict[str, dict[str, Any]], fmt: str) -> dict[str, float]:
    """``fmt``'s accuracy change against float32 in points, with its paired stderr over items,
    where both records kept per-item outcomes ({} otherwise, or for float32 itself)."""
    base, mine = (rows[f].get("outcomes", {}).get("acc") if f in rows else None for f in ("float32", fmt))
    if fmt == "float32" or not base or not mine or len(base) != len(mine):
        return {}
    delta, se = paired_difference(base, mine)
    return {"delta_vs_float32_points": 100 * delta, "delta_vs_float32_paired_se_points": 100 * se}


def summarise(records: list[dict[str, Any]], seed: int, limit: int | None) -> dict[str, Any]:
    """Per task: accuracy ± stderr and latency per format; the adaptive rule's gains."""
    tasks: dict[str, Any] = {}
    for task in TASKS:
        rows = {f: r for f in FORMATS if (r := find(records, f, task, seed, limit)) is not None}
        per = {
            f: {
                "n": r["n"],
                "acc": r["metrics"]["acc"],
                "acc_stderr": r["stderr"]["acc"],
                "acc_norm": r["metrics"].get("acc_norm"),
                "requests": r["latency"]["requests"],
                "mean_s": r["latency"]["mean_s"],
                "p50_s": r["latency"]["p50_s"],
                **cost_vs_float32(rows, f),
            }
            for f, r in rows.items()
        }
        gains = {}
        if "adaptive" in rows:
            ada = np.asarray(rows["adaptive"]["latency"]["per_request_s"])
            for base in BASELINES:
                if base in rows:
                    other = np.asarray(rows[base]["latency"]["per_request_s"])
                    if len(other) == len(ada):
                        gain, se = ratio_with_stderr(other, ada)
                        gains[f"vs_{base}"] = {"gain": gain, "stderr": se, "requests": len(ada)}
        tasks[task] = {"formats": per, "adaptive_gain": gains}
    return tasks


def print_table(summary: dict[str, Any]) -> None:
    for task, t in summary.items():
        print(f"\n{task}")
        print(
            f"  {'format':<9} {'n':>4} {'acc ± se':>15} {'requests':>8} {'mean s':>8} {'p50 s':>8}"
            "  Δacc vs float32 (paired se)"
        )
        for f, s in t["formats"].items():
            delta = s.get("delta_vs_float32_points")
            se = s.get("delta_vs_float32_paired_se_points")
            cost = "" if delta is None else f"  {delta:+.1f} ± {se:.1f} pts"
            print(
                f"  {f:<9} {s['n']:>4} {s['acc']:>7.3f} ± {s['acc_stderr']:.3f} {s['requests']:>8} "
                f"{s['mean_s']:>8.4f} {s['p50_s']:>8.4f}{cost}"
            )
        for name, g in t["adaptive_gain"].items():
            print(
                f"  adaptive {name}: {g['gain']:.3f}× ± {g['stderr']:.3f} (paired, {g['requests']} requests)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=100, help="items per task (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="channel seed")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats, in order")
    parser.add_argument("--out", type=Path, default=RESULTS / "wire_formats.jsonl")
    parser.add_argument("--table", action="store_true", help="only print the table of the records so far")
    args = parser.parse_args()
    limit = args.limit or None
    evaluator = Evaluator()
    for fmt in [] if args.table else args.formats.split(","):
        start = time.perf_counter()
        evaluator.run(point(fmt, args.seed, limit), TASKS, args.out)
        print(f"{fmt}: {time.perf_counter() - start:.0f} s", flush=True)
    records = read_records(args.out) if args.out.exists() else []
    summary = summarise(records, args.seed, limit)
    print(f"seed {args.seed}, limit {limit}, allocator {ALLOCATOR}, policy topk, scenario paper")
    print_table(summary)
    wire = point("adaptive", args.seed, limit).load_scenario().wire
    path = args.out.with_suffix(".all.json" if limit is None else ".json")  # next to the records
    config = {
        "pairing": "by item; each run's clock (so its channel per request) follows its own latency",
        "seed": args.seed,
        "limit": limit,
        "allocator": ALLOCATOR,
        "policy": "topk",
        "scenario": "paper",
    }
    adaptive = {"formats": wire.adaptive_formats, "snr_db": wire.adaptive_snr_db}
    path.write_text(json.dumps({"config": config | {"adaptive_rule": adaptive}, "tasks": summary}, indent=2))
    print(f"\nrecords: {args.out}\nsummary: {path}")


if __name__ == "__main__":
    main()
