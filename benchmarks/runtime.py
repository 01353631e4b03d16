"""What distribution costs on the default model: per-layer fan-out/fan-in, decode speed, worker memory.

    OMP_NUM_THREADS=1 python benchmarks/runtime.py [--tokens 24] [--rounds 3] [--new-tokens 32]

Side by side in one run, on loopback with no emulated link delay (drop mode, a generous grace, no
link outage in the cell: every expert is called, so answers compare exactly). The cluster's BS
calls its 8 device processes on the stream data plane (one persistent connection per device) or
on gRPC (a RunExpert call each): the same BS and devices, the plane switched between variants
(``Links.data_plane``).

1. Per-layer: ``bs.dispatcher.run(layer, inputs)`` on decode-like inputs (one token for each of the
   top-7 experts: 7 of 8 devices busy) through the cluster on each plane and through a BS whose 8
   device servers are threads of this process (stream), against the in-process
   ``LocalDispatcher``; variants in turn on every (token, layer), each inside a forward's channel
   snapshot (``begin_forward``, once per token, timed apart), each layer after its policy's view
   (``view_at``, as a model's forward takes it; timed apart). Overhead = distributed − local on the
   same (token, layer); fan-out = ``Links.fan_out`` (send all, gather all); median and p95; the CPU
   per layer of this process (the BS) and of the device processes. Goal: overhead ≤ 1 ms.
2. Decode tokens/s (``wdmoe.generate.generate``, greedy, one prompt): in-process vs each variant's
   BS-side model, rounds alternating. Goal: distributed ≥ 0.6 × in-process with 8 devices.
3. Worker memory: RSS and USS (psutil) of each subprocess worker against its shard files, and of a
   worker hosting one shard (the fixed Python + torch + gRPC cost).

Prints a table, writes benchmarks/results/runtime.json with the load average (2 busy cores: noisy).
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
from wdmoe.runtime.dataplane import StreamClient
from wdmoe.runtime.device import RUN_EXPERT, DeviceServer, serve
from wdmoe.runtime.security import open_channel
from wdmoe.runtime.server import GRPC_OPTIONS, freeze_heap
from wdmoe.runtime.service import BSServer, serve_bs
from wdmoe.runtime.wire import ExpertRequest, encode

DEVICES = 8
TOKEN = "benchmark-token"
SETTINGS = RuntimeSettings(grace_s=5.0)  # loopback needs no slack; a busy machine may need seconds
NO_OUTAGE = ["cell.min_se_bps_per_hz=0"]  # the software's cost only: no expert skipped for the channel
PROMPT = "What does a base station do in a wireless network, and why do phones need one?"
ANCHORS = {
    "llama.cpp RPC backend": "lost about a third of its tokens/s when split over 1 GbE",
    "Petals": "budgets ~18 ms of serialization per hop",
}
LEGEND = """  (fan-out: send all + gather; BS rest: planning, books; 1 call: one alone, from this thread;
   snapshot: begin_forward, per forward; view_at: the policy's view, per layer (not in its time); BS CPU:
   this process's per layer, median (device threads' too); dev. CPU: the 8 device processes', per layer)"""
Inputs = dict[int, torch.Tensor]  # expert → hidden [1, D]
Dispatch = Callable[[int, Inputs], Mapping[int, torch.Tensor]]
Variant = tuple[Dispatch, BaseStation | None, str]  # run, its BS (None: local), its data plane


