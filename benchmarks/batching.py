"""Several users at once: continuous batching against one user at a time, on the default model.

    OMP_NUM_THREADS=1 python benchmarks/batching.py [--users 8] [--new-tokens 32]

Side by side in one run (greedy, chat template, ``--users`` different prompts):

1. In process (``wdmoe.serving.Engine`` over the full model): the users one after another (one
   request in the engine at a time) against all of them submitted at once (one decode forward
   per step for all). Aggregate tokens/s = all users' new tokens ÷ wall time of the whole run.
2. Distributed (a ``Cluster``: the BS and 8 device processes on loopback, the stream data plane,
   no emulated link delay, the ``lab`` cell without outage, a generous grace so that no expert is
   dropped on a busy machine): the users' Generate calls one after another against all at once
   (one client thread each; the BS's ``max_active`` = users).

Goal (issue 12): aggregate tokens/s with 8 users ≥ 4 × one user's, in process and distributed,
every answer identical to the user's answer alone (``wdmoe.generate.generate``, HF generate).
Prints a table; writes benchmarks/results/batching.json with the machine's load average.
"""

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import torch

from wdmoe.generate import encode_prompt, generate
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import load_checkpoint
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.client import BSClient
from wdmoe.runtime.cluster import Cluster
from wdmoe.serving import Engine, Job, eos_ids

PROMPTS = [
    "What does a base station do in a wireless network?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "Why is the sky blue?",
    "What is a mixture of experts?",
    "List the planets of the solar system.",
    "How does a phone find the nearest cell tower?",
    "Explain gravity to a child.",
    "What is the capital of France?",
    "Give two uses of a router.",
    "What is 12 times 12?",
    "Describe a rainy day in one sentence.",
    "What is a neural network?",
    "Why do we sleep?",
    "What is the speed of light?",
    "Name a famous painter.",
]
NO_OUTAGE = ["cell.min_se_bps_per_hz=0"]


def in_process(wm: WirelessModel, tok: Any, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """One user at a time, then all at once, through the engine; texts and tokens/s of each."""
    eos = eos_ids(wm, tok)
    ids = [encode_prompt(tok, p, True, None)[0] for p in prompts]

    def run(together: bool) -> tuple[float, list[list[int]]]:
        engine = Engine(wm, eos, max_batch=len(prompts) if together else 1)
        start = time.perf_counter()
        jobs = [engine.submit(Job(x, new_tokens)) for x in ids]
        while engine.busy():
            engine.step()
        return time.perf_counter() - start, [j.wait(0) for j in jobs]

    alone_s, alone = run(False)
    together_s, together = run(True)
    texts = lambda runs: [str(tok.decode(t, skip_special_tokens=True)) for t in runs]  # noqa: E731
    tokens = sum(len(t) for t in together)
    return {
        "alone_s": alone_s,
        "together_s": together_s,
        "tokens": tokens,
        "alone_tokens_per_s": sum(len(t) for t in alone) / alone_s,
        "together_tokens_per_s": tokens / together_s,
        "texts_alone": texts(alone),
        "texts_together": texts(together),
    }


def distributed(prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """The users' Generate calls one after another, then all at once, against a cluster."""
    settings = RuntimeSettings(grace_s=5.0, max_active=len(prompts))
    with Cluster("default", 8, settings=settings, overrides=NO_OUTAGE) as cluster:
        address = cluster.bs_address
        req = lambda p: api.GenerateRequest(p, max_new_tokens=new_tokens)  # noqa: E731
        with BSClient(address, cluster.token) as client:
            client.generate(req(prompts[0]))  # warm-up: connections, first-call costs
            start = time.perf_counter()
            alone = [client.generate(req(p)) for p in prompts]
            alone_s = time.perf_counter() - start
        results: dict[int, dict[str, Any]] = {}

        def user(i: int) -> None:
            with BSClient(address, cluster.token) as c:
                results[i] = c.generate(req(prompts[i]))

        threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together_s = time.perf_counter() - start
        together = [results[i] for i in range(len(prompts))]
        dropped = sum(m["dropped"] for m in alone + together)
    tokens = sum(m["new_tokens"] for m in together)
    return {
        "alone_s": alone_s,
        "together_s": together_s,
        "tokens": tokens,
        "alone_tokens_per_s": sum(m["new_tokens"] for m in alone) / alone_s,
        "together_tokens_per_s": tokens / together_s,
        "texts_alone": [m["text"] for m in alone],
        "texts_together": [m["text"] for m in together],
        "dropped_experts": dropped,
        "ttft_s_together": [m["ttft_s"] for m in together],
    }


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-distributed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    prompts = PROMPTS[: args.users]
    load_start = os.getloadavg()
    net, tok = load_checkpoint("default")
    wm = install(net)
    with torch.no_grad():
        reference = [generate(wm, tok, p, max_new_tokens=args.new_tokens, record=False).text for p in prompts]
        faces = {"in-process": in_process(wm, tok, prompts, args.new_tokens)}
    del wm, net
    if not args.skip_distributed:
        faces["distributed (8 device processes)"] = distributed(prompts, args.new_tokens)
    print(f"{args.users} users, {args.new_tokens} new tokens each, greedy; aggregate tokens/s")
    print(f"{'face':<34}{'one at a time':>15}{'all at once':>13}{'ratio':>8}{'answers = alone':>17}")
    for name, r in faces.items():
        r["ratio"] = r["together_tokens_per_s"] / r["alone_tokens_per_s"]
        same = sum(a == b for a, b in zip(r["texts_together"], reference, strict=True))
        same_alone = sum(a == b for a, b in zip(r["texts_alone"], reference, strict=True))
        r["identical_together"], r["identical_alone"] = same, same_alone
        print(
            f"{name:<34}{r['alone_tokens_per_s']:>15.1f}{r['together_tokens_per_s']:>13.1f}"
            f"{r['ratio']:>7.2f}×{f'{same}/{len(prompts)} ({same_alone})':>17}"
        )
    print("answers = alone: answers of all at once equal to HF generate alone (in brackets: one at a time)")
    out = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "users": args.users,
        "new_tokens": args.new_tokens,
        "goal": "ratio ≥ 4 with 8 users, every answer identical",
        "faces": faces,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    path = Path(__file__).parent / "results" / "batching.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"load average at start / end: {out['loadavg_start']} / {out['loadavg_end']}; wrote {path}")


if __name__ == "__main__":
    main()
