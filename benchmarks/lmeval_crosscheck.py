"""wdmoe's harness against lm-eval on the same model and items: do they score alike?

    python benchmarks/lmeval_crosscheck.py --limit 200 --out benchmarks/results/lmeval_crosscheck.json

The dense default model (policy topk with all 8 experts) answers the first ``--limit`` items of
ARC-Easy and PIQA twice: scored by ``wdmoe.eval.harness.evaluate_task`` and by
``lm_eval.simple_evaluate`` (lm-eval's own HFLM on the same loaded model, the local
``wdmoe_arc_easy`` / ``wdmoe_piqa`` tasks). Prints acc and acc_norm of both and the difference
in points; the two should agree within 1 point. From lm-eval's per-item log-likelihoods it also
recomputes acc_norm with wdmoe's former normalisation (per character of the continuation with its
leading space; lm-eval divides by the characters of the choice alone, as wdmoe now does too),
which showed that an earlier 2.5-point acc_norm gap was one of definition, not of scoring.
"""

import argparse
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASKS = ("arc_easy", "piqa")


def wdmoe_scores(net: Any, tok: Any, data_dir: Path, limit: int) -> dict[str, dict[str, Any]]:
    from wdmoe.eval.harness import EvalSettings, evaluate_task

    out = {}
    for name in TASKS:
        t0 = time.perf_counter()
        settings = EvalSettings(batch_size=16)
        r = evaluate_task(name, net, tok, data_dir=data_dir, limit=limit, settings=settings)
        out[name] = {**r.metrics, "n": r.n, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def lmeval_scores(net: Any, tok: Any, data_dir: Path, limit: int) -> dict[str, dict[str, Any]]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from wdmoe.lmeval import local_task_manager

    lm = HFLM(pretrained=net, tokenizer=tok, batch_size=16)
    out = {}
    with tempfile.TemporaryDirectory(prefix="wdmoe-lmeval-xcheck-") as folder:
        manager = local_task_manager(Path(folder), data_dir, include_defaults=False)
        for name in TASKS:
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[f"wdmoe_{name}"], task_manager=manager, limit=limit, log_samples=True
            )
            metrics = res["results"][f"wdmoe_{name}"]
            samples = res["samples"][f"wdmoe_{name}"]
            out[name] = {
                "acc": metrics["acc,none"],
                "acc_norm": metrics["acc_norm,none"],
                "n": len(samples),
                "acc_norm_wdmoe_definition": acc_norm_with_space(samples),  # the former rule
                "seconds": round(time.perf_counter() - t0, 1),
            }
    return out


def acc_norm_with_space(samples: list[dict[str, Any]]) -> float:
    """acc_norm from lm-eval's log-likelihoods divided by len(" " + choice): wdmoe's former rule."""
    hits = []
    for s in samples:
        lls = np.array([float(r[0]) for r in s["filtered_resps"]])
        lengths = np.array([len(" " + c) for c in s["doc"]["choices"]], dtype=float)
        hits.append(int(np.argmax(lls / lengths)) == int(s["doc"]["gold"]))
    return float(np.mean(hits))


def table(ours: dict, theirs: dict) -> str:
    head = f"{'task':9s} {'n':>4s} | {'metric':8s} {'wdmoe':>7s} {'lm-eval':>7s} {'Δ pts':>6s}"
    lines = [head, "-" * len(head)]
    for name in TASKS:
        for m in ("acc", "acc_norm"):
            a, b = ours[name][m], theirs[name][m]
            lines.append(f"{name:9s} {ours[name]['n']:4d} | {m:8s} {a:7.3f} {b:7.3f} {100 * (a - b):+6.1f}")
    return "\n".join(lines)


def main() -> None:
    from wdmoe.eval.tasks import default_data_dir
    from wdmoe.lmeval import go_offline
    from wdmoe.models.install import install
    from wdmoe.models.loading import load_checkpoint
    from wdmoe.policies import make_policy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200, help="The first N items of each task.")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lmeval_crosscheck.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    args = ap.parse_args()
    go_offline()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    net, tok = load_checkpoint("default")
    wm = install(net, make_policy("topk"))
    wm.set_top_k(wm.num_experts)  # all 8 experts: the dense model
    ours = wdmoe_scores(net, tok, args.data_dir, args.limit)
    theirs = lmeval_scores(net, tok, args.data_dir, args.limit)
    diff = {t: {m: 100 * (ours[t][m] - theirs[t][m]) for m in ("acc", "acc_norm")} for t in TASKS}
    print(table(ours, theirs))
    for t in TASKS:
        norm = theirs[t]["acc_norm_wdmoe_definition"]
        print(f"{t}: lm-eval's log-likelihoods, acc_norm by wdmoe's former definition: {norm:.3f}")
    wall_s = round(time.perf_counter() - t0, 1)
    agree = all(abs(v) <= 1.0 for d in diff.values() for v in d.values())
    print(f"agree within 1 point: {agree}  (wall {wall_s} s)")
    record = {
        "model": "default (topk, top_k=8: dense)",
        "limit": args.limit,
        "data_dir": str(args.data_dir.resolve()),
        "wdmoe": ours,
        "lm_eval": theirs,
        "diff_points": diff,
        "agree_within_1_point": agree,
        "wall_s": wall_s,
        "torch_threads": torch.get_num_threads(),
        "versions": {p: version(p) for p in ("wdmoe", "lm_eval", "torch", "transformers")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
