"""Watching a cell live: an event hub, an HTTP server for the page, its events, /metrics and
controls, and the shape of the events (the BS, the simulator and a replay all publish it).

hub.py      bounded fan-out of events to viewers (never blocks a publisher)
http.py     the page (static/, served from the package: works offline), SSE, /metrics, /control
steps.py    the ``cell`` and ``step`` events from a forward's layer prices (pure)
replay.py   a metrics log played back onto a hub
sim.py      the simulator's events (a forward listener beside :class:`~wdmoe.simulate.Simulation`)
"""

from wdmoe.dashboard.http import DashboardServer
from wdmoe.dashboard.hub import Hub

__all__ = ["DashboardServer", "Hub"]
