"""``wdmoe load``: latency under load. Requests arrive at rates λ (Poisson) or at the times of a
replayed trace; each is timed to its first token and its end. Two faces: a running BS (``--bs``,
the load generator of wdmoe.runtime.loadgen) or the simulator (``--simulate``,
wdmoe.serving.simulate_load). One record per request in a resumable JSON Lines file; a table of
TTFT / TPOT percentiles, throughput and drop rate per λ (thin; the figures are wdmoe.serving.load)."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from wdmoe.cli.common import (
    GraceMsOpt,
    MaxWaitOpt,
    ModeOpt,
    SlackOpt,
    err,
    fail,
    parse_params,
    progress_bar,
    quiet_transformers,
    resolve_token,
    table_console,
)
from wdmoe.errors import ConfigError, WdmoeError

if TYPE_CHECKING:
    from wdmoe.serving.load import LoadRecord

DEFAULT_RATES = (0.5, 1.0, 2.0, 4.0)
Run = tuple[float | None, np.ndarray]  # (λ in requests/s or None for a trace, arrival times [n] s)
Sink = Callable[["LoadRecord"], None]


def parse_rates(text: str) -> tuple[float, ...]:
    """``"0.5,1,2"`` → (0.5, 1.0, 2.0); a word or an empty list is a ConfigError naming --rates."""
    try:
        rates = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"--rates = {text!r} is not a comma-separated list of numbers (requests/s)"
        ) from None
    if not rates:
        raise ConfigError("--rates is empty; give e.g. --rates 0.5,1,2,4")
    return rates


def read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of ``path`` (stripped); a missing or empty file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{what} file {path} holds no line")
    return lines


def plan_runs(rates: str | None, trace: Path | None, requests: int, seed: int) -> list[Run]:
    """One run per λ of ``rates`` (``requests`` Poisson arrivals from ``seed``), or the trace's."""
    from wdmoe.serving.load import poisson_arrivals, trace_arrivals

    if trace is not None:
        if rates is not None:
            raise ConfigError("give --rates or --trace, not both")
        return [(None, trace_arrivals(read_lines(trace, "--trace")))]
    chosen = DEFAULT_RATES if rates is None else parse_rates(rates)
    return [(rate, poisson_arrivals(rate, requests, seed)) for rate in chosen]


def fmt_ms(seconds: float) -> str:
    return "–" if not np.isfinite(seconds) else f"{1e3 * seconds:.1f}"


def print_summary(records: Sequence["LoadRecord"]) -> None:
    """The summary table (stdout): per face and λ, requests, outcomes, TTFT / TPOT (ms), throughput."""
    from wdmoe.serving.load import summarize_runs

    table = Table(title="latency under load (TTFT, TPOT in ms; throughput over first arrival → last finish)")
    cols = ("face", "λ /s", "n", "ok", "refused", "failed", "TTFT p50", "p95", "p99")
    for col in (*cols, "TPOT p50", "p95 ", "p99 ", "tokens/s", "req/s", "dropped/req"):
        table.add_column(col, justify="left" if col == "face" else "right")
    for s in summarize_runs(records):
        rate = "trace" if s["rate_per_s"] is None else f"{s['rate_per_s']:g}"
        counts = [str(s[k]) for k in ("n", "completed", "refused", "failed")]
        ttft = [fmt_ms(s[f"ttft_p{p}"]) for p in (50, 95, 99)]
        tpot = [fmt_ms(s[f"tpot_p{p}"]) for p in (50, 95, 99)]
        rates = [f"{s[k]:.2f}" if np.isfinite(s[k]) else "–" for k in ("tokens_per_s", "requests_per_s")]
        drops = s["dropped_experts_mean"]
        table.add_row(
            s["face"], rate, *counts, *ttft, *tpot, *rates, "–" if np.isnan(drops) else f"{drops:.2f}"
        )
    table_console().print(table)


