"""The dashboard's HTTP face: the page, its event stream, /metrics and the controls.

The standard library's :class:`~http.server.ThreadingHTTPServer` on a thread of its own (no extra
dependency; bound to loopback by default):

=================  =========================================================================
``GET /``          the page (``static/index.html``; its script and style from ``/static/``)
``GET /events``    server-sent events: ``data: {"kind": …, "v": {…}}`` per event, a comment
                   every ``KEEPALIVE_S`` so a closed tab is noticed; at most ``MAX_VIEWERS``
``GET /state``     the hello events (cell layout, controls) as one JSON list
``GET /metrics``   Prometheus text exposition (where a metrics source is given)
``POST /control``  ``{"policy": …, "params": {…}, "allocator": …}`` with ``Authorization:
                   Bearer <the BS's token>``: 401 without a token, 403 with a wrong one,
                   404 where there are no controls (simulator, replay), 400 for a bad value
=================  =========================================================================

Every asset is served from the package: the page works offline.
"""

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from wdmoe.dashboard.hub import Hub, Viewer
from wdmoe.errors import ConfigError, WdmoeError

log = logging.getLogger("wdmoe.dashboard")
KEEPALIVE_S = 15.0  # seconds between comments on an idle event stream
MAX_BODY_BYTES = 4096  # a control request is a few fields
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
Metrics = Callable[[], tuple[bytes, str]]  # () → (exposition bytes, content type)
Control = Callable[[dict[str, Any]], dict[str, Any]]  # a control request → what is now in force


def parse_address(text: str, option: str = "--dashboard") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; port 0: any free one) → (host, port); ConfigError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"{option} must be HOST:PORT with a port in 0..65535, e.g. 127.0.0.1:8765; got {text!r}"
        )
    return host.strip("[]"), int(port)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float as None (JSON has no NaN or ∞)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def encode(kind: str, values: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``{"kind", "v"}``."""
    message = {"kind": kind, "v": values}
    try:
        text = json.dumps(message, default=str, allow_nan=False)
    except ValueError:
        text = json.dumps(finite(message), default=str)
    return f"data: {text}\n\n".encode()


def static_file(name: str) -> bytes:
    return (resources.files("wdmoe.dashboard") / "static" / name).read_bytes()


class DashboardServer:
    """Serves a :class:`Hub` over HTTP (see the module doc); ``close()`` ends it and every stream."""

    def __init__(
        self,
        hub: Hub,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        metrics: Metrics | None = None,
        control: Control | None = None,
        token: str | None = None,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        if control is not None and not token:
            raise WdmoeError("dashboard controls need the BS's token to authorise them")
        self.hub, self.metrics, self.control, self.token = hub, metrics, control, token
        self.on_close = list(on_close)  # called on close (e.g. unsubscribing from the events)
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.dashboard = self  # type: ignore[attr-defined]
        self.host, self.port = host, int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def authorised(self, header: str | None) -> int:
        """200 for ``Bearer <token>``, 401 without credentials, 403 with wrong ones."""
        if not header or not header.startswith("Bearer "):
            return 401
        given = header.removeprefix("Bearer ").strip().encode()
        return 200 if hmac.compare_digest(given, (self.token or "").encode()) else 403

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        for done in self.on_close:
            done()
        self.hub.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class Handler(BaseHTTPRequestHandler):
    """One HTTP request (a thread each); see :class:`DashboardServer`."""

    server_version = "wdmoe-dashboard"

    @property
    def dash(self) -> DashboardServer:
        return self.server.dashboard  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def reply(self, code: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, code: int, obj: Any, **headers: str) -> None:
        self.reply(code, json.dumps(finite(obj), default=str).encode(), "application/json", **headers)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self.reply(200, static_file("index.html"), STATIC["index.html"])
        elif path.startswith("/static/") and path.removeprefix("/static/") in STATIC:
            name = path.removeprefix("/static/")
            self.reply(200, static_file(name), STATIC[name])
        elif path == "/events":
            self.stream()
        elif path == "/state":
            self.reply_json(200, [{"kind": k, "v": v} for k, v in self.dash.hub.hello()])
        elif path == "/metrics" and self.dash.metrics is not None:
            body, content_type = self.dash.metrics()
            self.reply(200, body, content_type)
        else:
            self.reply_json(404, {"error": f"nothing at {path}"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/control" or self.dash.control is None:
            self.reply_json(404, {"error": "no controls here (only a BS's dashboard has them)"})
            return
        code = self.dash.authorised(self.headers.get("Authorization"))
        if code != 200:
            why = "a token is required" if code == 401 else "wrong token"
            self.reply_json(
                code,
                {"error": f"{why}: send Authorization: Bearer <the BS's token>"},
                WWW_Authenticate='Bearer realm="wdmoe"',
            )
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self.reply_json(400, {"error": f"a control is a JSON object of at most {MAX_BODY_BYTES} bytes"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise ValueError("a control is a JSON object")
            self.reply_json(200, self.dash.control(request))
        except (ValueError, TypeError, WdmoeError) as err:
            self.reply_json(400, {"error": str(err)})

    def stream(self) -> None:
        """Server-sent events until the viewer leaves or the server stops."""
        joined = self.dash.hub.join()
        if joined is None:
            self.reply_json(503, {"error": "too many viewers; close another dashboard tab"})
            return
        key, viewer = joined
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            self.pump(viewer)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the tab was closed
        finally:
            self.dash.hub.leave(key)

    def pump(self, viewer: Viewer) -> None:
        quiet_since = time.monotonic()
        while not self.dash.stopping.is_set() and not viewer.closed:
            events = viewer.take(timeout_s=1.0)
            if events:
                self.wfile.write(b"".join(encode(kind, values) for kind, values in events))
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_S:
                self.wfile.write(b": keep-alive\n\n")
                quiet_since = time.monotonic()
            self.wfile.flush()
