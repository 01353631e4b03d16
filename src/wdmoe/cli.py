"""The ``wdmoe`` command line: thin subcommands over the library."""

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from wdmoe.cli_cell import cell_app
from wdmoe.cli_cluster import cluster_cmd, device_cmd, serve_bs_cmd, stats_cmd
from wdmoe.cli_report import report_cmd, reproduce_cmd
from wdmoe.cli_sweep import sweep_cmd
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.policies import POLICIES

app = typer.Typer(help="WDMoE: wireless distributed Mixture-of-Experts LLMs.", no_args_is_help=True)
model_app = typer.Typer(help="Build, inspect and split models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(cell_app, name="cell")
app.command("report")(report_cmd)
app.command("reproduce")(reproduce_cmd)
app.command("sweep")(sweep_cmd)
app.command("cluster")(cluster_cmd)
app.command("serve-bs")(serve_bs_cmd)
app.command("stats")(stats_cmd)
app.command(
    "device",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)(device_cmd)
err = Console(stderr=True, soft_wrap=True)


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def quiet_transformers() -> None:
    """wdmoe shows its own progress; silence transformers' per-tensor bars and warnings."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's bar is a plain tqdm
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def fail(error: Exception) -> typer.Exit:
    """Print ``error: …`` on one line (the message is text, not rich markup) and exit with 2."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(' '.join(str(error).split()))}")
    return typer.Exit(code=2)


class BuildProgress:
    """Shows the default model's build stages as rich progress bars (on stderr)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "BuildProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


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


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user's prompt ('-' reads standard input).")],
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    policy: Annotated[
        str, typer.Option(help=f"Expert selection policy: {', '.join(POLICIES.names())}.")
    ] = "topk",
    top_k: Annotated[int | None, typer.Option("--top-k", help="Router candidates per token.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    chat: Annotated[bool, typer.Option(help="Use the model's chat template.")] = True,
    system: Annotated[str | None, typer.Option(help="System message for chat models.")] = None,
    bs: Annotated[
        str | None, typer.Option(help="HOST:PORT of a running `wdmoe serve-bs`: generate there instead.")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="The BS's token with --bs (default: $WDMOE_TOKEN).")
    ] = None,
    timeout_s: Annotated[
        float | None, typer.Option(help="With --bs: give up on the whole request after this long.")
    ] = None,
    idle_timeout_s: Annotated[
        float, typer.Option(help="With --bs: give up when the BS says nothing for this long (0: never).")
    ] = 60.0,
    tls_cert: Annotated[str | None, typer.Option(help="With --bs: PEM client certificate (mTLS).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="With --bs: PEM key of the client certificate.")] = None,
    tls_ca: Annotated[str | None, typer.Option(help="With --bs: PEM CA that signed the BS (TLS).")] = None,
) -> None:
    """Generate text with wdmoe installed, streaming tokens to the terminal (here, or at a BS)."""
    from wdmoe.generate import generate as run_generate
    from wdmoe.models.install import install
    from wdmoe.models.loading import load_checkpoint
    from wdmoe.policies import make_policy

    quiet_transformers()
    if prompt == "-":
        prompt = sys.stdin.read()
    if bs is not None:
        req = (prompt, max_new_tokens, temperature, top_p, seed, chat, system)
        link = BSLink(bs, token, timeout_s, idle_timeout_s, (tls_cert, tls_key, tls_ca))
        return generate_at_bs(link, *req)
    try:
        chosen = make_policy(policy)
        if max_new_tokens < 1:
            raise fail(ValueError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}"))
        if temperature < 0 or not 0 < top_p <= 1:
            raise fail(
                ValueError(f"--temperature must be ≥ 0 and --top-p in (0, 1], got {temperature}, {top_p}")
            )
        with BuildProgress() as progress:
            net, tok = load_checkpoint(model, progress=progress)
        wm = install(net, chosen)
        if top_k is not None:
            wm.set_top_k(top_k)
        err.print(
            f"[dim]{model} · {wm.adapter.name} · {len(wm.blocks)} MoE layers · "
            f"{wm.num_experts} experts · top-{wm.top_k} · policy {policy}[/]"
        )
        result = run_generate(
            wm,
            tok,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            chat=chat,
            system=system,
            on_text=stream_to_stdout,
        )
    except WdmoeError as e:
        raise fail(e) from e
    sys.stdout.write("\n")
    err.print(
        f"[dim]prompt {result.prompt_tokens} tok · prefill {result.prefill_s:.2f} s · "
        f"{result.new_tokens} new tok at {result.decode_tokens_per_s:.1f} tok/s · "
        f"{result.experts_per_token:.2f} experts/token/layer[/]"
    )


@dataclass(frozen=True)
class BSLink:
    """How `generate --bs` reaches the BS: address, token, deadlines, TLS files (cert, key, ca)."""

    address: str
    token: str | None
    timeout_s: float | None
    idle_s: float
    tls: tuple[str | None, str | None, str | None]

    def check(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(f"--timeout-s must be > 0, got {self.timeout_s}")
        if not self.idle_s >= 0:
            raise ConfigError(f"--idle-timeout-s must be ≥ 0 (0: never), got {self.idle_s}")


def generate_at_bs(
    link: BSLink,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    chat: bool,
    system: str | None,
) -> None:
    """`wdmoe generate --bs`: the BS's generate API, the answer streamed as it comes."""
    from wdmoe.cli_cluster import answer_was_served, resolve_token
    from wdmoe.runtime import api
    from wdmoe.runtime.client import BSClient
    from wdmoe.runtime.security import TLSFiles

    def queued(position: int) -> None:
        err.print(f"[dim]queued at the BS: {position} ahead of this request…[/]")

    try:
        link.check()
        req = api.GenerateRequest(prompt, max_new_tokens, temperature, top_p, seed, chat, system)
        api.parse_generate(api.encode_generate(req))  # the BS's own checks, before connecting
        tls = TLSFiles.from_options(*link.tls)
        with BSClient(link.address, resolve_token(link.token), tls) as client:
            m = client.generate(req, stream_to_stdout, link.timeout_s, link.idle_s or None, queued)
    except WdmoeError as e:
        raise fail(e) from e
    sys.stdout.write("\n")
    err.print(
        f"[dim]BS {link.address} · prompt {m['prompt_tokens']} tok · "
        f"TTFT {1e3 * (m['ttft_s'] or 0):.0f} ms · "
        f"{m['new_tokens']} new tok · {m['expert_calls']} expert calls, {m['dropped']} dropped, "
        f"{m['fallbacks']} at the BS[/]"
    )
    if not answer_was_served(m):
        raise typer.Exit(code=1)


