"""Split a MoE model into the BS part and standalone expert shards (safetensors), and back.

A shard holds one expert of one layer in the canonical layout of :mod:`wdmoe.models.experts` —
``gate_up`` [2F, D] and ``down`` [D, F], and for families with biased experts (GPT-OSS)
``gate_up_bias`` [2F] and ``down_bias`` [D] — with its layer, expert id and gating name in the
safetensors metadata, so a device loads only what it hosts. Shards without biases keep format
``wdmoe-expert/1``; with biases they are ``wdmoe-expert/2`` (a reader of /1 would drop the biases).
The BS part is every other tensor of the state dict (routers, shared experts, dense layers), under
its original name.
"""

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wdmoe.errors import ModelFolderError, ModelNotFoundError
from wdmoe.models.experts import ExpertWeights
from wdmoe.types import CausalLM

# wdmoe.models.adapters (model code) is imported where a whole model is split or filled, so that a
# device worker, which only reads shards, does not load it.

EXPERT_PARAMS = tuple(
    f".experts.{name}" for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
)
BS_FILE = "bs.safetensors"
SHARD_FORMAT = "wdmoe-expert/1"
BIASED_FORMAT = "wdmoe-expert/2"
SHARD_FORMATS = (SHARD_FORMAT, BIASED_FORMAT)
BIASES = ("gate_up_bias", "down_bias")


@dataclass(frozen=True)
class ShardId:
    layer: int
    expert: int

    @property
    def filename(self) -> str:
        return f"L{self.layer:03d}_E{self.expert:03d}.safetensors"


def is_expert_param(name: str) -> bool:
    return name.endswith(EXPERT_PARAMS)


def expert_shard(model: CausalLM, layer: int, expert: int) -> ExpertWeights:
    """The weights of one expert, copied out of the fused tensors into the canonical layout."""
    from wdmoe.models.adapters import adapter_for, moe_blocks
    from wdmoe.models.experts import canonical_expert

    adapter = adapter_for(model)
    experts = dict(moe_blocks(model))[layer].experts
    return canonical_expert(experts, adapter.layout(experts), expert, adapter.act(experts, model.config))


