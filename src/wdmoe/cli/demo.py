"""``wdmoe demo``: the main job, vanilla top-k against WDMoE-θ side by side (thin; the run is in
wdmoe.studies.demo)."""

from typing import TYPE_CHECKING, Annotated, Any

import typer

from wdmoe.cli.common import BuildProgress, err, fail, quiet_transformers, stream_to_stdout, table_console
from wdmoe.cli.dashboard import DashboardOpt
from wdmoe.errors import WdmoeError

if TYPE_CHECKING:
    from wdmoe.dashboard import DashboardServer
    from wdmoe.studies.demo import RunSummary

PACE_S = 0.05  # with a dashboard: a pause after each simulated forward, so the page can be followed


def demo(
    scenario: Annotated[str, typer.Option(help="Scenario preset or .toml file.")] = "paper",
    theta: Annotated[float, typer.Option(help="WDMoE threshold θ (with --k-scaled: θ·2/k).")] = 0.1,
    k_scaled: Annotated[bool, typer.Option(help="Scale θ by 2/k for models with many candidates.")] = True,
    allocator: Annotated[
        str, typer.Option(help="Bandwidth allocator: equal, minmax, proportional.")
    ] = "equal",
    seed: Annotated[int, typer.Option(help="Channel trace seed (the same for both policies).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 32,
    prompt: Annotated[
        list[str] | None, typer.Option(help="A prompt (repeatable); default: two built-in.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a scenario field: a.b=value.")
    ] = None,
    dashboard: DashboardOpt = None,
) -> None:
    """The main job: vanilla top-k vs WDMoE-θ on the default model, the same channel trace, side by side."""
    from wdmoe.config import load_scenario
    from wdmoe.models.install import install
    from wdmoe.models.loading import load_checkpoint
    from wdmoe.policies import make_policy
    from wdmoe.simulate import SimSettings
    from wdmoe.studies.demo import PROMPTS, run_policy

    quiet_transformers()
    page = None
    try:
        cfg = load_scenario(scenario, ["model=smollm2-moe8", *(set_ or [])])
        page = open_dashboard(dashboard, cfg) if dashboard else None
        settings = SimSettings(allocator=allocator, seed=seed)
        runs = [
            ("topk", make_policy("topk")),
            (f"wdmoe-{theta:g}", make_policy("wdmoe", theta=theta, k_scaled=k_scaled)),
        ]
        with BuildProgress() as progress:
            net, tok = load_checkpoint("default", progress=progress)
        wm = install(net)
        summaries = []
        for name, policy in runs:
            err.print(f"\n[bold]{name}[/] · {cfg.name} · {allocator} bandwidth · seed {seed}")
            summaries.append(
                run_policy(
                    wm,
                    tok,
                    cfg,
                    name,
                    policy,
                    settings,
                    tuple(prompt or PROMPTS),
                    max_new_tokens,
                    stream_to_stdout,
                    page.hub if page else None,
                    PACE_S,
                )
            )
    except (WdmoeError, OSError) as e:
        if page is not None:
            page.close()
        raise fail(e) from e
    print_demo_summary(summaries, cfg, seed)
    if page is not None:
        keep_serving(page)


def open_dashboard(address: str, cfg: Any) -> "DashboardServer":
    """The demo's dashboard on ``address`` (HOST:PORT): the page, no controls, no /metrics."""
    from wdmoe.dashboard import DashboardServer, Hub
    from wdmoe.dashboard.http import parse_address
    from wdmoe.studies.demo import demo_hello

    server = DashboardServer(Hub(demo_hello(cfg)), *parse_address(address))
    err.print(f"[bold]dashboard at {server.url}[/] (open it in a browser)")
    return server


def keep_serving(page: "DashboardServer") -> None:
    """Keep the page up after the run until Ctrl-C."""
    err.print(f"[dim]the dashboard stays up at {page.url}; Ctrl-C ends it[/]")
    try:
        page.stopping.wait()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()


def print_demo_summary(summaries: list["RunSummary"], cfg: Any, seed: int) -> None:
    """Latency of each policy, the speed-up, and which devices were dropped and why."""
    from rich.table import Table

    from wdmoe.channel import generate_trace
    from wdmoe.latency.devices import devices_for

    base = summaries[0]
    table = Table(title="simulated latency (same channel trace)")
    for col in ("policy", "TTFT ms", "TPOT ms", "total s", "speed-up", "experts/token/layer"):
        table.add_column(col, justify="right")
    for s in summaries:
        table.add_row(
            s.policy,
            f"{s.ttft_s * 1e3:.1f}",
            f"{s.tpot_s * 1e3:.1f}",
            f"{s.total_s:.3f}",
            f"{base.total_s / s.total_s:.2f}×",
            f"{s.experts_per_token:.2f}",
        )
    out = table_console()
    out.print(table)
    state = generate_trace(cfg, 1, seed).state(0)
    classes = devices_for(cfg.cell.device_classes, cfg.cell.num_devices)
    drops = Table(
        title="per device: channel at t = 0, dropped expert-token pairs, outage (link down % of "
        "layer times · calls lost to outage / cut late), energy the device spent on all answers (J: "
        "compute + radio)"
    )
    columns = ["device", "class", "d (m)", "DL/UL Mb/s at B/U"]
    for s in summaries:
        columns += [f"{s.policy} drops", f"{s.policy} outage", f"{s.policy} energy J"]
    for col in columns:
        drops.add_column(col, justify="right")
    share = state.equal_share_hz()
    for u in range(cfg.cell.num_devices):
        rate = f"{state.dl.rate_bps(share)[u] / 1e6:.1f} / {state.ul.rate_bps(share)[u] / 1e6:.1f}"
        cells = [str(u), classes[u].name, f"{state.distance_m[u]:.0f}", rate]
        for s in summaries:
            energy = f"{s.energy_per_device[u]:.3g}" if s.energy_per_device else "–"
            cells += [f"{s.drops_per_device[u]:.0f}", outage_cell(s, u), energy]
        drops.add_row(*cells)
    out.print(drops)


def outage_cell(summary: "RunSummary", u: int) -> str:
    """``12.0% · 3/1``: device u's link-down share, calls lost / cut late ("–": unknown)."""
    if not summary.down_per_device:
        return "–"
    return (
        f"{summary.down_per_device[u] * 100:.1f}% · {summary.lost_per_device[u]}/{summary.late_per_device[u]}"
    )
