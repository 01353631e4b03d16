"""``wdmoe dashboard --replay FILE``: a BS's metrics log played back in the browser (thin; the
page and the replay live in wdmoe.dashboard)."""

import threading
from pathlib import Path
from typing import Annotated

import typer

from wdmoe.cli.common import err, fail
from wdmoe.errors import WdmoeError

DashboardOpt = Annotated[
    str | None,
    typer.Option(
        help="Serve the live dashboard (and /metrics at a BS) on HOST:PORT, e.g. 127.0.0.1:8765 "
        "(loopback keeps it to this machine; the page shows users' text)."
    ),
]


def dashboard_cmd(
    replay: Annotated[Path, typer.Option(help="A metrics log (serve-bs --metrics-log) to play back.")],
    at: Annotated[str, typer.Option("--at", help="HOST:PORT to serve the page on.")] = "127.0.0.1:8765",
    speed: Annotated[float, typer.Option(help="Replay speed: 2 plays twice as fast as logged.")] = 1.0,
) -> None:
    """Play a BS's metrics log back on the dashboard page (Ctrl-C ends it)."""
    from wdmoe.dashboard import DashboardServer, Hub
    from wdmoe.dashboard.http import parse_address
    from wdmoe.dashboard.replay import replay as play
    from wdmoe.dashboard.replay import replay_hello

    try:
        if not replay.is_file():
            raise WdmoeError(f"--replay {replay}: no such file")
        server = DashboardServer(Hub(lambda: replay_hello(replay)), *parse_address(at, "--at"))
    except (WdmoeError, OSError) as e:
        raise fail(e) from e
    err.print(f"dashboard at {server.url} · replaying {replay} at {speed:g}× · Ctrl-C ends it")
    stop = threading.Event()
    try:
        while not server.hub.viewers:  # start when someone watches
            stop.wait(0.2)
        count = play(replay, server.hub, speed, stop=stop)
        err.print(f"[dim]{count} events replayed; the page stays up until Ctrl-C[/]")
        stop.wait()
    except KeyboardInterrupt:
        pass
    except WdmoeError as e:
        raise fail(e) from e
    finally:
        server.close()