def threaded_cell(
    net: torch.nn.Module, tok: Any, folder: Path
) -> tuple[BaseStation, BSServer, list[DeviceServer]]:
    """A BS with released experts and 8 device servers, all in this process, registered over loopback."""
    wm = install(net)
    scenario = fit_scenario(load_scenario("lab", [f"cell.num_devices={DEVICES}", *NO_OUTAGE]), wm, "default")
    by_key = {shard_key(p): p for p in split_model(net, folder)}
    wm.release_experts()
    bs = BaseStation(wm, tok, scenario, SETTINGS, token=TOKEN)
    server = serve_bs(bs, TOKEN)
    devices = [serve([by_key[k] for k in keys], token=TOKEN) for keys in round_robin(sorted(by_key), DEVICES)]
    for u, device in enumerate(devices):
        device.register(server.address, TOKEN, u)
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
    run: Dispatch, per_layer: list[Inputs], bs: BaseStation | None, into: dict[str, list[float]] | None = None
) -> tuple[list[float], float]:
    """Seconds per layer for one token's layers, and the forward's snapshot cost (0 without a BS);
    ``into`` collects per layer this process's CPU seconds ("cpu") and ``view_at``'s ("view")."""
    snapshot_s = view_s = 0.0
    if bs is not None:  # what the wrapped forward does once per forward
        start = time.perf_counter()
        bs.dispatcher.current = bs.begin_forward([])
        snapshot_s = time.perf_counter() - start
    times = []
    try:
        for layer, inputs in enumerate(per_layer):
            if bs is not None:
                start = time.perf_counter()
                bs.view_at(layer)
                view_s = time.perf_counter() - start
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = run(layer, inputs)
            times.append(time.perf_counter() - start)
            if into is not None:
                into["cpu"].append(time.process_time() - cpu_start)
                into["view"].append(view_s)
            assert sorted(outputs) == sorted(inputs), (layer, sorted(outputs), sorted(inputs))
    finally:
        if bs is not None:
            bs.dispatcher.current = None
    return times, snapshot_s


def max_difference(run: Dispatch, bs: BaseStation, local: Dispatch, per_layer: list[Inputs]) -> float:
    """Largest |distributed − local| over one token's layers, in one forward (the outputs must agree)."""
    worst = [0.0]

    def both(layer: int, inputs: Inputs) -> Mapping[int, torch.Tensor]:
        got, want = run(layer, inputs), local(layer, inputs)
        worst.append(max(float((got[e] - want[e]).abs().max()) for e in inputs))
        return got

    time_token(both, per_layer, bs)
    return max(worst)


def call_floor_ms(bs: BaseStation, hidden: int, plane: str, calls: int = 50) -> float:
    """Median ms of one call alone (1 token, to layer 0 expert 0's device) on ``plane``: gRPC a
    blocking RunExpert; stream a call on the link loop, with the hop from this thread to it."""
    entry = bs.registry.choose((0, 0), np.ones(bs.num_slots))
    assert entry is not None, "no device hosts layer 0 expert 0"
    frames = [encode(ExpertRequest(0, 0, torch.randn(1, hidden), i, 5.0)) for i in range(calls + 1)]
    channel = open_channel(entry.address, None, GRPC_OPTIONS)
    stub, client = channel.unary_unary(RUN_EXPERT), StreamClient(entry.data_address, bs.links.token)
    times = []
    for frame in frames:
        start = time.perf_counter()
        if plane == "grpc":
            stub(frame, timeout=5.0, metadata=bs.links.metadata)
        else:
            bs.links.submit(client.call(frame, 5.0)).result()
        times.append(time.perf_counter() - start)
    channel.close()
    bs.links.submit(client.close()).result()
    return 1e3 * statistics.median(times[1:])


def clock_fan_out(bs: BaseStation) -> list[float]:
    """The seconds of every ``bs.links.fan_out`` from now on (send all calls, gather the answers)."""
    into, inner = [], bs.links.fan_out

    def fan_out(*args: Any) -> None:
        start = time.perf_counter()
        inner(*args)
        into.append(time.perf_counter() - start)

    bs.links.fan_out = fan_out  # type: ignore[method-assign]
    return into


def use(variant: Variant) -> None:
    """Put the variant's BS (if any) on the variant's data plane."""
    if (bs := variant[1]) is not None:
        bs.links.data_plane = variant[2]


