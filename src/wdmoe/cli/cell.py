"""``wdmoe cell``: inspect a scenario's cell before running anything (thin; the maths lives in
wdmoe.channel, wdmoe.latency and wdmoe.allocation)."""

import json
import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from wdmoe.allocation import ALLOCATORS, make_allocator
from wdmoe.channel import ChannelState, generate_trace
from wdmoe.channel.units import linear_to_db
from wdmoe.cli.common import fail, table_console
from wdmoe.config import ScenarioConfig, load_scenario
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.latency import ExpertCost, device_time_s, layer_demand, waiting_s
from wdmoe.latency.deadline import links_up
from wdmoe.latency.devices import devices_for, effective_flops_per_s

cell_app = typer.Typer(
    help="Inspect a scenario's cell: channels, rates and bandwidth splits.", no_args_is_help=True
)
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Channel seed (default: the scenario's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.field=value.")]


def _jsonable(value: Any) -> Any:
    """Plain JSON: NumPy → lists/floats, non-finite floats → "inf"/"-inf"/"nan" strings."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _snapshot(
    scenario: str, seed: int | None, overrides: list[str] | None
) -> tuple[ScenarioConfig, int, ChannelState]:
    cfg = load_scenario(scenario, overrides or [])
    seed = cfg.seed if seed is None else seed
    if seed < 0:
        raise ConfigError(f"--seed = {seed} is out of range; allowed: [0, 2^63)")
    return cfg, seed, generate_trace(cfg, 1, seed).state(0)


OUTAGE_WINDOW_S = 60.0  # how much of the trace `cell show` reads for each link's outage share


def outage_share(cfg: ScenarioConfig, seed: int) -> np.ndarray:
    """[U] the share of fading blocks in the first OUTAGE_WINDOW_S of the trace in which each
    device's link is in outage (η at B/U below cell.min_se_bps_per_hz, either direction)."""
    blocks = max(int(OUTAGE_WINDOW_S / cfg.channel.coherence_s), 1)
    trace = generate_trace(cfg, blocks, seed)
    dl = trace.budget.downlink(trace.gain(trace.fading_dl))
    ul = trace.budget.uplink(trace.gain(trace.fading_ul))
    share_hz = cfg.cell.bandwidth_hz / cfg.cell.num_devices
    return np.asarray(1.0 - links_up(dl, ul, share_hz, cfg.cell.min_se_bps_per_hz).mean(axis=0))


def device_rows(cfg: ScenarioConfig, state: ChannelState, outage: np.ndarray) -> list[dict[str, Any]]:
    """Per device: class, distance, LOS, path loss, shadowing, SNR and rate per direction at B/U,
    and the share of blocks its link is in outage (``outage``)."""
    share_hz = state.equal_share_hz()
    classes = devices_for(cfg.cell.device_classes, cfg.cell.num_devices)
    snr_dl_db, snr_ul_db = linear_to_db(state.dl.snr(share_hz)), linear_to_db(state.ul.snr(share_hz))
    rate_dl, rate_ul = state.dl.rate_bps(share_hz), state.ul.rate_bps(share_hz)
    return [
        {
            "device": u,
            "class": classes[u].name,
            "distance_m": float(state.distance_m[u]),
            "los": bool(state.los[u]),
            "pathloss_db": float(state.pathloss_db[u]),
            "shadowing_db": float(state.shadowing_db[u]),
            "snr_dl_db": float(snr_dl_db[u]),
            "snr_ul_db": float(snr_ul_db[u]),
            "rate_dl_bps": float(rate_dl[u]),
            "rate_ul_bps": float(rate_ul[u]),
            "outage_share": float(outage[u]),
        }
        for u in range(state.num_devices)
    ]


def _show_table(cfg: ScenarioConfig, seed: int, rows: list[dict[str, Any]], share_hz: float) -> Table:
    ch = cfg.channel
    table = Table(
        title=f"{cfg.name} · seed {seed} · {ch.pathloss} · {ch.fading} · B/U = {share_hz / 1e6:g} MHz"
    )
    for col in (
        "dev",
        "class",
        "d (m)",
        "LOS",
        "PL (dB)",
        "shadow (dB)",
        "SNR DL/UL (dB)",
        "rate DL/UL (Mb/s)",
        f"outage ({OUTAGE_WINDOW_S:g} s)",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["device"]),
            r["class"],
            f"{r['distance_m']:.1f}",
            "yes" if r["los"] else "no",
            f"{r['pathloss_db']:.1f}",
            f"{r['shadowing_db']:+.1f}",
            f"{r['snr_dl_db']:.1f} / {r['snr_ul_db']:.1f}",
            f"{r['rate_dl_bps'] / 1e6:.1f} / {r['rate_ul_bps'] / 1e6:.1f}",
            f"{r['outage_share'] * 100:.2f} %",
        )
    return table


