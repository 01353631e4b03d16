"""`minmax` bandwidth allocation vs a generic convex solver (cvxpy + CLARABEL), side by side.

    python benchmarks/allocation.py [--problems 5] [--out benchmarks/results/allocation.json]

For U = 8, 64 and 512 devices: random token loads (0–4 tokens per device) on random channel
snapshots of the `paper` scenario (Shannon, and with a 3 dB gap and a 5 bit/s/Hz cap). Prints
minmax's solve time (best of repeated calls), cvxpy's wall time (build + canonicalise + solve)
and CLARABEL's own solve time, their ratios, and the largest relative difference of the optimum
(goal: ≤ 1e-6) over the problems CLARABEL solves (it fails on a few badly scaled 512-device
cells; minmax's answers there are checked by the tests' optimality conditions instead).
Goals: minmax ≥ 100× faster than cvxpy, and under 1 ms at 8 devices.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cvxpy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_allocation import cvxpy_problem
from wdmoe.allocation import make_allocator
from wdmoe.channel import generate_trace
from wdmoe.config import load_scenario
from wdmoe.latency import ExpertCost, device_time_s, layer_demand
from wdmoe.latency.devices import devices_for, effective_flops_per_s

LINKS = {"shannon": [], "gap+cap": ["cell.snr_gap_db=3", "cell.max_se_bps_per_hz=5.0"]}


def problem(num_devices: int, seed: int, links: str):
    cfg = load_scenario("paper", [f"cell.num_devices={num_devices}", *LINKS[links]])
    state = generate_trace(cfg, 1, seed=seed).state(0)
    tokens = np.random.default_rng(seed).integers(0, 5, num_devices)
    tokens[0] = max(tokens[0], 1)
    flops = effective_flops_per_s(devices_for(cfg.cell.device_classes, num_devices))
    return layer_demand(tokens, flops, ExpertCost.from_config(cfg)), state


def time_minmax(demand, state) -> tuple[float, float]:
    """(best seconds per call over 5 rounds, the makespan it reaches)."""
    minmax = make_allocator("minmax")
    alloc = minmax.allocate(demand, state)
    calls = max(1, int(0.05 / max(_once(minmax, demand, state), 1e-6)))
    best = min(_per_call(minmax, demand, state, calls) for _ in range(5))
    return best, float(device_time_s(demand, state, alloc.bandwidth_hz)[demand.active].max())


def _once(minmax, demand, state) -> float:
    t0 = time.perf_counter()
    minmax.allocate(demand, state)
    return time.perf_counter() - t0


def _per_call(minmax, demand, state, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        minmax.allocate(demand, state)
    return (time.perf_counter() - t0) / calls


def time_cvxpy(demand, state) -> tuple[float, float, float] | None:
    """(wall seconds: build + solve, CLARABEL's own solve seconds, optimum T* in seconds), or None
    when CLARABEL fails (it does on some badly scaled cells: SNRs spanning ten decades)."""
    t0 = time.perf_counter()
    prob, t_ms, _ = cvxpy_problem(demand, state)
    try:
        prob.solve(solver=cp.CLARABEL)
    except cp.SolverError:
        return None
    if prob.status != cp.OPTIMAL:
        return None
    return time.perf_counter() - t0, prob.solver_stats.solve_time, float(t_ms.value) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=5, help="random problems per size and link model")
    ap.add_argument("--sizes", default="8,64,512")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/allocation.json"))
    args = ap.parse_args()
    rows = []
    head = (
        "U",
        "links",
        "minmax ms",
        "cvxpy ms",
        "ratio",
        "clarabel ms",
        "ratio",
        "max rel diff",
        "cvxpy solved",
    )
    print("{:>4} {:8} {:>10} {:>10} {:>7} {:>12} {:>7} {:>12} {:>12}".format(*head))
    for size in (int(s) for s in args.sizes.split(",")):
        for links in LINKS:
            ours, wall, solver, diff = [], [], [], []
            for seed in range(args.problems):
                demand, state = problem(size, seed, links)
                t_ours, best_ours = time_minmax(demand, state)
                ours.append(t_ours)
                cvx = time_cvxpy(demand, state)
                if cvx is None:
                    continue
                wall.append(cvx[0])
                solver.append(cvx[1])
                diff.append(abs(best_ours - cvx[2]) / cvx[2])
            row = {
                "devices": size,
                "links": links,
                "minmax_ms": 1e3 * statistics.median(ours),
                "cvxpy_ms": 1e3 * statistics.median(wall),
                "clarabel_ms": 1e3 * statistics.median(solver),
                "max_rel_diff": max(diff),
                "cvxpy_solved": f"{len(wall)}/{args.problems}",
            }
            row["speedup_vs_cvxpy"] = row["cvxpy_ms"] / row["minmax_ms"]
            row["speedup_vs_clarabel"] = row["clarabel_ms"] / row["minmax_ms"]
            rows.append(row)
            print(
                f"{size:>4} {links:8} {row['minmax_ms']:>10.3f} {row['cvxpy_ms']:>10.1f} "
                f"{row['speedup_vs_cvxpy']:>6.0f}× {row['clarabel_ms']:>12.2f} "
                f"{row['speedup_vs_clarabel']:>6.1f}× {row['max_rel_diff']:>12.1e} {row['cvxpy_solved']:>12}",
                flush=True,
            )
    goals = {
        "same_optimum_1e-6": all(r["max_rel_diff"] <= 1e-6 for r in rows),
        "100x_faster_than_cvxpy": all(r["speedup_vs_cvxpy"] >= 100 for r in rows),
        "under_1ms_at_8": all(r["minmax_ms"] < 1.0 for r in rows if r["devices"] == 8),
    }
    print("goals:", ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"problems": args.problems, "rows": rows, "goals": goals}, indent=1))


if __name__ == "__main__":
    main()
