"""Latency under load in both faces, side by side: the simulator and a running BS on the same cell.

    OMP_NUM_THREADS=1 python benchmarks/load_curve.py [--rates 0.5,1,2,4] [--requests 16]
        [--new-tokens 16] [--policy wdmoe --theta 0.1 --allocator minmax] [--seed 0]

The default model on the ``lab`` cell (8 devices): requests arrive as a Poisson process of rate λ
(the same unit gaps at every λ, ``--seed``), greedy, the built-in prompts in turn.

- runtime: a ``Cluster`` (the BS and 8 device processes on loopback, the stream data plane) with
  link emulation at time scale 1 (every DL/UL waits out its bytes at the channel's rate), served
  by continuous batching (``--max-active 16``); the load generator of ``wdmoe load --bs``.
- sim: ``simulate_load`` on the same scenario, policy, allocator and channel seed.

Prints per λ: completed, TTFT p50/p95, TPOT p50/p95 and tokens/s of each face and the ratio
runtime ÷ sim of the medians (what the software adds on top of the cell: 1.0 would be a runtime
that costs nothing but the links). Writes benchmarks/results/load_curve.{sim,runtime}.jsonl (the
records; `wdmoe report` reads them) and load_curve.json (the summary, with the load average).
"""

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from wdmoe.config import load_scenario
from wdmoe.models.install import install
from wdmoe.models.loading import load_checkpoint
from wdmoe.policies import make_policy
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.cluster import Cluster
from wdmoe.runtime.loadgen import LoadTarget, run_load
from wdmoe.serving.load import DEFAULT_PROMPTS, LoadRecord, poisson_arrivals, summarize
from wdmoe.serving.sim_load import simulate_load
from wdmoe.simulate import SimSettings
from wdmoe.studies.load_io import append_load_record

RESULTS = Path(__file__).parent / "results"


def run_faces(args: argparse.Namespace, rates: list[float]) -> dict[str, list[LoadRecord]]:
    """Every λ in both faces; the records of each face."""
    params = {"theta": args.theta} if args.policy.startswith("wdmoe") else {}
    config = {
        "policy": args.policy,
        **params,
        "allocator": args.allocator,
        "scenario": "lab",
        "seed": args.seed,
    }
    out: dict[str, list[LoadRecord]] = {"sim": [], "runtime": []}
    for face in out:
        path = RESULTS / f"load_curve.{face}.jsonl"
        path.unlink(missing_ok=True)
    net, tok = load_checkpoint("default")
    wm = install(net, make_policy(args.policy, **params))
    scenario = load_scenario("lab", ["model=smollm2-moe8"])
    for rate in rates:
        arrivals = poisson_arrivals(rate, args.requests, args.seed)
        out["sim"] += simulate_load(
            wm, tok, scenario, SimSettings(allocator=args.allocator, seed=args.seed),
            prompts=DEFAULT_PROMPTS, arrivals_s=arrivals, max_new_tokens=args.new_tokens,
            max_batch=16, rate_per_s=rate,
        )  # fmt: skip
    del wm, net
    settings = RuntimeSettings(
        policy=args.policy, params=params, allocator=args.allocator, emulate_links=True, seed=args.seed
    )
    with Cluster("default", 8, settings=settings) as cluster:
        target = LoadTarget(cluster.bs_address, cluster.token, max_new_tokens=args.new_tokens)
        for rate in rates:
            arrivals = poisson_arrivals(rate, args.requests, args.seed)
            out["runtime"] += run_load(target, arrivals, DEFAULT_PROMPTS, rate_per_s=rate)
    for face, records in out.items():
        for r in records:
            append_load_record(RESULTS / f"load_curve.{face}.jsonl", replace(r, config=config))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="0.5,1,2,4")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--policy", default="wdmoe")
    parser.add_argument("--theta", type=float, default=0.1)
    parser.add_argument("--allocator", default="minmax")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rates = [float(x) for x in args.rates.split(",")]
    load_start, start = os.getloadavg(), time.perf_counter()
    faces = run_faces(args, rates)
    rows: list[dict[str, Any]] = []
    print(f"{'λ/s':>5} {'face':<8}{'ok':>6}{'TTFT p50':>10}{'p95':>8}{'TPOT p50':>10}{'p95':>8}{'tok/s':>8}")
    for rate in rates:
        pair = {f: summarize([r for r in faces[f] if r.rate_per_s == rate]) for f in faces}
        for f, s in pair.items():
            print(
                f"{rate:>5} {f:<8}{s['completed']:>3}/{s['n']:<2}{s['ttft_p50']:>10.3f}{s['ttft_p95']:>8.3f}"
                f"{s['tpot_p50']:>10.3f}{s['tpot_p95']:>8.3f}{s['tokens_per_s']:>8.1f}"
            )
        ratio = {k: pair["runtime"][k] / pair["sim"][k] for k in ("ttft_p50", "tpot_p50")}
        print(f"{'':>5} runtime ÷ sim: TTFT p50 {ratio['ttft_p50']:.2f}×, TPOT p50 {ratio['tpot_p50']:.2f}×")
        rows.append({"rate_per_s": rate, **pair, "runtime_over_sim": ratio})
    summary = {
        "config": vars(args),
        "rows": rows,
        "wall_s": time.perf_counter() - start,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    (RESULTS / "load_curve.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"times in s (sim: simulated; runtime: wall at time scale 1); wrote {RESULTS}/load_curve.*")


if __name__ == "__main__":
    main()
