"""``wdmoe cluster --devices N``: a prompt generated through N local device workers (thin; the
launcher lives in wdmoe.runtime.cluster)."""

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from wdmoe.cli_cell import table_console
from wdmoe.errors import WdmoeError

err = Console(stderr=True, soft_wrap=True)


def _fail(error: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {error}")
    return typer.Exit(code=2)


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cluster_cmd(
    devices: Annotated[int, typer.Option(help="Device worker processes (1..experts per layer).")] = 2,
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    prompt: Annotated[str, typer.Option(help="The prompt to answer.")] = "What is a router?",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 32,
) -> None:
    """Start N local device workers, generate the prompt through the remote experts, summarise, stop."""
    from wdmoe.cli import quiet_transformers
    from wdmoe.generate import generate
    from wdmoe.runtime.cluster import Cluster

    quiet_transformers()
    if max_new_tokens < 1:
        raise _fail(ValueError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}"))
    try:
        with Cluster(model, devices) as cluster:
            ready = ", ".join(d.address for d in cluster.devices)
            err.print(f"[dim]{devices} device workers ready: {ready}[/]")
            generate(cluster.wm, cluster.tok, prompt, max_new_tokens=max_new_tokens, on_text=_stream)
            sys.stdout.write("\n")
            rows = cluster.summary()
    except WdmoeError as e:
        raise _fail(e) from e
    table = Table(title=f"{devices} devices · expert e on device e mod {devices}")
    for col in ("device", "address", "experts", "calls", "failures", "mean compute ms"):
        table.add_column(col, justify="left" if col == "address" else "right")
    for r in rows:
        counts = (str(r.experts), str(r.calls), str(r.failures))
        table.add_row(str(r.device), r.address, *counts, f"{r.mean_compute_ms:.3f}")
    table_console().print(table)
