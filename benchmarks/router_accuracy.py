"""Accuracy of the default MoE against the dense model, learned vs oracle router, per top-k.

    python benchmarks/router_accuracy.py --limit 300 --out benchmarks/results/router_accuracy.json

Rows: the dense SmolLM2 (GGUF, dequantized), then for k = 8..4 the MoE with the learned router
and with the oracle router (true expert output norms). ARC-Easy and PIQA dev files, acc and
acc_norm (lm-eval's definitions), with standard errors.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from wdmoe.eval.multiple_choice import score_choices
from wdmoe.eval.tasks import default_data_dir, query_choice_items
from wdmoe.models.default import load_default, load_dense
from wdmoe.models.moefy import OracleRouter

TASKS = ("arc_easy", "piqa")


def evaluate(model: torch.nn.Module, tok, tasks: dict) -> dict:
    row = {}
    for name, items in tasks.items():
        s = score_choices(model, tok, items)
        row[name] = {"acc": s.acc, "acc_norm": s.acc_norm, "acc_stderr": s.acc_stderr, "n": s.n}
    return row


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table (acc / acc_norm per task), as quoted in docs/."""
    head = "| model | k | " + " | ".join(f"{t} acc | {t} acc_norm" for t in TASKS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(TASKS))]
    for r in rows:
        cells = " | ".join(
            f"{r[t]['acc']:.3f} ± {r[t]['acc_stderr']:.3f} | {r[t]['acc_norm']:.3f}" for t in TASKS
        )
        lines.append(f"| {r['model']} | {r['k'] or '—'} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--ks", default="8,7,6,5,4")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/router_accuracy.json"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tasks = {t: query_choice_items(args.data_dir / f"{t}.jsonl", args.limit) for t in TASKS}
    rows = []

    def emit(name: str, k: int | None, row: dict, t0: float) -> None:
        rows.append({"model": name, "k": k, **row, "seconds": round(time.perf_counter() - t0, 1)})
        cells = "  ".join(f"{t} acc {row[t]['acc']:.3f} acc_norm {row[t]['acc_norm']:.3f}" for t in TASKS)
        print(f"{name:8s} k={k!s:4s} {cells}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1))

    t0 = time.perf_counter()
    dense, tok = load_dense()
    emit("dense", None, evaluate(dense, tok, tasks), t0)
    del dense
    model, tok = load_default()
    learned = [layer.mlp.gate for layer in model.model.layers]
    for k in [int(k) for k in args.ks.split(",")]:
        for router in ("learned", "oracle") if k < 8 else ("learned",):
            t0 = time.perf_counter()
            for layer, gate in zip(model.model.layers, learned, strict=True):
                layer.mlp.gate = gate if router == "learned" else OracleRouter(layer.mlp.experts, k)
                layer.mlp.gate.top_k = k
            emit(router, k, evaluate(model, tok, tasks), t0)
    print(markdown(rows))


if __name__ == "__main__":
    main()