def save_expert_shard(weights: ExpertWeights, shard: ShardId, folder: Path) -> Path:
    tensors = {"gate_up": weights.gate_up, "down": weights.down}
    if weights.gate_up_bias is not None and weights.down_bias is not None:
        tensors |= {"gate_up_bias": weights.gate_up_bias, "down_bias": weights.down_bias}
    meta = {
        "layer": str(shard.layer),
        "expert": str(shard.expert),
        "act": weights.act,
        "format": BIASED_FORMAT if len(tensors) > 2 else SHARD_FORMAT,
    }
    path = folder / shard.filename
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@contextmanager
def safetensors_file(path: Path) -> Iterator[Any]:
    """``safe_open(path)``, its header checked; a file that is not safetensors (text, truncated,
    not readable) raises ModelFolderError naming it instead of safetensors' bare message."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{path} is not a readable safetensors file: {e}") from e


def shard_id(path: Path, meta: dict[str, str] | None, names: set[str]) -> ShardId:
    """The id in a shard's metadata; anything but a file :func:`save_expert_shard` wrote raises
    ModelFolderError naming the file and what is missing."""
    meta = meta or {}
    needed = {"gate_up", "down"} | (set(BIASES) if meta.get("format") == BIASED_FORMAT else set())
    if meta.get("format") not in SHARD_FORMATS or not needed <= names:
        raise ModelFolderError(
            f"{path} is not a wdmoe expert shard: expected format {SHARD_FORMAT!r} with tensors "
            f"gate_up, down (or {BIASED_FORMAT!r} with gate_up_bias, down_bias too); found format "
            f"{meta.get('format')!r} and tensors {sorted(names)}"
        )
    if not all(meta.get(k, "").isdecimal() for k in ("layer", "expert")) or not meta.get("act"):
        fields = {k: meta.get(k) for k in ("layer", "expert", "act")}
        raise ModelFolderError(f"{path}: expert shard metadata {fields} needs integer layer, expert, an act")
    return ShardId(int(meta["layer"]), int(meta["expert"]))


def check_shapes(path: Path, w: ExpertWeights) -> None:
    """gate_up [2F, D] and down [D, F], or ModelFolderError naming the file and the shapes."""
    gu, dn = tuple(w.gate_up.shape), tuple(w.down.shape)
    if len(gu) != 2 or len(dn) != 2 or gu != (2 * dn[1], dn[0]):
        raise ModelFolderError(f"{path}: expert shard shapes gate_up {gu}, down {dn} are not [2F, D], [D, F]")
    if w.gate_up_bias is not None and w.down_bias is not None:
        bu, bd = tuple(w.gate_up_bias.shape), tuple(w.down_bias.shape)
        if (bu, bd) != ((gu[0],), (dn[0],)):
            raise ModelFolderError(f"{path}: expert shard bias shapes {bu}, {bd} are not [2F], [D]")


def load_expert_shard(path: Path) -> tuple[ShardId, ExpertWeights]:
    """Read one shard: its id and weights (only this file is read). A missing file raises
    ModelNotFoundError; a file that is not a shard, ModelFolderError naming it."""
    if not path.is_file():
        raise ModelNotFoundError(f"expert shard {path} does not exist (or is not a file)")
    with safetensors_file(path) as f:
        shard = shard_id(path, f.metadata(), set(f.keys()))
        biases = [f.get_tensor(k) if f.metadata()["format"] == BIASED_FORMAT else None for k in BIASES]
        weights = ExpertWeights(f.get_tensor("gate_up"), f.get_tensor("down"), f.metadata()["act"], *biases)
    check_shapes(path, weights)
    return shard, weights


def split_model(model: CausalLM, folder: Path) -> list[Path]:
    """Write ``bs.safetensors`` (+ config.json) and one shard per (layer, expert); return the shards."""
    from wdmoe.models.adapters import moe_blocks

    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    bs = {k: v.detach().contiguous() for k, v in state.items() if not is_expert_param(k)}
    bs = dedupe_tied(bs)
    save_file(bs, str(folder / BS_FILE), metadata={"format": "wdmoe-bs/1"})
    model.config.save_pretrained(folder)
    shards = []
    for layer, block in moe_blocks(model):
        for e in range(block.experts.gate_up_proj.shape[0]):
            shards.append(save_expert_shard(expert_shard(model, layer, e), ShardId(layer, e), folder))
    (folder / "shards.json").write_text(json.dumps([p.name for p in shards]))
    return shards


def dedupe_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per shared storage (tied embeddings), as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            out[k] = v
    return out


def load_bs_part(model: CausalLM, folder: Path) -> list[str]:
    """Load the BS part into ``model``; return the names it did not provide (the experts)."""
    if not (folder / BS_FILE).is_file():
        raise ModelNotFoundError(f"{folder / BS_FILE} does not exist: run `wdmoe model split` first")
    with safetensors_file(folder / BS_FILE) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    return [k for k in result.missing_keys if not is_expert_param(k) and k not in tied_names(model)]


def tied_names(model: CausalLM) -> set[str]:
    """Parameter names that alias another (tied embeddings): absent from the file by design."""
    return set(getattr(model, "_tied_weights_keys", None) or ())


def load_shards_into(model: CausalLM, paths: Iterable[Path]) -> None:
    """Copy expert shards back into the fused expert tensors of ``model`` (in its layout)."""
    from wdmoe.models.adapters import adapter_for, moe_blocks
    from wdmoe.models.experts import load_canonical

    adapter = adapter_for(model)
    blocks = dict(moe_blocks(model))
    with torch.no_grad():
        for path in paths:
            shard, w = load_expert_shard(path)
            experts = blocks[shard.layer].experts
            load_canonical(experts, adapter.layout(experts), shard.expert, w)
