"""What distribution costs on the default model: per-layer fan-out/fan-in, decode speed, worker memory.

    OMP_NUM_THREADS=1 python benchmarks/runtime.py [--tokens 24] [--rounds 3] [--new-tokens 32]

Side by side in one run, on loopback with no emulated link delay (RuntimeSettings: drop mode, a
generous grace so that no expert is dropped on a busy machine):

1. Per-layer overhead: ``bs.dispatcher.run(layer, inputs)`` for decode-like inputs (one token for each of the
   top-7 experts, 7 of the 8 devices busy) through a BaseStation with released experts and 8 device
   servers that are threads of this process, and through a ``Cluster`` with 8 device subprocesses,
   against the in-process ``LocalDispatcher`` on the same inputs. The three are timed in turn on
   every (token, layer), each inside a forward's channel snapshot (``begin_forward`` runs once per
   token, as the model's wrapped forward does; its cost is reported on its own). Overhead =
   distributed − local for the same (token, layer): median and p90. Goal: < 1 ms per layer.
2. Decode tokens/s with ``wdmoe.generate.generate`` (greedy, same prompt): in-process model vs the
   cluster's BS-side model (8 subprocess workers) and the threaded cell, rounds alternating.
   Goal: distributed ≥ 0.5 × in-process.
3. Worker memory: RSS and USS (psutil) of each subprocess worker against the bytes of its shard
   files, and of a worker hosting one shard (the fixed Python + torch + gRPC cost).

Prints a table and writes benchmarks/results/runtime.json with the machine's load average (2 busy
cores make every number here noisy: compare runs made at similar load).
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from wdmoe.config import load_scenario
from wdmoe.generate import generate
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import load_checkpoint
from wdmoe.models.split import split_model
from wdmoe.runtime.bs import BaseStation, RuntimeSettings, fit_scenario
from wdmoe.runtime.client import BSClient
from wdmoe.runtime.cluster import Cluster, round_robin, shard_key
from wdmoe.runtime.device import RUN_EXPERT, DeviceServer, serve
from wdmoe.runtime.security import open_channel
from wdmoe.runtime.server import GRPC_OPTIONS
from wdmoe.runtime.service import BSServer, serve_bs
from wdmoe.runtime.wire import ExpertRequest, encode

DEVICES = 8
TOKEN = "benchmark-token"
SETTINGS = RuntimeSettings(grace_s=5.0)  # loopback needs no slack; a busy machine may need seconds
PROMPT = "What does a base station do in a wireless network, and why do phones need one?"
ANCHORS = {
    "llama.cpp RPC backend": "lost about a third of its tokens/s when split over 1 GbE",
    "Petals": "budgets ~18 ms of serialization per hop",
}
Inputs = dict[int, torch.Tensor]  # expert → hidden [1, D]
Dispatch = Callable[[int, Inputs], Mapping[int, torch.Tensor]]


def threaded_cell(
    net: torch.nn.Module, tok: Any, folder: Path
) -> tuple[BaseStation, BSServer, list[DeviceServer]]:
    """A BS with released experts and 8 device servers, all in this process, registered over loopback."""
    wm = install(net)
    scenario = fit_scenario(load_scenario("lab", [f"cell.num_devices={DEVICES}"]), wm, "default")
    by_key = {shard_key(p): p for p in split_model(net, folder)}
    wm.release_experts()
    bs = BaseStation(wm, tok, scenario, SETTINGS, token=TOKEN)
    server = serve_bs(bs, TOKEN)
    devices = []
    for u, keys in enumerate(round_robin(sorted(by_key), DEVICES)):
        device = serve([by_key[k] for k in keys], token=TOKEN)
        device.register(server.address, TOKEN, u)
        devices.append(device)
    with BSClient(server.address, TOKEN) as client:
        client.wait_ready(DEVICES, timeout_s=60)
    return bs, server, devices


def decode_inputs(wm: WirelessModel, tokens: int, gen: torch.Generator) -> list[list[Inputs]]:
    """[token][layer] → {expert: hidden [1, D]} for top_k random experts of each layer."""
    hidden = int(wm.model.config.hidden_size)
    layers = sorted(wm.blocks)

    def one_layer() -> Inputs:
        chosen = torch.randperm(wm.num_experts, generator=gen)[: wm.top_k].tolist()
        return {e: torch.randn(1, hidden, generator=gen) for e in sorted(chosen)}

    return [[one_layer() for _ in layers] for _ in range(tokens)]


def time_token(
    run: Dispatch, per_layer: list[Inputs], bs: BaseStation | None, cpu: list[float] | None = None
) -> tuple[list[float], float]:
    """Seconds per layer for one token's layers, and the forward's snapshot cost (0 without a BS);
    ``cpu`` collects this process's CPU seconds per layer (all its threads)."""
    snapshot_s = 0.0
    if bs is not None:  # what the wrapped forward does once per forward
        start = time.perf_counter()
        bs.dispatcher.current = bs.begin_forward(None)
        snapshot_s = time.perf_counter() - start
    times = []
    try:
        for layer, inputs in enumerate(per_layer):
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = run(layer, inputs)
            times.append(time.perf_counter() - start)
            if cpu is not None:
                cpu.append(time.process_time() - cpu_start)
            assert sorted(outputs) == sorted(inputs), (layer, sorted(outputs), sorted(inputs))
    finally:
        if bs is not None:
            bs.dispatcher.current = None
    return times, snapshot_s