def run_runtime(
    runs: Sequence[Run], prompts: Sequence[str], out: Path, target: Any, sink: Sink, setting: str
) -> None:
    """Each run against the BS of ``target`` (a LoadTarget), the requests of this ``setting``
    (:func:`~wdmoe.serving.load.config_key`) already in ``out`` skipped."""
    from wdmoe.runtime.client import BSClient, BSError
    from wdmoe.runtime.loadgen import run_load
    from wdmoe.studies.load_io import done_keys

    with BSClient(target.address, target.token, target.tls) as client:
        if not client.healthy(timeout_s=5.0):
            raise BSError(f"no BS answers at {target.address} (is `wdmoe serve-bs` running there?)")
    done = done_keys(out)
    for rate, arrivals in runs:
        skip = {i for i in range(len(arrivals)) if ("runtime", setting, rate, i) in done}
        run_load(target, arrivals, prompts, rate, skip=skip, on_record=sink)


@dataclass(frozen=True)
class SimFace:
    """What the simulator face runs: the model, its policy and top-k, the cell and how the BS
    serves it. ``config``: the same, as the records carry it."""

    model: str
    policy: str
    params: Mapping[str, Any]
    top_k: int | None
    scenario: str
    overrides: tuple[str, ...]
    sim: Any  # wdmoe.simulate.SimSettings
    max_batch: int
    max_queue: int

    def config(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "policy": self.policy,
            "params": dict(self.params),
            "top_k": self.top_k,
            "scenario": self.scenario,
            "overrides": list(self.overrides),
            "allocator": self.sim.allocator,
            "deadline": {"mode": self.sim.deadline.mode, "slack": self.sim.deadline.slack},
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
        }


def run_simulated(
    runs: Sequence[Run],
    prompts: Sequence[str],
    out: Path,
    face: SimFace,
    max_new_tokens: int,
    sink: Sink,
    setting: str,
) -> None:
    """Each run in the simulator; a run whose requests of this ``setting`` are all in ``out`` is
    skipped, one partly there is simulated again (it is deterministic) and only its missing
    records are written."""
    from wdmoe.config import load_scenario
    from wdmoe.models.install import install
    from wdmoe.models.loading import load_checkpoint
    from wdmoe.policies import make_policy
    from wdmoe.serving.sim_load import simulate_load
    from wdmoe.studies.load_io import done_keys
    from wdmoe.studies.runner import scenario_overrides

    done = done_keys(out)
    missing = lambda rate, n: any(("sim", setting, rate, i) not in done for i in range(n))  # noqa: E731
    todo = [(rate, a) for rate, a in runs if missing(rate, len(a))]
    if not todo:
        return
    scenario = load_scenario(face.scenario, scenario_overrides(face.model, face.overrides))
    net, tok = load_checkpoint(face.model)
    wm = install(net, make_policy(face.policy, **face.params))
    if face.top_k is not None:
        wm.set_top_k(face.top_k)

    def fresh(record: "LoadRecord") -> None:
        if ("sim", setting, record.rate_per_s, record.request) not in done:
            sink(record)

    for rate, arrivals in todo:
        simulate_load(
            wm,
            tok,
            scenario,
            face.sim,
            prompts=list(prompts),
            arrivals_s=arrivals,
            max_new_tokens=max_new_tokens,
            max_batch=face.max_batch,
            max_queue=face.max_queue,
            rate_per_s=rate,
            on_record=fresh,
        )


def recording(out: Path, config: Mapping[str, Any], advance: Callable[[], None]) -> Sink:
    """A sink that stamps ``config`` on each record, appends it to ``out`` and advances the bar."""
    from wdmoe.studies.load_io import append_load_record

    def sink(record: "LoadRecord") -> None:
        append_load_record(out, replace(record, config={**record.config, **config}))
        advance()

    return sink


