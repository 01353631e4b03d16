"""Overhead of channel-aware selection and bandwidth allocation on the default model, in-process.

    python benchmarks/overhead.py [--rounds 5] [--prompt-tokens 64] [--decode-steps 16]

Times the same work side by side, alternating in every round (so machine noise hits all alike):
- `topk`: the model with wdmoe installed and the vanilla policy, no simulation (the baseline);
- `wdmoe θ=0 + minmax (sim)`: the WDMoE policy with θ = 0 (it keeps every candidate, so the experts
  computed are the same as topk's) inside the simulation on the `paper` cell with the `minmax`
  allocator: the policy's WLR arithmetic, the channel snapshot, the per-layer allocation and the
  latency accounting are the whole difference — the overhead the goal is about (≤ 10 %);
- `wdmoe θ=0.1 + minmax (sim)`: the default WDMoE setting; it drops experts, so it also computes less.
Each measures a prefill of --prompt-tokens tokens and --decode-steps greedy decode steps (KV cache).
Writes benchmarks/results/overhead.json.
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from wdmoe.config import load_scenario
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import load_checkpoint
from wdmoe.policies import make_policy
from wdmoe.simulate import SimSettings, Simulation

TEXT = (
    "The base station keeps the attention layers while the experts run on phones and boards spread "
    "across the cell; every layer waits for the slowest device it selected, so the channel matters. "
) * 8


@torch.no_grad()
def forward_work(wm: WirelessModel, ids: torch.Tensor, steps: int) -> float:
    """Seconds for a prefill of ``ids`` then ``steps`` greedy decode steps with a KV cache."""
    start = time.perf_counter()
    out = wm.model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = wm.model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def runner(wm: WirelessModel, policy: str, theta: float | None, sim: bool) -> Callable[..., float]:
    cfg = load_scenario("paper", ["model=smollm2-moe8"])

    def run(ids: torch.Tensor, steps: int) -> float:
        wm.set_policy(make_policy(policy, **({} if theta is None else {"theta": theta})))
        if not sim:
            return forward_work(wm, ids, steps)
        simulation = Simulation(wm, cfg, SimSettings(allocator="minmax", seed=0))
        with simulation.attached():
            return forward_work(wm, ids, steps)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    args = parser.parse_args()

    net, tok = load_checkpoint("default")
    wm = install(net, make_policy("topk"))
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, : args.prompt_tokens]
    variants = {
        "topk": runner(wm, "topk", None, sim=False),
        "wdmoe θ=0 + minmax (sim)": runner(wm, "wdmoe", 0.0, sim=True),
        "wdmoe θ=0.1 + minmax (sim)": runner(wm, "wdmoe", 0.1, sim=True),
    }
    for run in variants.values():  # warm-up
        run(ids, 2)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            times[name].append(run(ids, args.decode_steps))
    base = statistics.median(times["topk"])
    print(
        f"prefill {ids.shape[1]} tokens + {args.decode_steps} decode steps, {args.rounds} rounds, median s:"
    )
    result = {}
    for name, values in times.items():
        med = statistics.median(values)
        result[name] = {"median_s": med, "all_s": values, "ratio_to_topk": med / base}
        print(f"  {name:<28} {med:8.3f} s   ×{med / base:.3f} of topk")
    overhead = result["wdmoe θ=0 + minmax (sim)"]["ratio_to_topk"] - 1
    print(f"overhead of selection + minmax + accounting: {overhead * 100:+.1f} % (goal ≤ 10 %)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "prompt_tokens": int(ids.shape[1]),
                "decode_steps": args.decode_steps,
                "rounds": args.rounds,
                "variants": result,
                "overhead": overhead,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