def max_difference(run: Dispatch, local: Dispatch, per_layer: list[Inputs]) -> float:
    """Largest |distributed − local| over one token's layers (the outputs must agree)."""
    worst = 0.0
    for layer, inputs in enumerate(per_layer):
        got, want = run(layer, inputs), local(layer, inputs)
        worst = max(worst, max(float((got[e] - want[e]).abs().max()) for e in inputs))
    return worst


def rpc_floor_ms(bs: BaseStation, hidden: int, calls: int = 50) -> float:
    """Median ms of one blocking RunExpert call (1 token) to the device hosting expert 0 of layer 0:
    the transport's own round trip, without the BS's planning and fan-out."""
    entry = bs.registry.choose((0, 0), np.ones(bs.num_slots))
    assert entry is not None, "no device hosts layer 0 expert 0"
    channel = open_channel(entry.address, None, GRPC_OPTIONS)
    stub, x = channel.unary_unary(RUN_EXPERT), torch.randn(1, hidden)
    times = []
    for i in range(calls + 1):
        frame = encode(ExpertRequest(0, 0, x, i, 5.0))
        start = time.perf_counter()
        stub(frame, timeout=5.0, metadata=bs.links.metadata)
        times.append(time.perf_counter() - start)
    channel.close()
    return 1e3 * statistics.median(times[1:])


def record_fan_out(bs: BaseStation, into: list[float]) -> None:
    """Record the seconds of every ``bs.links.fan_out`` (send all calls, gather the answers) in
    ``into``: the rest of a layer's time is the BS's planning and book-keeping."""
    inner = bs.links.fan_out

    def fan_out(*args: Any) -> None:
        start = time.perf_counter()
        inner(*args)
        into.append(time.perf_counter() - start)

    bs.links.fan_out = fan_out  # type: ignore[method-assign]


