"""Throughput of channel-trace generation and of the latency model (goal: ≥ 1e6 per second each).

    python benchmarks/channel_throughput.py [--out benchmarks/results/channel_throughput.json]

Trace generation counts device-steps (one device, one fading block: geometry, path loss, LOS,
shadowing and both directions' fading) per second, for the `paper` scenario (Rayleigh; static
and constant-velocity devices) and the `lab` one (random waypoint, Rician, InH) at several
(U devices, N blocks). The latency model
counts token-layer-device evaluations (entries of tokens [S, L, U] turned into device times,
layer waits and end-to-end latency) per second, for Mixtral dimensions.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from wdmoe.channel import generate_trace
from wdmoe.config import load_scenario
from wdmoe.latency import ExpertCost, bs_seconds, forward_latency, lm_head_flops
from wdmoe.latency.devices import devices_for, effective_flops_per_s


def best_seconds(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def trace_rows() -> list[dict]:
    rows = []
    for name, mobility in (("paper", "static"), ("paper", "constant_velocity"), ("lab", "random_waypoint")):
        for devices, blocks in ((8, 100_000), (64, 20_000), (1000, 1000)):
            cfg = load_scenario(name, [f"cell.num_devices={devices}", f"mobility.model={mobility}"])
            seconds = best_seconds(lambda cfg=cfg, blocks=blocks: generate_trace(cfg, blocks, seed=1))
            per_s = devices * blocks / seconds
            rows.append(
                {"scenario": name, "mobility": mobility, "devices": devices, "blocks": blocks, "per_s": per_s}
            )
            label = f"{name} {mobility}"
            print(
                f"trace    {label:23s} U={devices:<5d} N={blocks:<7d} {per_s:.3g} device-steps/s", flush=True
            )
    return rows


def latency_rows() -> list[dict]:
    cfg = load_scenario("paper")
    cost = ExpertCost.from_config(cfg)
    flops = effective_flops_per_s(devices_for(cfg.cell.device_classes, 8))
    bs_s, head_s = bs_seconds(cfg.model, 1, 512, cfg.cell.bs_flops_per_s), lm_head_flops(cfg.model) / 1e14
    rows = []
    for steps in (256, 4096):
        rng = np.random.default_rng(steps)
        shape = (steps, cfg.model.num_layers, 8)  # decode steps × L × U
        tokens = rng.integers(0, 2, shape)
        rate_dl, rate_ul = rng.uniform(1e6, 1e8, (2, *shape))

        def run(tokens=tokens, rate_dl=rate_dl, rate_ul=rate_ul) -> None:
            _ = forward_latency(tokens, rate_dl, rate_ul, flops, cost, bs_s, head_s).total_s

        per_s = tokens.size / best_seconds(run)
        rows.append({"steps": steps, "layers": shape[1], "devices": 8, "per_s": per_s})
        print(
            f"latency  S={steps:<5d} L={shape[1]} U=8 {per_s:.3g} token-layer-device evaluations/s",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/channel_throughput.json"))
    args = ap.parse_args()
    trace, latency = trace_rows(), latency_rows()
    goals = {
        "trace_1e6_per_s": all(r["per_s"] >= 1e6 for r in trace),
        "latency_1e6_per_s": all(r["per_s"] >= 1e6 for r in latency),
    }
    print("goals:", ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"trace": trace, "latency": latency, "goals": goals}, indent=1))


if __name__ == "__main__":
    main()
