"""Load test of the BS: concurrent users against 4 device processes, default model.

    OMP_NUM_THREADS=1 python benchmarks/load.py [--clients 1,4,16,64] [--new-tokens 8] [--devices 4]

A ``Cluster`` (BS and device workers as separate processes on loopback, no emulated delay, the
``lab`` cell). For each level, that many clients send one request each at the same moment (same
prompt, greedy) while a watcher calls ``Stats`` every 0.25 s. Printed per level: answers completed,
expert calls and how many were dropped (the goal: 0 when no device is slow or dead), requests
refused, the BS's queue at its peak, per-request wall time (median and max), and Stats latency
(median and max; the goal: < 100 ms under load). The BS serves ``--max-active`` generations at
once (default 16) and queues the rest. Writes benchmarks/results/load.json.
"""

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.client import BSClient, BSError
from wdmoe.runtime.cluster import Cluster

PROMPT = "What does a base station do in a wireless network?"


def watch_stats(address: str, token: str, stop: threading.Event, out: list[dict[str, float]]) -> None:
    """Call Stats every 0.25 s until ``stop``; record each call's latency and the BS's queue."""
    with BSClient(address, token) as client:
        while not stop.wait(0.25):
            start = time.perf_counter()
            reply = client.stats(timeout_s=30)
            queue = reply["queue"]
            out.append(
                {"s": time.perf_counter() - start, "active": queue["active"], "queued": queue["queued"]}
            )


def level(cluster: Cluster, clients: int, new_tokens: int) -> dict[str, Any]:
    """``clients`` requests at once; what became of them and of Stats meanwhile."""
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    stats: list[dict[str, float]] = []
    stop = threading.Event()
    go = threading.Barrier(clients + 1)

    def user() -> None:
        with BSClient(cluster.bs_address, cluster.token) as client:
            go.wait()
            start = time.perf_counter()
            try:
                m = client.generate(api.GenerateRequest(PROMPT, max_new_tokens=new_tokens), idle_s=600)
            except BSError as err:
                errors.append(str(err))
                return
            results.append(m | {"client_wall_s": time.perf_counter() - start})

    watcher = threading.Thread(target=watch_stats, args=(cluster.bs_address, cluster.token, stop, stats))
    threads = [threading.Thread(target=user) for _ in range(clients)]
    for t in threads:
        t.start()
    watcher.start()
    start = time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    walls = [r["client_wall_s"] for r in results]
    lat = [s["s"] for s in stats]
    return {
        "clients": clients,
        "completed": sum(r["new_tokens"] == new_tokens for r in results),
        "errors": errors[:3],
        "refused": len(errors),
        "expert_calls": sum(r["expert_calls"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
        "wall_s": wall,
        "tokens_per_s": clients * new_tokens / wall,
        "request_p50_s": statistics.median(walls) if walls else 0.0,
        "request_max_s": max(walls, default=0.0),
        "stats_calls": len(lat),
        "stats_p50_ms": 1e3 * statistics.median(lat) if lat else 0.0,
        "stats_max_ms": 1e3 * max(lat, default=0.0),
        "peak_active": max((s["active"] for s in stats), default=0),
        "peak_queued": max((s["queued"] for s in stats), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    load_start = os.getloadavg()
    rows = []
    settings = RuntimeSettings()  # the defaults a user gets: grace 250 ms, 16 active, 256 queued
    with Cluster(args.model, devices=args.devices, settings=settings, bs_in_process=False) as cluster:
        for n in (int(x) for x in args.clients.split(",")):
            row = level(cluster, n, args.new_tokens)
            rows.append(row)
            print(
                f"{n:3d} clients: {row['completed']}/{n} answered, {row['refused']} refused · "
                f"{row['dropped']} of {row['expert_calls']} expert calls dropped · "
                f"{row['tokens_per_s']:.1f} tok/s · request p50 {row['request_p50_s']:.1f} s, "
                f"max {row['request_max_s']:.1f} s · Stats p50 {row['stats_p50_ms']:.1f} ms, "
                f"max {row['stats_max_ms']:.1f} ms ({row['stats_calls']} calls) · peak "
                f"{row['peak_active']} active, {row['peak_queued']} queued",
                flush=True,
            )
        totals = cluster.stats()["totals"]
    out = Path(__file__).parent / "results" / "load.json"
    meta = {"new_tokens": args.new_tokens, "devices": args.devices, "model": args.model}
    record = {"rows": rows, "bs_totals": totals, "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    out.write_text(json.dumps(meta | record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
