"""The runtime's commands: ``wdmoe serve-bs``, ``wdmoe device``, ``wdmoe cluster`` (thin; the
runtime lives in wdmoe.runtime)."""

import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from wdmoe.cli.common import (
    GraceMsOpt,
    MaxWaitOpt,
    ModeOpt,
    SlackOpt,
    answer_was_served,
    err,
    fail,
    parse_params,
    quiet_transformers,
    resolve_token,
    stream_to_stdout,
    table_console,
)
from wdmoe.cli.dashboard import DashboardOpt
from wdmoe.errors import ConfigError, WdmoeError

TokenOpt = Annotated[
    str | None, typer.Option(help="Shared token devices and users must send (default: $WDMOE_TOKEN).")
]
TlsCert = Annotated[str | None, typer.Option(help="PEM certificate (enables TLS).")]
TlsKey = Annotated[str | None, typer.Option(help="PEM private key of the certificate.")]
TlsCa = Annotated[str | None, typer.Option(help="PEM CA: require and verify the peers' certificates (mTLS).")]
DataPlaneOpt = Annotated[
    str,
    typer.Option(
        help="How expert calls travel: stream (one persistent connection per device) or grpc "
        "(a RunExpert call each)."
    ),
]

SoftwareOpt = Annotated[
    str,
    typer.Option(
        help="measured: the prediction the BS records adds the software's own cost (each device's "
        "per-message overhead from pings and answers, the BS's own compute per forward); none: the "
        "latency model alone."
    ),
]


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {port}")


def settings_from(policy: str, param: list[str], **fields: Any) -> Any:
    """RuntimeSettings from CLI values: the policy and its NAME=VALUE parameters are checked
    before anything loads; ``fields`` are RuntimeSettings fields (the rest keep their defaults)."""
    from wdmoe.policies import make_policy
    from wdmoe.runtime.bs import RuntimeSettings

    params = parse_params(param)
    make_policy(policy, **params)  # an unknown policy or parameter fails here, before loading
    return RuntimeSettings(policy=policy, params=params, **fields)


def serve_bs_cmd(
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    host: Annotated[str, typer.Option(help="Address to listen on (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 50050,
    token: TokenOpt = None,
    scenario: Annotated[str, typer.Option(help="Cell preset (configs/scenarios).")] = "lab",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Scenario override, e.g. cell.bandwidth_hz=1e7.")
    ] = None,
    policy: Annotated[str, typer.Option(help="Expert selection policy.")] = "topk",
    param: Annotated[list[str] | None, typer.Option(help="Policy parameter NAME=VALUE (repeatable).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Router candidates per token.")] = None,
    allocator: Annotated[str, typer.Option(help="Bandwidth allocator per layer.")] = "equal",
    energy_slack: Annotated[
        float, typer.Option(help="--allocator energy: least energy within (1 + s) × min-max's wait.")
    ] = 0.1,
    mode: ModeOpt = "drop",
    slack: SlackOpt = 3.0,
    grace_ms: GraceMsOpt = 250.0,
    max_wait_s: MaxWaitOpt = 30.0,
    emulate_links: Annotated[bool, typer.Option(help="Wait out the channel's DL/UL delays.")] = False,
    time_scale: Annotated[float, typer.Option(help="Wall seconds per simulated second.")] = 1.0,
    wire_dtype: Annotated[
        str,
        typer.Option(
            help="How hidden states travel: float32 (exact), bfloat16, float16, int8, fp8 "
            "(row-scaled), adaptive (per device and layer by SNR)."
        ),
    ] = "float32",
    heartbeat_s: Annotated[float, typer.Option(help="Device heartbeat period; 3 missed = gone.")] = 1.0,
    bench_after: Annotated[
        int, typer.Option(help="Failed calls in a row that bench a device (its experts go elsewhere).")
    ] = 3,
    bench_s: Annotated[
        float, typer.Option(help="First bench time (s); doubles while its probes fail, up to 60 s.")
    ] = 5.0,
    max_active: Annotated[int, typer.Option(help="Generate requests served at once.")] = 16,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for a turn; more get RESOURCE_EXHAUSTED.")
    ] = 256,
    seed: Annotated[int | None, typer.Option(help="Channel trace seed (default: the scenario's).")] = None,
    data_plane: DataPlaneOpt = "stream",
    software_overhead: SoftwareOpt = "none",
    metrics_log: Annotated[
        Path | None, typer.Option(help="Append JSON lines: devices up/down, requests, summary.")
    ] = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    dashboard: DashboardOpt = None,
) -> None:
    """Run the BS: the model's BS part, the cell, and a generate API for users; devices register here."""
    from wdmoe.dashboard.http import parse_address
    from wdmoe.runtime.bs import build_bs
    from wdmoe.runtime.security import TLSFiles
    from wdmoe.runtime.server import freeze_heap
    from wdmoe.runtime.service import serve_bs

    quiet_transformers()
    try:
        check_port(port)
        page = parse_address(dashboard) if dashboard else None
        secret = resolve_token(token)
        tls = TLSFiles.from_options(tls_cert, tls_key, tls_ca)
        settings = settings_from(
            policy,
            param or [],
            allocator=allocator,
            energy_slack=energy_slack,
            mode=mode,
            slack=slack,
            grace_s=grace_ms / 1e3,
            max_wait_s=max_wait_s,
            emulate_links=emulate_links,
            time_scale=time_scale,
            wire_dtype=wire_dtype,
            heartbeat_s=heartbeat_s,
            bench_after=bench_after,
            bench_s=bench_s,
            max_active=max_active,
            max_queue=max_queue,
            seed=seed,
            data_plane=data_plane,
            software_overhead=software_overhead,
        )
        bs = build_bs(
            model, scenario, set_ or [], settings, token=secret, top_k=top_k, tls=tls, metrics_log=metrics_log
        )
        server = serve_bs(bs, secret, host, port, dashboard=page)
    except (WdmoeError, OSError) as e:
        raise fail(e) from e
    freeze_heap()
    stop_on_signals()
    err.print(
        f"BS listening on {server.address} · {model} · {len(bs.wm.blocks)} MoE layers × {bs.wm.num_experts} "
        f"experts · cell {scenario} with {bs.num_slots} device slots · policy {policy} · mode {mode}"
        + (" · links emulated" if emulate_links else "")
        + f" · data plane {data_plane}"
    )
    if server.dashboard is not None:
        err.print(f"dashboard and /metrics at {server.dashboard.url} (controls take the BS's token)")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        summary = bs.summary()
        server.stop()
        print_summary(summary)