def summarise(ms: list[float], local: np.ndarray, fan_out: list[float], cpu_s: list[float]) -> dict[str, Any]:
    """Per-layer ms of one variant: layer, overhead, fan-out (median, p95), BS CPU, the rest (median)."""
    arr = np.array(ms)
    series = {"layer_ms": arr, "overhead_ms": arr - local}
    if fan_out:
        assert len(fan_out) == len(arr), "one fan-out per layer expected"
        series["fan_out_ms"] = 1e3 * np.array(fan_out)
    out: dict[str, Any] = {
        f"{key}_{name}": float(np.percentile(values, q))
        for key, values in series.items()
        for name, q in (("median", 50), ("p95", 95))
    }
    out |= {"process_cpu_ms_median": float(np.median(1e3 * np.array(cpu_s))), "samples": len(ms)}
    if fan_out:
        out["bs_rest_ms_median"] = float(np.median(arr - series["fan_out_ms"]))
    return out


def cpu_s(procs: list[psutil.Process]) -> float:
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))


def layer_overhead(
    variants: dict[str, Variant], inputs: list[list[Inputs]], devices: dict[str, list[psutil.Process]]
) -> dict[str, Any]:
    """Every variant on every token in turn (warm-up first): per-layer ms, overhead vs 'local', for a
    BS its fan-out and the rest (planning, books), the CPU its ``devices`` (processes) spent."""
    clocks = {id(bs): clock_fan_out(bs) for _, bs, _ in variants.values() if bs is not None}
    ms, fan_out, snapshot_ms = ({name: [] for name in variants} for _ in range(3))
    taken: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "view": []} for name in variants}
    device_s = dict.fromkeys(variants, 0.0)
    for n, per_layer in enumerate([inputs[0], *inputs]):  # the first token is the warm-up
        for name, variant in variants.items():
            use(variant)
            run, bs, _ = variant
            before = cpu_s(devices.get(name, []))
            times, snap = time_token(run, per_layer, bs, taken[name] if n else None)
            sent = clocks[id(bs)] if bs is not None else []
            fan_out[name] += sent if n else []
            sent.clear()
            if n:
                ms[name] += [1e3 * t for t in times]
                snapshot_ms[name].append(1e3 * snap)
                device_s[name] += cpu_s(devices.get(name, [])) - before
    local = np.array(ms["local"])
    return {
        name: summarise(ms[name], local, fan_out[name], taken[name]["cpu"])
        | {"forward_snapshot_ms_median": float(np.median(snapshot_ms[name]))}
        | {"view_at_ms_median": float(np.median(1e3 * np.array(taken[name]["view"])))}
        | ({"devices_cpu_ms_mean": 1e3 * device_s[name] / len(ms[name])} if name in devices else {})
        for name in variants
    }


