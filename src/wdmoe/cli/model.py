"""``wdmoe model build | info | split`` (thin; the work is in wdmoe.models)."""

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from wdmoe.cli.common import BuildProgress, err, fail, quiet_transformers
from wdmoe.errors import WdmoeError

model_app = typer.Typer(help="Build, inspect and split models.", no_args_is_help=True)


@model_app.command("build")
def model_build(
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache holds it.")] = False,
) -> None:
    """Build the embedded default MoE model (SmolLM2-135M-Instruct, 8 experts) into the cache."""
    from wdmoe.models.default import build_default, default_model_dir

    quiet_transformers()
    path = default_model_dir()
    if (path / "wdmoe.json").exists() and not force:
        err.print(f"already built: {path} (use --force to rebuild)")
        return
    if force and path.exists():
        import shutil

        shutil.rmtree(path)
    t0 = time.perf_counter()
    try:
        with BuildProgress() as progress:
            build_default(progress=progress)
    except WdmoeError as e:
        raise fail(e) from e
    err.print(f"built {path} in {time.perf_counter() - t0:.0f} s")


@model_app.command("info")
def model_info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Where the default model is cached and how it was built."""
    from wdmoe.models.default import default_model_dir

    path = default_model_dir()
    meta_file = path / "wdmoe.json"
    info = {"path": str(path), "built": meta_file.exists()}
    if meta_file.exists():
        info |= json.loads(meta_file.read_text())
    typer.echo(json.dumps(info, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in info.items()))


@model_app.command("split")
def model_split(
    out: Annotated[Path, typer.Argument(help="Folder for bs.safetensors and the expert shards.")],
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
) -> None:
    """Split a model into its BS part and one safetensors shard per (layer, expert)."""
    from wdmoe.models.loading import load_checkpoint
    from wdmoe.models.split import split_model

    quiet_transformers()
    try:
        net, _ = load_checkpoint(model)
        shards = split_model(net, out)
    except WdmoeError as e:
        raise fail(e) from e
    size = sum(p.stat().st_size for p in shards)
    err.print(f"wrote {out / 'bs.safetensors'} and {len(shards)} expert shards ({size / 1e6:.1f} MB)")
