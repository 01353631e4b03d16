"""``wdmoe plan``: place experts on devices by their average channel, usage and memory, print the
placement against round-robin and write the placement file (thin; the maths is wdmoe.planning)."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.table import Table

from wdmoe.cli.common import err, fail, quiet_transformers, table_console
from wdmoe.errors import WdmoeError

if TYPE_CHECKING:
    from wdmoe.config import ScenarioConfig
    from wdmoe.planning.optimise import Placement, PlanProblem


def placement_table(problem: "PlanProblem", placement: "Placement", rr_s: float) -> Table:
    """Per device: its class, average SNR at the equal split, one token's time, shards and the
    usage mass it serves (planned vs round-robin); the caption holds J for both."""
    from wdmoe.channel.units import linear_to_db
    from wdmoe.planning.optimise import counts_of, round_robin_placement

    view, u = problem.view, problem.num_devices
    layers, experts = problem.shape
    rr = round_robin_placement(layers, experts, u)
    p = placement.primary
    band = view.bandwidth_hz
    snr_dl, snr_ul = linear_to_db(view.channel.dl.snr(band)), linear_to_db(view.channel.ul.snr(band))
    per_token_ms = 1e3 * view.device_time_s(np.ones(u))
    hosted = [len(s) for s in placement.shards(u)]
    table = Table(
        title=f"placement: expected layer latency {1e3 * placement.expected_layer_s:.3f} ms "
        f"(round-robin {1e3 * rr_s:.3f} ms, ×{rr_s / placement.expected_layer_s:.2f})"
    )
    for col in ("device", "SNR DL/UL dB", "t(1 token) ms", "cap", "shards", "rr shards", "usage", "rr usage"):
        table.add_column(col, justify="right")
    counts, rr_counts = counts_of(p, u), counts_of(rr, u)
    mass = np.bincount(p.ravel(), weights=problem.usage.ravel(), minlength=u) / layers
    rr_mass = np.bincount(rr.ravel(), weights=problem.usage.ravel(), minlength=u) / layers
    for d in range(u):
        table.add_row(
            str(d),
            f"{snr_dl[d]:.1f}/{snr_ul[d]:.1f}",
            f"{per_token_ms[d]:.3f}",
            str(int(problem.capacity[d])),
            f"{counts[d]}" + (f" (+{hosted[d] - counts[d]})" if hosted[d] > counts[d] else ""),
            str(int(rr_counts[d])),
            f"{mass[d]:.2f}",
            f"{rr_mass[d]:.2f}",
        )
    table.caption = "usage: tokens routed per token and layer to the device's primaries (Σ = k)"
    return table


def resolve(scenario: str, overrides: list[str], model: str) -> tuple["ScenarioConfig", Any, Any]:
    """The scenario (the default model's dimensions first, as eval does) and the model installed."""
    from wdmoe.config import load_scenario
    from wdmoe.models.install import install
    from wdmoe.models.loading import load_checkpoint
    from wdmoe.simulate import check_model_matches
    from wdmoe.studies.runner import scenario_overrides

    cfg = load_scenario(scenario, scenario_overrides(model, overrides))
    net, tok = load_checkpoint(model)
    wm = install(net)
    check_model_matches(wm, cfg)
    return cfg, wm, tok


def save(
    out: Path,
    placement: "Placement",
    layers: list[int],
    problem: "PlanProblem",
    rr_s: float,
    config: dict[str, Any],
) -> None:
    """Write the placement file with J of the plan and of round-robin, the usage and the config."""
    from wdmoe.planning.files import placement_dict, write_placement

    data = placement_dict(
        placement,
        layers,
        problem.num_devices,
        expected_layer_s=placement.expected_layer_s,
        round_robin_layer_s=rr_s,
        usage=np.round(problem.usage, 6).tolist(),
        config=config,
    )
    write_placement(out, data)
    err.print(f"[dim]placement: {out}[/]")


def plan_cmd(
    scenario: Annotated[str, typer.Option(help="Scenario preset or .toml file.")] = "paper",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a scenario field: a.b=value.")
    ] = None,
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    seed: Annotated[int, typer.Option(help="Channel trace seed (the simulator's --seed).")] = 0,
    tokens: Annotated[float, typer.Option(help="Tokens per forward T the layer is planned for.")] = 64.0,
    max_experts: Annotated[
        int | None, typer.Option(help="Shards each device holds (default: its class's memory / shard bytes).")
    ] = None,
    replicas: Annotated[int, typer.Option(help="Devices holding each shard.")] = 1,
    allocator: Annotated[str, typer.Option(help="Band split the plan assumes: equal, minmax, …")] = "equal",
    calib_chunks: Annotated[int, typer.Option(help="Calibration text pieces for the router usage.")] = 16,
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per calibration piece.")] = 128,
    blocks: Annotated[int, typer.Option(help="Fading blocks averaged for each device's channel.")] = 2000,
    samples: Annotated[
        int, typer.Option(help="Price J on this many of those fading blocks (0: on their average channel).")
    ] = 0,
    out: Annotated[Path, typer.Option(help="Placement file to write (JSON).")] = Path(
        "results/placement.json"
    ),
) -> None:
    """Place experts by channel: router usage on calibration text, device memory and compute, the
    average channel → per-device shard lists minimising the expected layer latency."""
    from wdmoe.planning.inputs import calibration_usage, memory_capacity, plan_problem
    from wdmoe.planning.optimise import expected_layer_s, plan, round_robin_placement

    quiet_transformers()
    try:
        cfg, wm, tok = resolve(scenario, list(set_ or ()), model)
        usage = calibration_usage(wm, tok, calib_chunks, chunk_tokens)
        u = cfg.cell.num_devices
        capacity = memory_capacity(cfg) if max_experts is None else np.full(u, max_experts, dtype=np.int64)
        problem = plan_problem(
            cfg,
            usage,
            capacity,
            seed=seed,
            blocks=blocks,
            samples=samples,
            tokens=tokens,
            allocator=allocator,
        )
        placement = plan(problem, replicas)
        rr_s = expected_layer_s(problem, round_robin_placement(*problem.shape, u))
    except WdmoeError as e:
        raise fail(e) from e
    table_console().print(placement_table(problem, placement, rr_s))
    config = {
        "scenario": {"name": scenario, "resolved": cfg.to_dict()},
        "model": model,
        "seed": seed,
        "tokens": tokens,
        "allocator": allocator,
        "replicas": replicas,
        "capacity": problem.capacity.tolist(),
        "calibration": {"chunks": calib_chunks, "chunk_tokens": chunk_tokens},
        "channel": {"blocks": blocks, "samples": samples},
    }
    save(out, placement, sorted(wm.blocks), problem, rr_s, config)