def stop_on_signals() -> None:
    """SIGTERM and SIGINT (even where a background launch ignores it) end the server cleanly."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def device_cmd(ctx: typer.Context) -> None:
    """Run a device worker (flags: --bs HOST:PORT --slot U --shards F… [--port --data-port --host
    --advertise --token --tls-cert --tls-key --tls-ca --inject-delay-ms]; `wdmoe device --help`)."""
    from wdmoe.runtime.device import main

    main(ctx.args, prog="wdmoe device")


def stats_cmd(
    bs: Annotated[str, typer.Option(help="HOST:PORT of a running `wdmoe serve-bs`.")] = "127.0.0.1:50050",
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the BS's JSON instead of a table.")] = False,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Ask a running BS for its per-device and overall figures (the Stats RPC)."""
    import json

    from wdmoe.runtime.client import BSClient
    from wdmoe.runtime.security import TLSFiles

    try:
        with BSClient(bs, resolve_token(token), TLSFiles.from_options(tls_cert, tls_key, tls_ca)) as client:
            summary = client.stats()
    except WdmoeError as e:
        raise fail(e) from e
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print_summary(summary)


def print_summary(summary: dict[str, Any]) -> None:
    """The per-device table of a BS summary (on stderr, so stdout keeps only answers)."""
    table = Table(title=f"BS summary · {summary['requests']} requests")
    cols = ("slot", "address", "state", "calls", "failures", "skipped", "fallbacks", "KB down", "KB up")
    for col in (*cols, "compute ms"):
        table.add_column(col, justify="left" if col in ("address", "state", "failures") else "right")
    for d in summary["devices"]:
        fails = ", ".join(f"{k} {v}" for k, v in d["failures"].items()) or "0"
        table.add_row(
            str(d["slot"]),
            d["address"],
            d.get("state", "up" if d["usable"] else "down"),
            str(d["calls"]),
            fails,
            str(d.get("skipped", 0)),
            str(d["fallbacks"]),
            f"{d['bytes_dl'] / 1e3:.1f}",
            f"{d['bytes_ul'] / 1e3:.1f}",
            f"{d['mean_compute_ms']:.3f}",
        )
    table_console(stderr=True).print(table)
    t = summary["totals"]
    err.print(
        f"expert calls {t['expert_calls']} · failed {t['failed_calls']} · not sent (device down or "
        f"benched) {t.get('skipped', 0)} · dropped {t.get('dropped', 0)} · per token: measured "
        f"{1e3 * t['mean_token_measured_s']:.1f} ms, latency model {1e3 * t['mean_token_predicted_s']:.1f} ms"
    )


