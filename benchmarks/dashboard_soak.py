"""Dashboard soak: a cell at time scale 0.01 watched by a browser for a long time, memory sampled.

    OMP_NUM_THREADS=1 python benchmarks/dashboard_soak.py [--minutes 60] [--clients 2] [--devices 3]

A ``Cluster`` on the tiny random Mixtral of the tests (BS and devices as separate processes) with
emulated links on a narrow band at time scale 0.01 (a simulated second passes in 10 ms of wall
time), its dashboard served by the BS (``--dashboard``) and open in headless Chromium (Playwright,
Debian's ``chromium``); ``--clients`` users send requests back to back. Every ``--every-s`` the
BS's resident memory (VmRSS, MB) and the page's JS heap after a forced garbage collection (Chrome
DevTools Protocol ``Runtime.getHeapUsage``, MB) are sampled, with the forwards the BS has run
(``wdmoe_forwards_total`` from its /metrics). Reported: both at the end of the warm-up and at the
end, and their growth (the goal: none beyond noise). Writes benchmarks/results/dashboard_soak.json.
"""

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from browser import chromium_path, js_heap_bytes, launch
from tiny import save_tiny_checkpoint
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.client import BSClient, BSError
from wdmoe.runtime.cluster import Cluster

sys.path.insert(0, str(Path(__file__).parent))
from soak import PROMPTS, rss_mb  # the same prompts and memory probe as the plain soak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def forwards(url: str) -> float:
    """The BS's forwards so far (from its /metrics)."""
    with urllib.request.urlopen(url + "metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("wdmoe_forwards_total "):
                return float(line.split()[1])
    return 0.0


def users(cluster: Cluster, stop: threading.Event, seed: int, tally: dict[str, int]) -> None:
    """Requests back to back until ``stop``."""
    rng = random.Random(seed)
    with BSClient(cluster.bs_address, cluster.token) as client:
        while not stop.is_set():
            req = api.GenerateRequest(rng.choice(PROMPTS), max_new_tokens=rng.randint(4, 24))
            try:
                client.generate(req, timeout_s=300, idle_s=120)
                tally["answered"] += 1
            except BSError:
                tally["failed"] += 1


def run(args: argparse.Namespace, cluster: Cluster, url: str, page: Any) -> list[dict[str, Any]]:
    """Users for ``args.minutes`` while the page watches; the memory samples."""
    tally = {"answered": 0, "failed": 0}
    stop = threading.Event()
    threads = [threading.Thread(target=users, args=(cluster, stop, i, tally)) for i in range(args.clients)]
    for t in threads:
        t.start()
    start, samples = time.monotonic(), []
    assert cluster.bs_process is not None
    while time.monotonic() - start < 60 * args.minutes:
        time.sleep(args.every_s)
        s = {
            "t_s": round(time.monotonic() - start, 1),
            "bs_rss_mb": round(rss_mb(cluster.bs_process.pid), 1),
            "js_heap_mb": round(js_heap_bytes(page) / 2**20, 2),
            "forwards": forwards(url),
        } | tally
        samples.append(s)
        print(json.dumps(s), flush=True)
    stop.set()
    for t in threads:
        t.join()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--every-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    args = parser.parse_args()
    chromium = chromium_path()
    if chromium is None:
        sys.exit("Chromium is absent: apt-get install -y chromium (or set WDMOE_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    folder = Path(tempfile.mkdtemp(prefix="wdmoe-dashboard-soak-"))
    save_tiny_checkpoint("mixtral", folder / "tiny")
    address = f"127.0.0.1:{free_port()}"
    settings = RuntimeSettings(emulate_links=True, time_scale=0.01, grace_s=0.3)
    with (
        Cluster(
            str(folder / "tiny"),
            devices=args.devices,
            settings=settings,
            bs_in_process=False,
            overrides=["cell.bandwidth_hz=2e5"],
            dashboard=address,
        ) as cluster,
        sync_playwright() as p,
    ):
        browser = launch(p, chromium)
        page = browser.new_page()
        url = f"http://{address}/"
        page.goto(url)
        samples = run(args, cluster, url, page)
        browser.close()
    report(args, samples)


def report(args: argparse.Namespace, samples: list[dict[str, Any]]) -> None:
    warm = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
    first, last = warm[0], warm[-1]
    growth = {k: round(last[k] - first[k], 2) for k in ("bs_rss_mb", "js_heap_mb")}
    result = {
        "minutes": args.minutes,
        "time_scale": 0.01,
        "clients": args.clients,
        "devices": args.devices,
        "after_warmup": first,
        "end": last,
        "growth": growth,
        "forwards_per_s": round(
            (last["forwards"] - first["forwards"]) / max(last["t_s"] - first["t_s"], 1e-9), 1
        ),
        "samples": samples,
    }
    out = Path(__file__).parent / "results" / "dashboard_soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