def decode_speed(
    models: dict[str, tuple[WirelessModel, Variant]], tok: Any, new_tokens: int, rounds: int
) -> dict[str, Any]:
    """Greedy decoding of one prompt on every model (on its variant's plane), rounds alternating."""
    rates: dict[str, list[float]] = {name: [] for name in models}
    texts: dict[str, str] = {}
    for r in range(rounds + 1):
        for name, (wm, variant) in models.items():
            use(variant)
            result = generate(wm, tok, PROMPT, max_new_tokens=new_tokens if r else 4, record=False)
            if r:
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
        rows.append({"device": d.device, "shards": len(d.shards), "shard_mb": shard_mb})
        rows[-1] |= memory_mb(d.process.pid)
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
    print(f"\nper-layer fan-out/fan-in, {DEVICES} devices, top-7, 1 token per expert (goal: overhead ≤ 1 ms)")
    head = ("layer med", "p95", "overhead med", "p95", "fan-out med", "p95", "BS rest", "1 call")
    head += ("snapshot", "view_at", "BS CPU", "dev. CPU")
    print(f"  {'variant (ms)':<24}" + "".join(f"{h:>13}" for h in head))
    keys = "layer overhead fan_out".split()
    keys = [f"{k}_ms_{q}" for k in keys for q in ("median", "p95")] + ["bs_rest_ms_median", "call_floor_ms"]
    keys += ["forward_snapshot_ms_median", "view_at_ms_median"]
    keys += ["process_cpu_ms_median", "devices_cpu_ms_mean"]
    for name, r in result["layer"].items():
        print(f"  {name:<24}" + "".join(f"{r[k]:>13.3f}" if k in r else f"{'-':>13}" for k in keys))
    print(LEGEND)
    greedy = f"{result['new_tokens']} new tokens greedy, {result['rounds']} rounds (goal ≥ 0.6)"
    print(f"\ndecode tokens/s, {greedy}")
    for name, r in result["decode"].items():
        print(
            f"  {name:<26}{r['decode_tokens_per_s_median']:>8.2f} tok/s  ×{r['ratio_to_in_process']:.2f}"
            f"  same text: {r['same_text_as_in_process']}"
        )
    print("\nworker memory (MB): shard files vs RSS / USS")
    rows = [*result["memory"]["workers_after"], result["memory"]["one_shard_worker"] | {"device": "1-shard"}]
    for r in rows:
        print(f"  device {r['device']!s:<8}{r['shard_mb']:>8.1f}{r['rss_mb']:>10.1f}{r['uss_mb']:>10.1f}")
    print(f"\nload average at start / end: {result['loadavg_start']} / {result['loadavg_end']}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both cells up, every variant timed per layer and in decoding, worker memory; the figures."""
    net, tok = load_checkpoint("default")
    reference = install(copy.deepcopy(net))  # keeps its experts: the LocalDispatcher's
    local = reference.local_dispatcher()
    with tempfile.TemporaryDirectory(prefix="wdmoe-bench-") as folder, torch.no_grad():
        bs, server, devices = threaded_cell(net, tok, Path(folder))
        with Cluster("default", DEVICES, settings=SETTINGS, overrides=NO_OUTAGE) as cluster:
            freeze_heap()  # as `wdmoe serve-bs` does once it has started (the devices do it themselves)
            memory_ready = worker_memory(cluster)
            one_shard = one_shard_worker(cluster.devices[0].shards[0])
            inputs = decode_inputs(reference, args.tokens, torch.Generator().manual_seed(0))
            variants: dict[str, Variant] = {
                "local": (local.run, None, ""),
                "8 processes · stream": (cluster.bs.dispatcher.run, cluster.bs, "stream"),
                "8 processes · gRPC": (cluster.bs.dispatcher.run, cluster.bs, "grpc"),
                "8 threads · stream": (bs.dispatcher.run, bs, "stream"),
            }
            procs = [psutil.Process(d.process.pid) for d in cluster.devices if d.process is not None]
            layer = layer_overhead(variants, inputs, {k: procs for k in variants if "processes" in k})
            for name, variant in list(variants.items())[1:]:
                use(variant)
                run, station, plane = variant
                assert station is not None
                layer[name]["max_abs_diff_vs_local"] = max_difference(run, station, local.run, inputs[0])
                layer[name]["call_floor_ms"] = call_floor_ms(station, int(net.config.hidden_size), plane)
            models = {"in-process": (reference, variants["local"])} | {
                name: (variant[1].wm, variant) for name, variant in variants.items() if variant[1] is not None
            }
            decode = decode_speed(models, tok, args.new_tokens, args.rounds)
            memory_after = worker_memory(cluster)
            cluster_totals = cluster.stats()["totals"]
        for device in devices:
            device.stop()
        threads_totals = bs.summary()["totals"]
        server.stop()
    memory = {"workers_ready": memory_ready, "workers_after": memory_after, "one_shard_worker": one_shard}
    totals = {"8 device processes": cluster_totals, "8 device threads": threads_totals}
    return {"layer": layer, "decode": decode, "memory": memory, "bs_totals": totals}


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--tokens", type=int, default=24, help="decode-like tokens (× 30 layers) per variant")
    parser.add_argument("--rounds", type=int, default=3, help="generation rounds per model")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load_start = time.monotonic(), os.getloadavg()
    figures = measure(args)
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "devices": DEVICES,
        "settings": {k: getattr(SETTINGS, k) for k in ("mode", "grace_s", "emulate_links")},
        **{k: getattr(args, k) for k in ("tokens", "rounds", "new_tokens")},
        "prompt": PROMPT,
        **figures,
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
