"""Split a MoE model into the BS part and standalone expert shards (safetensors), and back.

A shard holds one expert of one layer — ``gate_up`` [2F, D] and ``down`` [D, F] — with its layer,
expert id and activation in the safetensors metadata, so a device loads only what it hosts. The
BS part is every other tensor of the state dict, under its original name.
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

EXPERT_PARAMS = (".experts.gate_up_proj", ".experts.down_proj")
BS_FILE = "bs.safetensors"
SHARD_FORMAT = "wdmoe-expert/1"


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
    """The weights of one expert, copied out of the fused tensors."""
    from wdmoe.models.adapters import moe_blocks

    experts = dict(moe_blocks(model))[layer].experts
    return ExpertWeights(
        experts.gate_up_proj[expert].detach().clone(),
        experts.down_proj[expert].detach().clone(),
        model.config.hidden_act,
    )


def save_expert_shard(weights: ExpertWeights, shard: ShardId, folder: Path) -> Path:
    meta = {
        "layer": str(shard.layer),
        "expert": str(shard.expert),
        "act": weights.act,
        "format": SHARD_FORMAT,
    }
    path = folder / shard.filename
    save_file(
        {"gate_up": weights.gate_up.contiguous(), "down": weights.down.contiguous()}, str(path), metadata=meta
    )
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
    if meta.get("format") != SHARD_FORMAT or not {"gate_up", "down"} <= names:
        raise ModelFolderError(
            f"{path} is not a wdmoe expert shard: expected format {SHARD_FORMAT!r} and tensors "
            f"gate_up, down; found format {meta.get('format')!r} and tensors {sorted(names)}"
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


def load_expert_shard(path: Path) -> tuple[ShardId, ExpertWeights]:
    """Read one shard: its id and weights (only this file is read). A missing file raises
    ModelNotFoundError; a file that is not a shard, ModelFolderError naming it."""
    if not path.is_file():
        raise ModelNotFoundError(f"expert shard {path} does not exist (or is not a file)")
    with safetensors_file(path) as f:
        shard = shard_id(path, f.metadata(), set(f.keys()))
        weights = ExpertWeights(f.get_tensor("gate_up"), f.get_tensor("down"), f.metadata()["act"])
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
    """Copy expert shards back into the fused expert tensors of ``model``."""
    from wdmoe.models.adapters import moe_blocks

    blocks = dict(moe_blocks(model))
    with torch.no_grad():
        for path in paths:
            shard, w = load_expert_shard(path)
            blocks[shard.layer].experts.gate_up_proj[shard.expert].copy_(w.gate_up)
            blocks[shard.layer].experts.down_proj[shard.expert].copy_(w.down)