def with_progress(
    out: Path, config: Mapping[str, Any], total: int, label: str, go: Callable[[Sink], None]
) -> list["LoadRecord"]:
    """Run ``go(sink)`` under a progress bar of ``total`` requests; the records it wrote to ``out``."""
    new: list[LoadRecord] = []
    with progress_bar() as bar:
        job = bar.add_task(label, total=total)
        write = recording(out, config, lambda: bar.advance(job))

        def sink(record: "LoadRecord") -> None:
            write(record)
            new.append(record)

        go(sink)
    return new


def tell_outcome(new: Sequence["LoadRecord"], total: int, out: Path) -> None:
    """What the run did not do: requests skipped (already in ``out``) and those that failed."""
    if len(new) < total:
        err.print(f"[dim]{total - len(new)} requests already in {out}, not run again[/]")
    failed = [r for r in new if r.status == "failed"]
    if failed:
        err.print(
            f"[bold yellow]warning:[/] {len(failed)} of {len(new)} requests failed (kept in {out}; "
            f"a rerun does not repeat them), e.g.: {escape(failed[0].error)}"
        )
    err.print(f"[dim]results: {out}[/]")


def sim_face(
    model: str,
    policy: str,
    params: Mapping[str, Any],
    top_k: int | None,
    scenario: str,
    overrides: Sequence[str],
    allocator: str,
    queue: tuple[int, int],
    deadline: tuple[str, float, float, float],
    seed: int,
) -> SimFace:
    """The simulator face from the options (policy checked before any model loads); ``queue``:
    (max_batch, max_queue); ``deadline``: (mode, slack, grace in ms, max wait in s); ``seed``: the
    channel trace's."""
    from wdmoe.latency.deadline import DeadlineRule
    from wdmoe.policies import make_policy
    from wdmoe.simulate import SimSettings

    make_policy(policy, **params)  # an unknown policy or parameter fails here, before loading
    max_batch, max_queue = queue
    if max_batch < 1 or max_queue < 0:
        raise ConfigError(f"--max-batch must be ≥ 1 and --max-queue ≥ 0, got {max_batch}, {max_queue}")
    mode, slack, grace_ms, max_wait_s = deadline
    sim = SimSettings(
        allocator=allocator, seed=seed, deadline=DeadlineRule(mode, slack, grace_ms / 1e3, max_wait_s)
    )
    return SimFace(model, policy, params, top_k, scenario, tuple(overrides), sim, max_batch, max_queue)


def runtime_target(
    address: str,
    token: str | None,
    tls: tuple[str | None, str | None, str | None],
    max_new_tokens: int,
    timeout_s: float,
) -> Any:
    """The LoadTarget of the runtime face (the token: --token or $WDMOE_TOKEN)."""
    from wdmoe.runtime.loadgen import LoadTarget
    from wdmoe.runtime.security import TLSFiles

    if not timeout_s > 0:
        raise ConfigError(f"--timeout-s must be > 0, got {timeout_s}")
    files = TLSFiles.from_options(*tls)
    return LoadTarget(address, resolve_token(token), files, max_new_tokens, timeout_s)