@app.command()
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
) -> None:
    """The main job: vanilla top-k vs WDMoE-θ on the default model, the same channel trace, side by side."""
    from wdmoe.config import load_scenario
    from wdmoe.demo import PROMPTS, run_policy
    from wdmoe.models.install import install
    from wdmoe.models.loading import load_checkpoint
    from wdmoe.policies import make_policy
    from wdmoe.simulate import SimSettings

    quiet_transformers()
    try:
        cfg = load_scenario(scenario, ["model=smollm2-moe8", *(set_ or [])])
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
                )
            )
    except WdmoeError as e:
        raise fail(e) from e
    print_demo_summary(summaries, cfg, seed)


def print_demo_summary(summaries: list, cfg: Any, seed: int) -> None:
    """Latency of each policy, the speed-up, and which devices were dropped and why."""
    from rich.table import Table

    from wdmoe.channel import generate_trace
    from wdmoe.devices import devices_for

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
    out = Console()
    out.print(table)
    state = generate_trace(cfg, 1, seed).state(0)
    classes = devices_for(cfg.cell.device_classes, cfg.cell.num_devices)
    drops = Table(title="dropped expert-token pairs per device, and the device's channel at t = 0")
    for col in ("device", "class", "d (m)", "rate DL/UL (Mb/s at B/U)", *(s.policy for s in summaries)):
        drops.add_column(col, justify="right")
    share = state.equal_share_hz()
    for u in range(cfg.cell.num_devices):
        rate = f"{state.dl.rate_bps(share)[u] / 1e6:.1f} / {state.ul.rate_bps(share)[u] / 1e6:.1f}"
        drops.add_row(
            str(u),
            classes[u].name,
            f"{state.distance_m[u]:.0f}",
            rate,
            *(f"{s.drops_per_device[u]:.0f}" for s in summaries),
        )
    out.print(drops)


