"""Load any supported checkpoint — the embedded default, a MoEfied folder or a transformers MoE."""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from wdmoe.errors import ModelNotFoundError, UnsupportedModelError
from wdmoe.models.adapters import ADAPTERS
from wdmoe.models.default import load_default, load_moefied
from wdmoe.types import CausalLM

DEFAULT = "default"


def supported_model_types() -> list[str]:
    return sorted({t for n in ADAPTERS for t in ADAPTERS.get(n).model_types} - {"llama"})


def load_checkpoint(
    spec: str, top_k: int | None = None, progress: Callable[[str, int, int], None] | None = None
) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """``default`` (built on first use), a MoEfied folder, or a local transformers checkpoint folder."""
    if spec == DEFAULT:
        return load_default(top_k=top_k, progress=progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"checkpoint {spec!r} not found: give 'default' or a local model folder")
    if (path / "wdmoe.json").is_file():
        return load_moefied(path, top_k)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a transformers checkpoint folder")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"{path}: model type {model_type!r} is not a supported MoE; supported: "
            f"{', '.join(supported_model_types())} (or the embedded default)"
        )
    config = AutoConfig.from_pretrained(path)
    if top_k is not None:
        config.num_experts_per_tok = top_k
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)