def layer_overhead(
    variants: dict[str, tuple[Dispatch, BaseStation | None]], inputs: list[list[Inputs]]
) -> dict[str, Any]:
    """Every variant on every token in turn (warm-up first); per-layer ms and overhead vs 'local';
    for a BS also the fan-out (send + gather) and the rest (planning, book-keeping) of each layer."""
    fan_out: dict[str, list[float]] = {name: [] for name, (_, bs) in variants.items() if bs is not None}
    for name, (run, bs) in variants.items():
        time_token(run, inputs[0], bs)
        if bs is not None:
            record_fan_out(bs, fan_out[name])
    ms: dict[str, list[float]] = {name: [] for name in variants}
    snapshot_ms: dict[str, list[float]] = {name: [] for name in variants}
    cpu_s: dict[str, list[float]] = {name: [] for name in variants}
    for per_layer in inputs:
        for name, (run, bs) in variants.items():
            times, snap = time_token(run, per_layer, bs, cpu_s[name])
            ms[name] += [1e3 * t for t in times]
            snapshot_ms[name].append(1e3 * snap)
    local = np.array(ms["local"])
    out: dict[str, Any] = {}
    for name, values in ms.items():
        arr = np.array(values)
        over = arr - local
        out[name] = {
            "layer_ms_median": float(np.median(arr)),
            "layer_ms_p90": float(np.percentile(arr, 90)),
            "overhead_ms_median": float(np.median(over)),
            "overhead_ms_p90": float(np.percentile(over, 90)),
            "forward_snapshot_ms_median": float(np.median(snapshot_ms[name])),
            # this process's CPU per layer: the BS's own cost where devices are other processes
            "process_cpu_ms_median": float(np.median(1e3 * np.array(cpu_s[name]))),
            "samples": len(values),
        }
        if name in fan_out:
            sent = 1e3 * np.array(fan_out[name])
            assert len(sent) == len(arr), "one fan-out per layer expected"
            out[name] |= {
                "fan_out_ms_median": float(np.median(sent)),
                "bs_rest_ms_median": float(np.median(arr - sent)),
            }
    return out


def decode_speed(models: dict[str, WirelessModel], tok: Any, new_tokens: int, rounds: int) -> dict[str, Any]:
    """Greedy generation of the same prompt on every model, rounds alternating (after a warm-up)."""
    for wm in models.values():
        generate(wm, tok, PROMPT, max_new_tokens=4, record=False)
    rates: dict[str, list[float]] = {name: [] for name in models}
    texts: dict[str, str] = {}
    for _ in range(rounds):
        for name, wm in models.items():
            result = generate(wm, tok, PROMPT, max_new_tokens=new_tokens, record=False)
            rates[name].append(result.decode_tokens_per_s)
            texts[name] = result.text
    base = statistics.median(rates["in-process"])
    return {
        name: {
            "decode_tokens_per_s_median": statistics.median(values),
            "all": values,
            "ratio_to_in_process": statistics.median(values) / base,
            "same_text_as_in_process": texts[name] == texts["in-process"],
        }
        for name, values in rates.items()
    }


def memory_mb(pid: int) -> dict[str, float]:
    """RSS (resident, shared libraries included) and USS (this process's own pages), MB."""
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mb": info.rss / 1e6, "uss_mb": info.uss / 1e6}


def worker_memory(cluster: Cluster) -> list[dict[str, Any]]:
    rows = []
    for d in cluster.devices:
        assert d.process is not None
        shard_mb = sum(p.stat().st_size for p in d.shards) / 1e6
        rows.append(
            {"device": d.device, "shards": len(d.shards), "shard_mb": shard_mb} | memory_mb(d.process.pid)
        )
    return rows


