"""Multiple-choice scoring: every (context + choice) alone vs each context once with a KV cache.

    OMP_NUM_THREADS=1 python benchmarks/scoring.py [--limit 100] [--rounds 2] [--profile]

Scores the first --limit ARC-Easy items with the default model four ways, alternating in every
round (so machine noise hits all alike), and reports items/s (the median over rounds):
- old / new bare: ``score_choices`` (``share_context`` False / True) on the loaded model, no
  simulation;
- old / new sim: ``wdmoe.studies.runner.evaluate_simulated`` with a default EvalPoint (policy
  topk, scenario paper, allocator equal), the model with wdmoe installed, every forward accounted
  (until the simulator understands ``sharing_contexts``, the new path's simulated latency is not
  meaningful; its throughput is).
Prints the speed-up new/old and whether acc and acc_norm are identical, with the largest
|Δ log-likelihood| between the bare scorers. Asserts nothing about speed. Inside the simulation
the scores may differ: the cell drops the experts of calls lost to a link in outage, and which
calls those are depends on when each forward runs (the expert drop rate is printed with them).
--profile first splits one scoring of each kind by where its time goes (module hooks): attention,
MoE blocks, the rest of the decoder, the LM head, and outside the model (log_softmax, the
scorer's Python, the simulator's accounting).
Writes benchmarks/results/scoring.json.
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from wdmoe.eval.harness import EvalSettings
from wdmoe.eval.multiple_choice import choice_requests, choice_scores, loglikelihoods
from wdmoe.eval.tasks import ChoiceItem, default_data_dir, get_task
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import load_checkpoint
from wdmoe.studies.runner import EvalPoint, evaluate_simulated

TASK = "arc_easy"
Run = Callable[[], dict[str, Any]]


def bare(net: torch.nn.Module, tok: Any, items: list[ChoiceItem], batch_size: int, share: bool) -> Run:
    """score_choices, step by step, keeping the log-likelihoods."""

    def run() -> dict[str, Any]:
        requests = choice_requests(tok, items)
        lls = loglikelihoods(net, requests, batch_size, tok.pad_token_id or 0, share)
        s = choice_scores(items, lls)
        return {"acc": s.acc, "acc_norm": s.acc_norm, "lls": lls}

    return run


def simulated(wm: WirelessModel, tok: Any, items: list[ChoiceItem], batch_size: int, share: bool) -> Run:
    point = EvalPoint(scoring=EvalSettings(batch_size=batch_size, share_context=share))
    cfg = point.load_scenario()

    def run() -> dict[str, Any]:
        result, latency = evaluate_simulated(wm, tok, get_task(TASK), items, cfg, point)
        drops = {k: latency.get(k) for k in ("requests", "mean_s", "drop_rate")}
        return {**result.metrics, **drops}

    return run


class Split:
    """Seconds spent inside modules, by part, while ``watch``-ing (forward pre/post hooks)."""

    def __init__(self, net: torch.nn.Module) -> None:
        body = net.model  # type: ignore[attr-defined]
        self.parts = {
            "attention": [layer.self_attn for layer in body.layers],
            "moe_blocks": [layer.mlp for layer in body.layers],
            "decoder": [body],
            "lm_head": [net.lm_head],  # type: ignore[attr-defined]
        }
        self.seconds = dict.fromkeys(self.parts, 0.0)

    @contextmanager
    def watch(self) -> Iterator[None]:
        handles = []
        for part, modules in self.parts.items():
            for m in modules:
                handles += self.hooks(part, m)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def hooks(self, part: str, module: torch.nn.Module) -> list[Any]:
        start: list[float] = []

        def pre(*_: Any) -> None:
            start.append(time.perf_counter())

        def post(*_: Any) -> None:
            self.seconds[part] += time.perf_counter() - start.pop()

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def profile(name: str, net: torch.nn.Module, run: Run) -> dict[str, float]:
    split = Split(net)
    t0 = time.perf_counter()
    with split.watch():
        run()
    total = time.perf_counter() - t0
    s = split.seconds
    row = {
        "total_s": total,
        "attention_s": s["attention"],
        "moe_blocks_s": s["moe_blocks"],
        "decoder_rest_s": s["decoder"] - s["attention"] - s["moe_blocks"],
        "lm_head_s": s["lm_head"],
        "outside_model_s": total - s["decoder"] - s["lm_head"],
    }
    parts = "  ".join(f"{k.removesuffix('_s')} {v:6.2f} s ({100 * v / total:4.1f} %)" for k, v in row.items())
    print(f"  {name:<9} {parts}")
    return row


def fixed_cost_ms(net: torch.nn.Module) -> float:
    """The smallest time of a 1-token forward (what a forward costs beyond its tokens)."""
    ids = torch.tensor([[1]])
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        net(input_ids=ids, use_cache=False, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=100, help="The first N ARC-Easy items.")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=EvalSettings().batch_size)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--profile", action="store_true", help="Split one scoring of each kind first.")
    ap.add_argument("--profile-limit", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scoring.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    data_dir = args.data_dir or default_data_dir()
    items: list[ChoiceItem] = get_task(TASK).load(data_dir, args.limit)  # type: ignore[assignment]
    net, tok = load_checkpoint("default")  # bare: the model alone
    wm = install(load_checkpoint("default")[0])  # simulated: a second copy with wdmoe installed
    b = args.batch_size

    def variants(its: list[ChoiceItem]) -> dict[str, tuple[torch.nn.Module, Run]]:
        return {
            "old bare": (net, bare(net, tok, its, b, share=False)),
            "new bare": (net, bare(net, tok, its, b, share=True)),
            "old sim": (wm.model, simulated(wm, tok, its, b, share=False)),
            "new sim": (wm.model, simulated(wm, tok, its, b, share=True)),
        }

    record: dict[str, Any] = {"fixed_cost_ms": {"bare": fixed_cost_ms(net), "sim": fixed_cost_ms(wm.model)}}
    print(f"a 1-token forward: {record['fixed_cost_ms']['bare']:.1f} ms (bare model)")
    if args.profile:
        print(f"where the time goes, {min(args.profile_limit, len(items))} items:")
        few = variants(items[: args.profile_limit])
        record["profile"] = {name: profile(name, m, run) for name, (m, run) in few.items()}
    for _, run in variants(items[:2]).values():  # warm-up
        run()
    runs = variants(items)
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        for name, (_, run) in runs.items():
            t0 = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1} {name:<9} {times[name][-1]:7.2f} s")
    rate = {name: len(items) / statistics.median(t) for name, t in times.items()}
    ratio = {k: rate[f"new {k}"] / rate[f"old {k}"] for k in ("bare", "sim")}
    same = {
        k: all(results[f"old {k}"][m] == results[f"new {k}"][m] for m in ("acc", "acc_norm"))
        for k in ("bare", "sim")
    }
    old_ll, new_ll = results["old bare"]["lls"], results["new bare"]["lls"]
    max_dll = max(abs(a - c) for a, c in zip(old_ll, new_ll, strict=True))
    print(f"ARC-Easy, {len(items)} items ({len(old_ll)} choices), batch size {b}, {args.rounds} rounds:")
    for name in runs:
        res = results[name]
        drops = f"   expert drop rate {res['drop_rate']:.4f}" if res.get("drop_rate") is not None else ""
        print(
            f"  {name:<9} {rate[name]:6.2f} items/s   acc {res['acc']:.3f}  acc_norm {res['acc_norm']:.3f}"
            + drops
        )
    for k in ("bare", "sim"):
        print(f"  {k:<4}: new/old ×{ratio[k]:.2f} items/s; acc and acc_norm identical: {same[k]}")
    print(f"  max |Δ log-likelihood| old vs new (bare): {max_dll:.2e}")
    record.update(
        {
            "task": TASK,
            "items": len(items),
            "choices": len(old_ll),
            "batch_size": b,
            "rounds": args.rounds,
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "seconds": times,
            "items_per_s": rate,
            "ratio_new_over_old": ratio,
            "scores": {n: {m: results[n].get(m) for m in ("acc", "acc_norm", "drop_rate")} for n in runs},
            "identical_acc_and_acc_norm": same,
            "max_abs_delta_loglikelihood": max_dll,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
