"""A metrics log played back onto a hub (``wdmoe dashboard --replay FILE``).

The log is the BS's JSON lines (``--metrics-log``): one object per event with ``event`` (the kind)
and ``time_s`` (wall clock, s). Events are published in order, waiting the logged gaps divided by
``speed`` (each gap capped at ``max_gap_s``, so a night without traffic does not stall the
replay); the streamed text is not in the log, so the page shows each request's figures only.
"""

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wdmoe.dashboard.hub import Event, Hub
from wdmoe.errors import ConfigError


def read_log(path: Path) -> Iterator[tuple[float, str, dict[str, Any]]]:
    """(time_s, kind, values) of each line; a line that is not an event raises ConfigError."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                kind, time_s = str(record.pop("event")), float(record.pop("time_s"))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ConfigError(f"{path}:{number} is not a metrics-log event ({err!r})") from err
            yield time_s, kind, record


def replay_hello(path: Path) -> list[Event]:
    """The page's first events for a replay: the file's name; no controls."""
    cell = {
        "source": "replay",
        "label": f"replay of {path.name}",
        "scenario": "",
        "radius_m": 0.0,
        "num_devices": 0,
        "classes": [],
        "bandwidth_hz": 0.0,
    }
    return [("cell", cell), ("controls", {"enabled": False})]


def replay(
    path: Path, hub: Hub, speed: float = 1.0, max_gap_s: float = 2.0, stop: threading.Event | None = None
) -> int:
    """Publish the log's events on ``hub`` at ``speed``× the logged pace; the number published."""
    if speed <= 0:
        raise ConfigError(f"--speed must be > 0, got {speed}")
    stop = stop or threading.Event()
    last, count, drawn = None, 0, False
    for time_s, kind, values in read_log(path):
        if last is not None and stop.wait(min(max(time_s - last, 0.0) / speed, max_gap_s)):
            break
        last = time_s
        if kind == "step" and values.get("devices") and not drawn:  # the cell's size from the first step
            hub.publish("cell", cell_of(path, values["devices"]))
            drawn = True
        hub.publish(kind, values)
        count += 1
    return count


def cell_of(path: Path, devices: dict[str, Any]) -> dict[str, Any]:
    """The replay's ``cell`` event: a radius that holds every device of a step (m)."""
    radius = max((abs(c) for p in devices["positions_m"] for c in p), default=1.0)
    return replay_hello(path)[0][1] | {"radius_m": 1.1 * radius, "num_devices": len(devices["share"])}