def load_cmd(
    bs: Annotated[str, typer.Option(help="HOST:PORT of a running `wdmoe serve-bs`.")] = "127.0.0.1:50050",
    token: Annotated[str | None, typer.Option(help="The BS's token (default: $WDMOE_TOKEN).")] = None,
    rates: Annotated[
        str | None, typer.Option(help="Arrival rates λ (requests/s), comma-separated (default: 0.5,1,2,4).")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests per rate (Poisson arrivals).")] = 20,
    trace: Annotated[
        Path | None, typer.Option(help="Arrival times (s), one per line, instead of --rates.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts, one per line, used in turn (default: built-in questions).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per request (greedy).")] = 32,
    seed: Annotated[int, typer.Option(help="Arrival seed (and the simulator's channel seed).")] = 0,
    timeout_s: Annotated[float, typer.Option(help="Runtime: one request's deadline (s).")] = 600.0,
    out: Annotated[Path, typer.Option(help="Results file (JSON Lines, resumable).")] = Path(
        "results/load.jsonl"
    ),
    simulate: Annotated[bool, typer.Option(help="Run in the simulator instead of against a BS.")] = False,
    model: Annotated[
        str, typer.Option(help="Simulator: 'default' or a local checkpoint folder.")
    ] = "default",
    policy: Annotated[str, typer.Option(help="Simulator: expert selection policy.")] = "topk",
    theta: Annotated[float | None, typer.Option(help="Simulator: θ of wdmoe-type policies.")] = None,
    param: Annotated[list[str] | None, typer.Option(help="Simulator: policy parameter NAME=VALUE.")] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Simulator: router candidates per token.")
    ] = None,
    scenario: Annotated[str, typer.Option(help="Simulator: scenario preset or .toml file.")] = "paper",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Simulator: scenario override a.b=value.")
    ] = None,
    allocator: Annotated[str, typer.Option(help="Simulator: bandwidth allocator.")] = "equal",
    max_batch: Annotated[int, typer.Option(help="Simulator: requests served at once (one batch).")] = 16,
    max_queue: Annotated[
        int, typer.Option(help="Simulator: requests that may wait for a turn; more are refused.")
    ] = 256,
    mode: ModeOpt = "drop",
    slack: SlackOpt = 3.0,
    grace_ms: GraceMsOpt = 250.0,
    max_wait_s: MaxWaitOpt = 30.0,
    tls_cert: Annotated[str | None, typer.Option(help="Runtime: PEM client certificate (mTLS).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="Runtime: PEM key of the client certificate.")] = None,
    tls_ca: Annotated[str | None, typer.Option(help="Runtime: PEM CA that signed the BS (TLS).")] = None,
) -> None:
    """Latency under load: requests at rates λ (Poisson) or a trace, against a BS or in the
    simulator; TTFT / TPOT percentiles, throughput and drop rate per λ (resumable --out)."""
    from wdmoe.serving.load import DEFAULT_PROMPTS, config_key
    from wdmoe.studies.load_io import read_load_records

    quiet_transformers()
    try:
        if requests < 1 or max_new_tokens < 1:
            raise ConfigError(
                f"--requests and --max-new-tokens must be ≥ 1, got {requests}, {max_new_tokens}"
            )
        runs = plan_runs(rates, trace, requests, seed)
        texts = read_lines(prompts, "--prompts") if prompts is not None else list(DEFAULT_PROMPTS)
        config = {
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "trace": None if trace is None else str(trace),
        }
        go: Callable[[Sink], None]
        if simulate:
            params = parse_params(param or [])
            params = params if theta is None else {"theta": theta, **params}
            face = sim_face(
                model,
                policy,
                params,
                top_k,
                scenario,
                set_ or [],
                allocator,
                (max_batch, max_queue),
                (mode, slack, grace_ms, max_wait_s),
                seed,
            )
            config |= face.config()
            setting = config_key(config)
            go = lambda sink: run_simulated(runs, texts, out, face, max_new_tokens, sink, setting)  # noqa: E731
        else:
            target = runtime_target(bs, token, (tls_cert, tls_key, tls_ca), max_new_tokens, timeout_s)
            config |= {"bs": bs}
            setting = config_key(config)
            go = lambda sink: run_runtime(runs, texts, out, target, sink, setting)  # noqa: E731
        new = with_progress(out, config, sum(len(a) for _, a in runs), "sim" if simulate else f"BS {bs}", go)
        records = read_load_records(out)
    except WdmoeError as e:
        raise fail(e) from e
    planned = {rate for rate, _ in runs}
    face_name = "sim" if simulate else "runtime"
    tell_outcome(new, sum(len(a) for _, a in runs), out)
    print_summary([r for r in records if r.series == (face_name, setting) and r.rate_per_s in planned])