def one_shard_worker(shard: Path) -> dict[str, Any]:
    """Memory of a worker hosting one shard, once it listens: the fixed cost of a worker."""
    cmd = [sys.executable, "-m", "wdmoe.runtime.device", "--port", "0", "--shards", str(shard)]
    env = os.environ | {"WDMOE_TOKEN": TOKEN}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "device listening on …" (blocks until the worker is up)
        assert "listening" in line, f"the one-shard worker did not start (exit {proc.poll()})"
        time.sleep(0.5)
        return {"shards": 1, "shard_mb": shard.stat().st_size / 1e6} | memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def print_table(result: dict[str, Any]) -> None:
    print(f"\nper-layer fan-out/fan-in, {DEVICES} devices, top-7, 1 token per expert (goal: overhead < 1 ms)")
    head = ("layer med", "p90", "overhead med", "p90", "fan-out", "BS rest", "1 RPC", "snapshot", "proc CPU")
    print(f"  {'variant (ms)':<20}" + "".join(f"{h:>13}" for h in head))
    keys: tuple[str, ...] = (
        "layer_ms_median",
        "layer_ms_p90",
        "overhead_ms_median",
        "overhead_ms_p90",
        "fan_out_ms_median",
    )
    keys += ("bs_rest_ms_median", "rpc_floor_ms", "forward_snapshot_ms_median", "process_cpu_ms_median")
    for name, r in result["layer"].items():
        print(f"  {name:<20}" + "".join(f"{r[k]:>13.3f}" if k in r else f"{'-':>13}" for k in keys))
    print("  (fan-out: send all calls + gather; BS rest: planning and book-keeping; 1 RPC: one blocking")
    print("   RunExpert round trip; snapshot: begin_forward, once per forward, not per layer;")
    print("   proc CPU: this process's CPU per layer — the BS's own cost where devices are processes)")
    print(
        f"\ndecode tokens/s, {result['new_tokens']} new tokens greedy, {result['rounds']} rounds (goal ≥ 0.5)"
    )
    for name, r in result["decode"].items():
        print(
            f"  {name:<22}{r['decode_tokens_per_s_median']:>8.2f} tok/s  ×{r['ratio_to_in_process']:.2f}"
            f"  same text: {r['same_text_as_in_process']}"
        )
    print("\nworker memory (MB): shard files vs RSS / USS")
    rows = [*result["memory"]["workers_after"], result["memory"]["one_shard_worker"] | {"device": "1-shard"}]
    for r in rows:
        print(f"  device {r['device']!s:<8}{r['shard_mb']:>8.1f}{r['rss_mb']:>10.1f}{r['uss_mb']:>10.1f}")
    print(f"\nload average at start / end: {result['loadavg_start']} / {result['loadavg_end']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=24, help="decode-like tokens (× 30 layers) per variant")
    parser.add_argument("--rounds", type=int, default=3, help="generation rounds per model")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load_start = time.monotonic(), os.getloadavg()

    net, tok = load_checkpoint("default")
    reference = install(copy.deepcopy(net))  # keeps its experts: the LocalDispatcher's
    local = reference.local_dispatcher()
    with tempfile.TemporaryDirectory(prefix="wdmoe-bench-") as folder, torch.no_grad():
        bs, server, devices = threaded_cell(net, tok, Path(folder))
        with Cluster("default", DEVICES, settings=SETTINGS) as cluster:
            memory_ready = worker_memory(cluster)
            one_shard = one_shard_worker(cluster.devices[0].shards[0])
            inputs = decode_inputs(reference, args.tokens, torch.Generator().manual_seed(0))
            variants: dict[str, tuple[Dispatch, BaseStation | None]] = {
                "local": (local.run, None),
                "8 device threads": (bs.dispatcher.run, bs),
                "8 device processes": (cluster.bs.dispatcher.run, cluster.bs),
            }
            layer = layer_overhead(variants, inputs)
            for name, (run, station) in list(variants.items())[1:]:
                assert station is not None
                layer[name]["max_abs_diff_vs_local"] = max_difference(run, local.run, inputs[0])
                layer[name]["rpc_floor_ms"] = rpc_floor_ms(station, int(net.config.hidden_size))
            models = {"in-process": reference, "8 device processes": cluster.wm, "8 device threads": bs.wm}
            decode = decode_speed(models, tok, args.new_tokens, args.rounds)
            memory_after = worker_memory(cluster)
            cluster_totals = cluster.stats()["totals"]
        for device in devices:
            device.stop()
        threads_totals = bs.summary()["totals"]
        server.stop()
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "devices": DEVICES,
        "settings": {
            "mode": SETTINGS.mode,
            "grace_s": SETTINGS.grace_s,
            "emulate_links": SETTINGS.emulate_links,
        },
        "tokens": args.tokens,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "prompt": PROMPT,
        "layer": layer,
        "decode": decode,
        "memory": {
            "workers_ready": memory_ready,
            "workers_after": memory_after,
            "one_shard_worker": one_shard,
        },
        "bs_totals": {"8 device processes": cluster_totals, "8 device threads": threads_totals},
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": time.monotonic() - started,
        "published_anchors": ANCHORS,
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
