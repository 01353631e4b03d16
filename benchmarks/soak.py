"""Soak run: mixed traffic for a long time against a BS and device processes, memory sampled.

    OMP_NUM_THREADS=1 python benchmarks/soak.py [--minutes 30] [--clients 6] [--devices 4]

A ``Cluster`` on the tiny random Mixtral of the tests (BS and devices as separate processes, every
expert on 2 devices), with device ``devices − 1`` a chronic straggler (it answers 400 ms late,
past every deadline, so it is benched and probed over and over). ``--clients`` users send requests
of 4–24 tokens back to back, now and then several at once; every ``--kill-every-s`` another device
is killed (SIGKILL) and restarted 20 s later. Every 10 s the resident memory (VmRSS) of the BS and
of each device process is sampled. Reported: requests answered and failed (the goal: every one
answered), the BS's totals, device events from its metrics log, and RSS after warm-up against the
end (the goal: no growth beyond warm-up). Writes benchmarks/results/soak.json.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from tiny import save_tiny_checkpoint
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.client import BSClient, BSError
from wdmoe.runtime.cluster import Cluster

PROMPTS = ["what is the router", "hello world once upon a time", "the base station and the device"]


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def client_loop(cluster: Cluster, stop: threading.Event, seed: int, tally: Counter[str]) -> None:
    """Requests back to back until ``stop``; each outcome counted."""
    rng = random.Random(seed)
    with BSClient(cluster.bs_address, cluster.token) as client:
        while not stop.is_set():
            req = api.GenerateRequest(
                rng.choice(PROMPTS), max_new_tokens=rng.randint(4, 24), seed=rng.randint(0, 99)
            )
            try:
                m = client.generate(req, timeout_s=300, idle_s=120)
            except BSError as err:
                tally["failed"] += 1
                tally[f"error: {str(err)[:120]}"] += 1
                continue
            tally["answered"] += 1
            tally["expert_calls"] += m["expert_calls"]
            tally["dropped"] += m["dropped"]
            time.sleep(rng.choice([0.0, 0.0, 0.5, 2.0]))


def chaos_loop(
    cluster: Cluster, stop: threading.Event, every_s: float, victims: list[int], log: list[str]
) -> None:
    """Every ``every_s``: kill the next victim device, restart it 20 s later."""
    turn = 0
    while not stop.wait(every_s):
        u = victims[turn % len(victims)]
        turn += 1
        cluster.kill_device(u)
        log.append(f"{time.strftime('%H:%M:%S')} killed device {u}")
        if stop.wait(20):
            break
        cluster.restart_device(u)
        log.append(f"{time.strftime('%H:%M:%S')} restarted device {u}")


def sample(cluster: Cluster) -> dict[str, Any]:
    bs_pid = cluster.bs_process.pid if cluster.bs_process else 0
    devices = {d.device: rss_mb(d.process.pid) if d.process else 0.0 for d in cluster.devices}
    return {"t_s": time.monotonic(), "bs_mb": rss_mb(bs_pid), "devices_mb": devices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--kill-every-s", type=float, default=180.0)
    parser.add_argument("--warmup-s", type=float, default=120.0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="wdmoe-soak-"))
    save_tiny_checkpoint("mixtral", folder / "tiny")
    log = folder / "bs.jsonl"
    straggler = args.devices - 1
    settings = RuntimeSettings(heartbeat_s=0.5)
    tally: Counter[str] = Counter()
    chaos: list[str] = []
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    start = time.monotonic()
    with Cluster(
        str(folder / "tiny"),
        devices=args.devices,
        settings=settings,
        replicas=2,
        delays_ms={straggler: 400.0},
        bs_in_process=False,
        metrics_log=log,
    ) as cluster:
        threads = [
            threading.Thread(target=client_loop, args=(cluster, stop, i, tally)) for i in range(args.clients)
        ]
        victims = [u for u in range(args.devices) if u != straggler]
        threads.append(
            threading.Thread(target=chaos_loop, args=(cluster, stop, args.kill_every_s, victims, chaos))
        )
        for t in threads:
            t.start()
        while time.monotonic() - start < 60 * args.minutes:
            samples.append(sample(cluster))
            print(
                f"{(time.monotonic() - start) / 60:5.1f} min · answered {tally['answered']} · failed "
                f"{tally['failed']} · BS {samples[-1]['bs_mb']:.0f} MB · devices "
                f"{[round(v) for v in samples[-1]['devices_mb'].values()]} MB",
                flush=True,
            )
            time.sleep(10)
        stop.set()
        for t in threads:
            t.join()
        totals = cluster.stats()["totals"]
    events = Counter(json.loads(line)["event"] for line in log.read_text().splitlines())
    warm = [s for s in samples if s["t_s"] - start >= args.warmup_s]
    first, last = warm[0], warm[-1]
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "devices": args.devices,
        "straggler": straggler,
        "kill_every_s": args.kill_every_s,
        "tally": dict(tally),
        "bs_totals": totals,
        "events": dict(events),
        "chaos": chaos,
        "bs_rss_mb": {
            "after_warmup": first["bs_mb"],
            "end": last["bs_mb"],
            "max": max(s["bs_mb"] for s in warm),
        },
        "straggler_rss_mb": {
            "after_warmup": first["devices_mb"][straggler],
            "end": last["devices_mb"][straggler],
        },
        "samples": [{"t_s": round(s["t_s"] - start, 1), "bs_mb": round(s["bs_mb"], 1)} for s in samples],
        "loadavg_end": os.getloadavg(),
    }
    out = Path(__file__).parent / "results" / "soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