def parse_tasks(text: str) -> list[str]:
    """``arc_easy,piqa`` → registered task names (an unknown one raises UnknownNameError)."""
    from wdmoe.eval.tasks import get_task

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise fail(ValueError("--tasks is empty; give e.g. --tasks arc_easy,piqa"))
    return [get_task(name).name for name in names]


@app.command("eval")
def eval_cmd(
    tasks: Annotated[str, typer.Option(help="Comma-separated registered tasks, e.g. arc_easy,piqa.")],
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of the benchmark JSONL files (default: $WDMOE_DATA).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Items per task (default: all).")] = None,
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    policy: Annotated[
        str, typer.Option(help=f"Expert selection policy: {', '.join(POLICIES.names())}.")
    ] = "topk",
    theta: Annotated[float | None, typer.Option(help="θ of wdmoe-type policies.")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(help="Another policy parameter NAME=VALUE, e.g. k_scaled=true, tau_s=0.05, p=0.9."),
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Router candidates per token.")] = None,
    scenario: Annotated[str, typer.Option(help="Scenario preset or .toml file.")] = "paper",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a scenario field: a.b=value.")
    ] = None,
    allocator: Annotated[
        str, typer.Option(help="Bandwidth allocator: equal, minmax, proportional.")
    ] = "equal",
    seed: Annotated[int, typer.Option(help="Channel trace seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Results file (JSON Lines, resumable).")] = Path(
        "results/eval.jsonl"
    ),
    csi_delay_blocks: Annotated[
        int, typer.Option(help="Stale CSI: the BS sees the channel this many fading blocks late.")
    ] = 0,
    csi_error_db: Annotated[
        float, typer.Option(help="Noisy CSI: log-normal estimation error σ in dB.")
    ] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward (scoring only).")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Generation cap for GSM8K-type tasks.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON lines.")] = False,
) -> None:
    """Evaluate tasks with a policy inside the simulation; one resumable record per (config, task).

    Latency is per request: each scored sequence (context + choice) is one prefill; GSM8K runs
    one question at a time (prefill + decode)."""
    from wdmoe.eval.results import select_records
    from wdmoe.eval.runner import EvalPoint, Evaluator, parse_params

    quiet_transformers()
    try:
        params = parse_params(param or [])
    except WdmoeError as e:
        raise fail(e) from e
    point = EvalPoint(
        model=model,
        policy=policy,
        params=params if theta is None else {"theta": theta, **params},
        top_k=top_k,
        scenario=scenario,
        overrides=tuple(set_ or ()),
        allocator=allocator,
        seed=seed,
        limit=limit,
        data_dir=data_dir,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        csi_delay_blocks=csi_delay_blocks,
        csi_error_std_db=csi_error_db,
    )
    try:
        names = parse_tasks(tasks)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        ) as bar:
            job = bar.add_task(f"eval {names[0]}", total=len(names))

            def done(name: str, skipped: bool) -> None:
                if skipped:
                    err.print(f"[dim]{name}: already in {out}, skipped[/]")
                bar.advance(job)
                following = names[names.index(name) + 1 :]
                if following:
                    bar.update(job, description=f"eval {following[0]}")

            records = Evaluator().run(point, names, out, on_task=done)
    except WdmoeError as e:
        raise fail(e) from e
    keys = [r["key"] for r in records]
    for r in select_records(out, keys):
        if as_json:
            typer.echo(json.dumps(r, sort_keys=True))
        metrics = " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items())
        err.print(f"{r['task']}: n={r['n']} {metrics} · mean latency {r['latency'].get('mean_s', 0):.4f} s")
    err.print(f"[dim]results: {out}[/]")


def main() -> None:
    app()