def plot_cell(cfg: ScenarioConfig, state: ChannelState, path: Path) -> None:
    """Positions coloured by SNR at B/U, one panel per direction; the BS at the origin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share_hz = state.equal_share_hz()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    for ax, name, link in ((axes[0], "downlink", state.dl), (axes[1], "uplink", state.ul)):
        x_m, y_m = state.positions_m[:, 0], state.positions_m[:, 1]
        points = ax.scatter(x_m, y_m, c=linear_to_db(link.snr(share_hz)), cmap="viridis", s=60, zorder=3)
        for u in range(state.num_devices):
            ax.annotate(str(u), (x_m[u], y_m[u]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.scatter([0.0], [0.0], marker="^", s=150, c="red", label="BS", zorder=4)
        for radius_m in (cfg.cell.r_min_m, cfg.cell.r_max_m):
            ax.add_patch(plt.Circle((0.0, 0.0), radius_m, fill=False, ls="--", lw=0.8, color="grey"))
        ax.set(aspect="equal", xlabel="x (m)", ylabel="y (m)", title=f"{cfg.name}: {name} SNR at B/U")
        ax.legend(loc="upper right")
        fig.colorbar(points, ax=ax, label="SNR (dB)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cell_app.command("show")
def show(
    scenario: Annotated[str, typer.Argument(help="Scenario preset name or a .toml file.")],
    seed: SeedOpt = None,
    json_out: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Save a plot of the cell to this PNG.")] = None,
    overrides: SetOpt = None,
) -> None:
    """Each device's distance, path loss, SNR and rate per direction (at B/U), its class, and how
    often its link is in outage over the first minute of the trace."""
    try:
        cfg, seed, state = _snapshot(scenario, seed, overrides)
        rows = device_rows(cfg, state, outage_share(cfg, seed))
        if plot is not None:
            plot_cell(cfg, state, plot)
    except WdmoeError as e:
        raise fail(e) from e
    if json_out:
        out = {"scenario": cfg.name, "seed": seed, "share_hz": state.bandwidth_hz / state.num_devices}
        typer.echo(json.dumps(_jsonable({**out, "devices": rows, "config": cfg.to_dict()})))
    else:
        table_console().print(_show_table(cfg, seed, rows, state.bandwidth_hz / state.num_devices))


def parse_tokens(values: list[str], num_devices: int) -> np.ndarray:
    """``--tokens`` values (each may be comma-separated) → [U]; one value applies to every device."""
    try:
        tokens = [int(v) for item in values for v in item.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"--tokens = {values!r} is not a list of integers; allowed: integers ≥ 0") from e
    if len(tokens) not in (1, num_devices) or min(tokens) < 0:
        raise ConfigError(
            f"--tokens = {tokens} is out of range; allowed: 1 or {num_devices} (one per device) integers ≥ 0"
        )
    return np.broadcast_to(np.array(tokens), (num_devices,)).copy()


def allocations(cfg: ScenarioConfig, state: ChannelState, tokens: np.ndarray) -> dict[str, dict[str, Any]]:
    """Every registered allocator's bandwidth and device latency for one layer with ``tokens``."""
    flops = effective_flops_per_s(devices_for(cfg.cell.device_classes, cfg.cell.num_devices))
    demand = layer_demand(tokens, flops, ExpertCost.from_config(cfg))
    out = {}
    for name in ALLOCATORS.names():
        alloc = make_allocator(name).allocate(demand, state)
        times_s = device_time_s(demand, state, alloc.bandwidth_hz)
        out[name] = {
            "bandwidth_hz": alloc.bandwidth_hz,
            "device_s": times_s,
            "layer_s": float(waiting_s(times_s, tokens)),
        }
    return out


def _allocate_table(
    cfg: ScenarioConfig, seed: int, tokens: np.ndarray, result: dict[str, dict[str, Any]]
) -> Table:
    band_mhz = cfg.cell.bandwidth_hz / 1e6
    table = Table(title=f"{cfg.name} · seed {seed} · {cfg.model.name} · one layer · B = {band_mhz:g} MHz")
    table.add_column("dev", justify="right")
    table.add_column("tokens", justify="right")
    for name in result:
        table.add_column(f"{name} MHz / ms", justify="right")
    for u, n in enumerate(tokens):
        cells = [f"{r['bandwidth_hz'][u] / 1e6:.2f} / {r['device_s'][u] * 1e3:.2f}" for r in result.values()]
        table.add_row(str(u), str(int(n)), *cells)
    table.add_row("layer", "", *[f"{r['layer_s'] * 1e3:.2f} ms" for r in result.values()], style="bold")
    return table


@cell_app.command("allocate")
def allocate(
    scenario: Annotated[str, typer.Argument(help="Scenario preset name or a .toml file.")],
    tokens: Annotated[
        list[str], typer.Option("--tokens", help="Tokens per device: N (all) or N,N,… / repeated.")
    ],
    seed: SeedOpt = None,
    json_out: JsonOpt = False,
    overrides: SetOpt = None,
) -> None:
    """Each allocator's per-device bandwidth and latency for one layer with the given token load."""
    try:
        cfg, seed, state = _snapshot(scenario, seed, overrides)
        load = parse_tokens(tokens, state.num_devices)
        result = allocations(cfg, state, load)
    except WdmoeError as e:
        raise fail(e) from e
    if json_out:
        out = {
            "scenario": cfg.name,
            "seed": seed,
            "tokens": load,
            "allocators": result,
            "config": cfg.to_dict(),
        }
        typer.echo(json.dumps(_jsonable(out)))
    else:
        table_console().print(_allocate_table(cfg, seed, load, result))
