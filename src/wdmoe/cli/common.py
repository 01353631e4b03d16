"""What every ``wdmoe`` command shares: the consoles, the one-line error exit, progress bars,
quiet transformers, streaming to stdout, ``--param`` pairs, the BS token and served-answer checks.

Commands import this module; this module imports no command (common ← commands ← app).
"""

import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from wdmoe.config import parse_assignment
from wdmoe.errors import ConfigError

err = Console(stderr=True, soft_wrap=True)  # status, progress and errors; stdout keeps the answers

# The deadline rule of device calls, the same options for the BS and the simulator (its defaults:
# wdmoe.latency.deadline.DeadlineRule).
ModeOpt = Annotated[
    str,
    typer.Option(
        help="A late or lost device call: drop, wait (up to --max-wait-s) or fallback (run at the BS)."
    ),
]
SlackOpt = Annotated[
    float, typer.Option(help="Deadline of a device call = time_scale·slack·predicted + grace.")
]
GraceMsOpt = Annotated[float, typer.Option(help="Deadline allowance for RPC and OS overhead (ms).")]
MaxWaitOpt = Annotated[float, typer.Option(help="The longest any device call may take (wait mode).")]


def fail(error: Exception) -> typer.Exit:
    """Print ``error: …`` on one line (the message is text, not rich markup) and exit with 2:
    ``raise fail(e) from e``."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(' '.join(str(error).split()))}")
    return typer.Exit(code=2)


def table_console(stderr: bool = False) -> Console:
    """The terminal's width on a terminal; wide enough for whole tables when piped to a file."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=160)


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def quiet_transformers() -> None:
    """wdmoe shows its own progress; silence transformers' per-tensor bars and warnings."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's bar is a plain tqdm
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def progress_bar(*extra: ProgressColumn) -> Progress:
    """A rich progress bar on stderr: description, bar, n/total, elapsed time, then ``extra``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, *extra, console=err)


class BuildProgress:
    """Shows the stages of loading or building a model as rich progress bars (on stderr)."""

    def __init__(self) -> None:
        self.progress = progress_bar()
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


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``--param`` values ``["theta=0.1", "k_scaled=true"]`` → {"theta": 0.1, "k_scaled": True}
    (values read as `--set` reads them); a pair without "=" is an error naming it."""
    example = "(e.g. k_scaled=true, tau_s=0.05)"
    return dict(parse_assignment(p, f"policy parameter {p!r} is not NAME=VALUE {example}") for p in pairs)


def resolve_token(token: str | None) -> str:
    """``--token``, else $WDMOE_TOKEN; neither is an error saying so."""
    value = token or os.environ.get("WDMOE_TOKEN", "")
    if not value:
        raise ConfigError("no token: give --token or set $WDMOE_TOKEN (devices and users must send the same)")
    return value


WARN_DROP_RATE = 0.1  # a request that lost more of its experts than this is flagged


def answer_was_served(metrics: dict[str, Any]) -> bool:
    """Warn loudly when a request lost many of its experts; False when it lost every one (its
    text then came from the BS's layers alone and means nothing)."""
    calls, dropped = metrics.get("expert_calls", 0), metrics.get("dropped", 0)
    if calls and dropped >= calls:
        err.print(
            f"[bold red]error:[/] every one of the {calls} expert calls of this request failed: the "
            "answer above is not the model's. Check the devices (their logs, `wdmoe stats`)."
        )
        return False
    if calls and dropped / calls >= WARN_DROP_RATE:
        err.print(
            f"[bold yellow]warning:[/] {dropped} of {calls} expert calls ({100 * dropped / calls:.0f} %) "
            "were dropped: the answer is degraded. Devices late, down or benched? See the summary."
        )
    return True
