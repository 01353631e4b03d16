"""Load any supported checkpoint — the embedded default, a MoEfied folder or a transformers MoE.

A local folder is checked up front (:func:`check_model_folder`, cheap: JSON, config, safetensors
headers, tokenizer files) so that a broken folder is refused with one message naming the file and
the fault before anything heavy loads, here or in the processes of a cluster.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from wdmoe.errors import ModelFolderError, ModelNotFoundError, UnsupportedModelError, WdmoeError
from wdmoe.models.adapters import supported_types
from wdmoe.models.default import load_default, load_moefied
from wdmoe.models.split import safetensors_file
from wdmoe.types import CausalLM

DEFAULT = "default"
MOEFIED_META = "wdmoe.json"
# What from_pretrained reads, in its order of preference (an index lists the shard files).
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# A tokenizer needs its vocabulary; tokenizer_config.json alone does not load (transformers 5).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")
# What transformers raises on a malformed config, weights file or tokenizer.
LOAD_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    RuntimeError,
    SafetensorError,
    StrictDataclassError,
)


def supported_model_types() -> list[str]:
    return supported_types()


def one_line(error: BaseException) -> str:
    """transformers' messages span lines and tables; ours are one line."""
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def folder_errors(where: Path, doing: str) -> Iterator[None]:
    """Turn what transformers raises on a broken file into ModelFolderError naming ``where``."""
    try:
        yield
    except WdmoeError:
        raise
    except LOAD_ERRORS as e:
        raise ModelFolderError(f"{where}: {doing} failed: {type(e).__name__}: {one_line(e)}") from e


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ModelFolderError saying it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelFolderError(f"{path} is not valid JSON: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object, not a JSON {type(data).__name__}")
    return data


def check_model_type(path: Path, config: dict[str, Any]) -> None:
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"{path}: model type {model_type!r} is not a supported MoE; supported: "
            f"{', '.join(supported_model_types())} (or the embedded default)"
        )


def weight_files(path: Path) -> list[Path]:
    """The weights files from_pretrained would read (an index's shards), all present."""
    for name in WEIGHT_INDEXES:
        if (path / name).is_file():
            weight_map = read_json_object(path / name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelFolderError(f"{path / name} has no weight_map object")
            files = [path / str(f) for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelFolderError(f"{path / name} lists weights files that are missing: {missing[:5]}")
            return files
    files = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not files:
        expected = ", ".join(WEIGHT_FILES + WEIGHT_INDEXES)
        raise ModelFolderError(f"{path} has no weights file: expected one of {expected}")
    return files[:1]


def check_weights(path: Path) -> None:
    """Each safetensors file's header parses and covers the file (a cheap read, not the tensors)."""
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            with safetensors_file(file) as f:
                f.keys()


def check_tokenizer(path: Path) -> None:
    if not any((path / name).is_file() for name in VOCAB_FILES):
        raise ModelFolderError(f"{path} has no tokenizer: expected one of {', '.join(VOCAB_FILES)}")


def check_model_folder(path: Path) -> None:
    """Refuse a local model folder that cannot load, naming the file and what is wrong.

    Cheap (no tensor is read): config.json is a JSON object of a supported MoE type that
    transformers' AutoConfig accepts, the weights files exist and their safetensors headers
    parse, and a tokenizer vocabulary is present. Raises ModelNotFoundError, UnsupportedModelError
    or ModelFolderError (a ConfigError).
    """
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a folder: give 'default' or a local model folder")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a transformers checkpoint folder")
    config = read_json_object(path / "config.json")
    if (path / MOEFIED_META).is_file():
        read_json_object(path / MOEFIED_META)  # a MoEfied dense model: its own type is "llama"
    else:
        check_model_type(path, config)
    with folder_errors(path / "config.json", "reading the config"):
        AutoConfig.from_pretrained(path)
    check_weights(path)
    check_tokenizer(path)


def load_checkpoint(
    spec: str, top_k: int | None = None, progress: Callable[[str, int, int], None] | None = None
) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """``default`` (built on first use), a MoEfied folder, or a local transformers checkpoint folder."""
    if spec == DEFAULT:
        return load_default(top_k=top_k, progress=progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"checkpoint {spec!r} not found: give 'default' or a local model folder")
    check_model_folder(path)
    with folder_errors(path, "loading the checkpoint"):
        if (path / MOEFIED_META).is_file():
            return load_moefied(path, top_k)
        return load_transformers(path, top_k)


def load_transformers(path: Path, top_k: int | None) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    config = AutoConfig.from_pretrained(path)
    if top_k is not None:
        config.num_experts_per_tok = top_k
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)
