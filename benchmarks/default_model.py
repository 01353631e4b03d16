"""Build time, peak memory and generation speed of the default model (ratios measured side by side).

    python benchmarks/default_model.py [--tokens 64] [--rounds 3] [--skip-build]

1. Builds the default model into a fresh temporary cache in a child process: wall time and the
   child's peak resident memory; its weights must be byte-identical to the cached build.
2. Greedy generation, the same prompt and token count, alternating between three models in each
   round (so machine noise hits all alike): the dense SmolLM2 (plain transformers), the MoEfied
   model as plain modules (no wdmoe), and the same model with wdmoe installed (`topk`).
   Prints decode tokens/s of each and the ratios; the goal is wdmoe / plain ≥ 0.9.
"""

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from wdmoe.generate import encode_prompt
from wdmoe.models.default import default_model_dir, load_default, load_dense
from wdmoe.models.install import install

PROMPT = "Explain why the sky is blue to a ten-year-old."


def build_in_child() -> dict:
    with tempfile.TemporaryDirectory(prefix="wdmoe-bench-cache-") as cache:
        code = (
            "import json, resource, time; t = time.perf_counter()\n"
            "from wdmoe.models.default import build_default\n"
            "path = build_default()\n"
            "print(json.dumps({'build_s': time.perf_counter() - t, 'path': str(path),"
            " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "WDMOE_CACHE": cache},
            capture_output=True,
            text=True,
            check=True,
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        info["sha256"] = file_sha256(Path(info.pop("path")) / "model.safetensors")
        return info


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def decode_rate(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> float:
    """Decode tokens/s: (time for `tokens` new tokens − time for 1 new token) / (tokens − 1)."""

    def timed(n: int) -> float:
        t = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=2,
        )
        return time.perf_counter() - t

    return (tokens - 1) / (timed(tokens) - timed(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    result: dict = {}
    if not args.skip_build:
        result["build"] = build_in_child()
        print(
            f"build: {result['build']['build_s']:.1f} s, peak RSS {result['build']['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    dense, tok = load_dense()
    plain, _ = load_default()
    if "build" in result:
        same = result["build"]["sha256"] == file_sha256(default_model_dir() / "model.safetensors")
        result["build"]["identical_to_cached_build"] = same
        print(f"deterministic build: fresh build {'==' if same else '!='} cached build (sha256 of weights)")
    wired = copy.deepcopy(plain)
    install(wired)
    ids = encode_prompt(tok, PROMPT, chat=True, system=None)
    models = {"dense": dense, "moe_plain": plain, "moe_wdmoe": wired}
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            rates[name].append(decode_rate(model, ids, args.tokens))
    best = {k: max(v) for k, v in rates.items()}
    result["decode_tok_per_s"] = best
    result["ratio_wdmoe_vs_moe_plain"] = best["moe_wdmoe"] / best["moe_plain"]
    result["ratio_wdmoe_vs_dense"] = best["moe_wdmoe"] / best["dense"]
    for k, v in best.items():
        print(f"{k:10s} {v:6.1f} tok/s  (rounds: {', '.join(f'{r:.1f}' for r in rates[k])})")
    print(f"wdmoe / MoE without wdmoe: {result['ratio_wdmoe_vs_moe_plain']:.2f}  (goal ≥ 0.9)")
    print(f"wdmoe / dense transformers: {result['ratio_wdmoe_vs_dense']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
