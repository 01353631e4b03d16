"""Emulated links against the latency model: measured vs predicted latency per token and prefill.

A BS on a tiny Mixtral (2 MoE layers, D = 32, 8 experts, top-2) with 8 device servers on loopback
(threads of this process) in the `lab` cell, links emulated (`RuntimeSettings(emulate_links=True)`),
for several bandwidths (narrow = the emulated delays dominate) and time scales. For each: one
request of 8 new tokens; the BS records per forward the latency model's prediction (Σ layers of the
slowest device's DL + compute + UL on the true channel at the forward's start, plus the BS compute
model) and the measured wall time / time_scale.

Then the lab cell as ``wdmoe cluster --devices 8 --policy wdmoe --allocator minmax --emulate-links``
runs it (the default model, 8 device processes, time scale 1), its BS pricing the software's own
cost per message or not (``RuntimeSettings.software_overhead`` "none" / "measured",
:mod:`wdmoe.latency.overhead`), requests alternating between the two on the same cluster: measured
per-token latency ÷ predicted, side by side, and the devices' running estimates ô_u. Prints the
ratios; writes benchmarks/results/emulation.json.

    OMP_NUM_THREADS=1 python benchmarks/emulation.py [--rounds 3] [--new-tokens 16] [--skip-tiny]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import tiny_model, tiny_tokenizer
from wdmoe.config import load_scenario
from wdmoe.models.install import install
from wdmoe.models.split import split_model
from wdmoe.runtime import api
from wdmoe.runtime.bs import BaseStation, RuntimeSettings, fit_scenario
from wdmoe.runtime.client import BSClient
from wdmoe.runtime.cluster import Cluster, round_robin, shard_key
from wdmoe.runtime.device import serve
from wdmoe.runtime.service import serve_bs

TOKEN = "emulation"
PROMPT = "What does a base station do in a wireless network, and why do phones need one?"
CASES = [(2e4, 1.0), (1e5, 1.0), (1e6, 1.0), (2e4, 0.1), (2e4, 0.01)]


def run_case(by_key: dict, bandwidth_hz: float, time_scale: float) -> dict:
    wm = install(tiny_model("mixtral"))
    cell = load_scenario(
        "lab", ["cell.num_devices=8", f"cell.bandwidth_hz={bandwidth_hz}", "mobility.speed_mps=0"]
    )
    settings = RuntimeSettings(emulate_links=True, time_scale=time_scale, grace_s=1.0)
    scenario = fit_scenario(cell, wm, "tiny")
    wm.release_experts()
    bs = BaseStation(wm, tiny_tokenizer(), scenario, settings, token=TOKEN)
    server = serve_bs(bs, TOKEN)
    devices = []
    try:
        for u, keys in enumerate(round_robin(sorted(by_key), 8)):
            d = serve([by_key[k] for k in keys], token=TOKEN)
            d.register(server.address, TOKEN, u)
            devices.append(d)
        with BSClient(server.address, TOKEN) as client:
            client.wait_ready(8, 30)
            start = time.monotonic()
            m = client.generate(api.GenerateRequest("what is the router", max_new_tokens=8))
            wall = time.monotonic() - start
    finally:
        for d in devices:
            d.stop()
        server.stop()
    return {
        "bandwidth_hz": bandwidth_hz,
        "time_scale": time_scale,
        "token_predicted_s": m["token_predicted_s"],
        "token_measured_s": m["token_measured_s"],
        "token_ratio": m["token_measured_s"] / m["token_predicted_s"],
        "prefill_predicted_s": m["prefill_predicted_s"],
        "prefill_measured_s": m["prefill_measured_s"],
        "prefill_ratio": m["prefill_measured_s"] / m["prefill_predicted_s"],
        "dropped": m["dropped"],
        "wall_s": wall,
    }


def cluster_case(rounds: int, new_tokens: int) -> dict:
    """The lab cell over 8 device processes (the default model), the software's overhead priced or
    not: requests alternate between the two variants (the dispatcher's settings swapped between
    requests; the same devices, links and estimates)."""
    base = RuntimeSettings(policy="wdmoe", allocator="minmax", emulate_links=True, time_scale=1.0)
    variants = {name: replace(base, software_overhead=name) for name in ("none", "measured")}
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    with Cluster("default", 8, settings=base) as cluster:
        cluster.client.generate(api.GenerateRequest(PROMPT, max_new_tokens=4))  # warm-up, first pings
        layers, run = len(cluster.bs.wm.blocks), clock(cluster.bs.dispatcher)
        for _ in range(rounds):
            for name, settings in variants.items():
                cluster.bs.dispatcher.settings = settings
                run.clear()
                m = cluster.client.generate(api.GenerateRequest(PROMPT, max_new_tokens=new_tokens))
                row = {k: m[k] for k in ("token_measured_s", "token_predicted_s", "dropped")}
                decode = run[layers:]  # the prefill's layers first
                rows[name].append(row | {"token_moe_layers_s": layers * statistics.fmean(decode)})
        estimates_ms = [1e3 * o for o in cluster.bs.registry.overheads_s()]
    out: dict = {
        "settings": {"policy": "wdmoe", "allocator": "minmax", "emulate_links": True, "time_scale": 1.0}
    }
    for name, got in rows.items():
        measured = statistics.median(r["token_measured_s"] for r in got)
        predicted = statistics.median(r["token_predicted_s"] for r in got)
        moe = statistics.median(r["token_moe_layers_s"] for r in got)
        out[name] = {
            "token_measured_ms": 1e3 * measured,
            "token_predicted_ms": 1e3 * predicted,
            "ratio": measured / predicted,
            "token_moe_layers_ms": 1e3 * moe,
            "token_bs_own_ms": 1e3 * (measured - moe),
            "moe_layers_ratio": moe / predicted,
            "dropped": sum(r["dropped"] for r in got),
            "requests": got,
        }
    return out | {"overhead_estimates_ms": estimates_ms, "rounds": rounds, "new_tokens": new_tokens}


def clock(dispatcher: Any) -> list[float]:
    """The wall seconds of every MoE layer ``dispatcher.run`` runs from now on (routing, pricing,
    the calls, the books: what the latency model prices as T_l)."""
    into, inner = [], dispatcher.run

    def run(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args)
        finally:
            into.append(time.perf_counter() - start)

    dispatcher.run = run
    return into


def print_cluster(c: dict) -> None:
    print(
        "\nlab cell, 8 device processes, wdmoe + minmax, links emulated, time scale 1 (goal: ratio 0.9–1.1)"
    )
    head = f"  {'software overhead':<20}{'token pred ms':>14}{'meas ms':>10}{'meas/pred':>11}"
    print(head + f"{'MoE layers ms':>15}{'MoE/pred':>10}{'BS own ms':>11}{'drops':>7}")
    for name in ("none", "measured"):
        r = c[name]
        print(
            f"  {name:<20}{r['token_predicted_ms']:>14.1f}{r['token_measured_ms']:>10.1f}"
            f"{r['ratio']:>11.3f}{r['token_moe_layers_ms']:>15.1f}{r['moe_layers_ratio']:>10.3f}"
            f"{r['token_bs_own_ms']:>11.1f}{r['dropped']:>7}"
        )
    print("  (MoE layers: mean dispatcher.run of decoding × layers; BS own: the rest — attention, router,")
    print("   LM head on this CPU, which the model prices at the cell's bs_flops_per_s)")
    print("  ô per device (ms):", " ".join(f"{o:.2f}" for o in c["overhead_estimates_ms"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="requests per variant on the lab cluster")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip-tiny", action="store_true", help="only the lab cluster")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    if not args.skip_tiny:
        with tempfile.TemporaryDirectory(prefix="wdmoe-emulation-") as folder:
            by_key = {shard_key(p): p for p in split_model(tiny_model("mixtral"), Path(folder))}
            rows = [run_case(by_key, b, s) for b, s in CASES]
    print(
        f"{'band Hz':>9} {'scale':>6} {'token pred ms':>14} {'meas ms':>9} {'ratio':>7} "
        f"{'prefill pred ms':>16} {'meas ms':>9} {'ratio':>7} {'drops':>6} {'wall s':>7}"
    )
    for r in rows:
        print(
            f"{r['bandwidth_hz']:>9.0f} {r['time_scale']:>6} {1e3 * r['token_predicted_s']:>14.1f} "
            f"{1e3 * r['token_measured_s']:>9.1f} {r['token_ratio']:>7.3f} "
            f"{1e3 * r['prefill_predicted_s']:>16.1f} {1e3 * r['prefill_measured_s']:>9.1f} "
            f"{r['prefill_ratio']:>7.3f} {r['dropped']:>6} {r['wall_s']:>7.2f}"
        )
    lab = cluster_case(args.rounds, args.new_tokens)
    print_cluster(lab)
    out = Path(__file__).parent / "results" / "emulation.json"
    result = {"cases": rows, "lab_cluster": lab, "loadavg": os.getloadavg()}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
