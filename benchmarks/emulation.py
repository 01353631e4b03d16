"""Emulated links against the latency model: measured vs predicted latency per token and prefill.

    OMP_NUM_THREADS=1 python benchmarks/emulation.py

A BS on a tiny Mixtral (2 MoE layers, D = 32, 8 experts, top-2) with 8 device servers on loopback
(threads of this process) in the `lab` cell, links emulated (`RuntimeSettings(emulate_links=True)`),
for several bandwidths (narrow = the emulated delays dominate) and time scales. For each: one
request of 8 new tokens; the BS records per forward the latency model's prediction (Σ layers of the
slowest device's DL + compute + UL on the true channel at the forward's start, plus the BS compute
model) and the measured wall time / time_scale. Prints the ratios; writes
benchmarks/results/emulation.json.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import tiny_model, tiny_tokenizer
from wdmoe.config import load_scenario
from wdmoe.models.install import install
from wdmoe.models.split import split_model
from wdmoe.runtime import api
from wdmoe.runtime.bs import BaseStation, RuntimeSettings, fit_scenario
from wdmoe.runtime.client import BSClient
from wdmoe.runtime.cluster import round_robin, shard_key
from wdmoe.runtime.device import serve
from wdmoe.runtime.service import serve_bs

TOKEN = "emulation"
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


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
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
    out = Path(__file__).parent / "results" / "emulation.json"
    out.write_text(json.dumps({"cases": rows, "loadavg": os.getloadavg()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
