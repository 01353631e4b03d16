"""Decode speed of the default model against the number of devices (one message per device and layer).

    OMP_NUM_THREADS=1 python benchmarks/runtime_devices.py [--devices 2,4,8] [--new-tokens 24]

In one run: the in-process model, then a ``Cluster`` (BS in this process, N device worker
processes on loopback, no emulated delay) for each N; greedy decoding of the same prompt, median
of 2 rounds after a warm-up. With fewer devices each device hosts more experts of a layer and
gets them in one bundled message, so the BS makes fewer calls per layer. Prints tokens/s and the
ratio to in-process (the issue's goal: ≥ 0.5); writes benchmarks/results/runtime_devices.json.
"""

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from wdmoe.generate import generate
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import load_checkpoint
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.cluster import Cluster

PROMPT = "What does a base station do in a wireless network?"


def rate(wm: WirelessModel, tok: Any, new_tokens: int, rounds: int = 2) -> tuple[float, str]:
    generate(wm, tok, PROMPT, max_new_tokens=3, record=False)
    rates, text = [], ""
    for _ in range(rounds):
        result = generate(wm, tok, PROMPT, max_new_tokens=new_tokens, record=False)
        rates.append(result.decode_tokens_per_s)
        text = result.text
    return statistics.median(rates), text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="2,4,8")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    net, tok = load_checkpoint("default")
    base, text = rate(install(net), tok, args.new_tokens)
    rows: list[dict[str, Any]] = [{"devices": 0, "tokens_per_s": base, "ratio": 1.0, "same_text": True}]
    print(f"in-process          {base:6.2f} tok/s")
    for n in (int(x) for x in args.devices.split(",")):
        with Cluster("default", devices=n, settings=RuntimeSettings(grace_s=5.0)) as cluster:
            r, got = rate(cluster.wm, tok, args.new_tokens)
            failed = cluster.stats()["totals"]["failed_calls"]
        rows.append(
            {"devices": n, "tokens_per_s": r, "ratio": r / base, "same_text": got == text, "failed": failed}
        )
        print(
            f"{n} device processes {r:6.2f} tok/s  ×{r / base:.2f}  same text: {got == text}  "
            f"failed calls {failed}"
        )
    out = Path(__file__).parent / "results" / "runtime_devices.json"
    out.write_text(
        json.dumps({"rows": rows, "loadavg_start": load_start, "loadavg_end": os.getloadavg()}, indent=2)
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