def cluster_cmd(
    devices: Annotated[int, typer.Option(help="Device worker processes (1..experts per layer).")] = 2,
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    prompt: Annotated[str, typer.Option(help="The prompt to answer.")] = "What is a router?",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 32,
    scenario: Annotated[str, typer.Option(help="Cell preset (configs/scenarios).")] = "lab",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Scenario override (repeatable).")] = None,
    policy: Annotated[str, typer.Option(help="Expert selection policy.")] = "topk",
    param: Annotated[list[str] | None, typer.Option(help="Policy parameter NAME=VALUE (repeatable).")] = None,
    allocator: Annotated[str, typer.Option(help="Bandwidth allocator per layer.")] = "equal",
    energy_slack: Annotated[
        float, typer.Option(help="--allocator energy: least energy within (1 + s) × min-max's wait.")
    ] = 0.1,
    mode: Annotated[str, typer.Option(help="wait, drop or fallback.")] = "drop",
    replicas: Annotated[int, typer.Option(help="Devices holding each expert.")] = 1,
    placement: Annotated[
        Path | None, typer.Option(help="Placement file of `wdmoe plan`: each device gets its listed shards.")
    ] = None,
    emulate_links: Annotated[bool, typer.Option(help="Wait out the channel's DL/UL delays.")] = False,
    time_scale: Annotated[float, typer.Option(help="Wall seconds per simulated second.")] = 1.0,
    data_plane: DataPlaneOpt = "stream",
    software_overhead: SoftwareOpt = "none",
    metrics_log: Annotated[Path | None, typer.Option(help="The BS's JSON-lines metrics log.")] = None,
    dashboard: DashboardOpt = None,
) -> None:
    """Start a BS and N device workers on this machine, answer the prompt through them, summarise,
    stop (with --dashboard: stay up, serving the page, until Ctrl-C)."""
    from wdmoe.runtime import api
    from wdmoe.runtime.cluster import Cluster

    quiet_transformers()
    if max_new_tokens < 1:
        raise fail(ValueError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}"))
    try:
        fields = {
            "allocator": allocator,
            "energy_slack": energy_slack,
            "mode": mode,
            "emulate_links": emulate_links,
            "time_scale": time_scale,
            "software_overhead": software_overhead,
        }
        settings = settings_from(policy, param or [], data_plane=data_plane, **fields)
        with Cluster(
            model,
            devices,
            settings=settings,
            scenario=scenario,
            overrides=set_ or [],
            replicas=replicas,
            placement=placement,
            bs_in_process=False,
            metrics_log=metrics_log,
            dashboard=dashboard,
        ) as cluster:
            ready = ", ".join(d.address for d in cluster.devices)
            err.print(f"[dim]BS {cluster.bs_address} · {devices} device workers registered: {ready}[/]")
            if dashboard:
                err.print(f"dashboard at http://{dashboard}/ · its controls' token: {cluster.token}")
            metrics = cluster.client.generate(
                api.GenerateRequest(prompt, max_new_tokens=max_new_tokens), stream_to_stdout
            )
            sys.stdout.write("\n")
            summary = cluster.stats()
            if dashboard:
                stay_up(cluster)
    except WdmoeError as e:
        raise fail(e) from e
    err.print(
        f"[dim]{metrics['new_tokens']} tokens · TTFT {1e3 * (metrics['ttft_s'] or 0):.0f} ms · "
        f"{metrics['expert_calls']} expert calls, {metrics['dropped']} dropped · "
        f"{(metrics['bytes_dl'] + metrics['bytes_ul']) / 1e3:.1f} KB on the wire[/]"
    )
    print_summary(summary)
    if not answer_was_served(metrics):
        raise typer.Exit(code=1)


def stay_up(cluster: Any) -> None:
    """Keep a cluster (and its dashboard) up until Ctrl-C; further users may send requests."""
    err.print("[dim]the cluster stays up for its dashboard; Ctrl-C ends it[/]")
    stop_on_signals()
    try:
        while cluster.bs_process is None or cluster.bs_process.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
