"""A local cluster: a BS and N device worker processes on loopback.

``Cluster`` loads a model, splits it into a temporary folder, places expert e of every layer on
device ``e % N`` (and, with replicas r, also on the r − 1 next devices; or as a ``wdmoe plan``
placement file lists them), starts the BS — in this
process (``bs_in_process``, so tests can reach the model) or as ``python -m wdmoe serve-bs`` — and
one ``python -m wdmoe.runtime.device --bs …`` subprocess per device (free loopback ports; a random
token handed over in ``$WDMOE_TOKEN``, never on the command line), and waits until every device has
registered. Leaving the ``with`` block always stops every process (terminate → wait → kill),
whatever ended it (an error, Ctrl-C); the BS writes its summary when it stops.

    with Cluster("default", devices=4) as cluster:
        cluster.client.generate(GenerateRequest("What is a router?"), on_text=print)
        cluster.stats()
"""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from wdmoe.config import load_scenario
from wdmoe.dashboard.http import parse_address
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import load_checkpoint  # checks a folder before any process starts
from wdmoe.models.split import split_model
from wdmoe.planning.files import read_placement
from wdmoe.runtime.bs import BaseStation, RuntimeSettings, fit_scenario
from wdmoe.runtime.client import BSClient, BSError
from wdmoe.runtime.device import ExpertKey
from wdmoe.runtime.service import BSServer, serve_bs


class ClusterError(WdmoeError):
    """A device worker could not be started or did not become ready."""


def round_robin(keys: Sequence[ExpertKey], devices: int, replicas: int = 1) -> list[list[ExpertKey]]:
    """Device u hosts expert e of every layer where (u − e) mod devices < replicas (pure; U lists)."""
    return [[k for k in keys if (u - k[1]) % devices < replicas] for u in range(devices)]


def planned(keys: Sequence[ExpertKey], devices: int, placement: Path) -> list[list[ExpertKey]]:
    """The U shard lists of a ``wdmoe plan`` placement file, checked against the cell's devices and
    the model's shards ``keys`` (ConfigError naming the file otherwise)."""
    layers = sorted({k[0] for k in keys})
    experts = len({k[1] for k in keys})
    f = read_placement(placement, devices, len(layers), experts)
    if sorted(f.layers) != layers:
        raise ConfigError(
            f"placement file {str(placement)!r} places MoE layers {list(f.layers)}, the model has {layers}"
        )
    return [list(s) for s in f.shards]


def shard_key(path: Path) -> ExpertKey:
    """(layer, expert) of a shard file, from its metadata (the weights are not read)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return int(meta["layer"]), int(meta["expert"])


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the worker binds it right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (a reaped child no longer does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class DeviceProcess:
    """One worker subprocess: the shards it hosts, where it listens, its stderr log."""

    device: int
    shards: list[Path]
    hosted: list[ExpertKey]
    port: int
    log: Path
    delay_ms: float = 0.0
    process: "subprocess.Popen[bytes] | None" = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr_tail(self, chars: int = 2000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:].strip() or "(empty)"


def settings_args(s: RuntimeSettings) -> list[str]:
    """``wdmoe serve-bs`` flags that reproduce ``s``."""
    args = ["--policy", s.policy, "--allocator", s.allocator, "--mode", s.mode, "--slack", str(s.slack)]
    args += ["--grace-ms", str(1e3 * s.grace_s), "--max-wait-s", str(s.max_wait_s)]
    args += [
        "--time-scale",
        str(s.time_scale),
        "--wire-dtype",
        s.wire_dtype,
        "--heartbeat-s",
        str(s.heartbeat_s),
    ]
    args += ["--bench-after", str(s.bench_after), "--bench-s", str(s.bench_s)]
    args += ["--max-active", str(s.max_active), "--max-queue", str(s.max_queue)]
    args += ["--emulate-links" if s.emulate_links else "--no-emulate-links", "--data-plane", s.data_plane]
    args += ["--software-overhead", s.software_overhead, "--energy-slack", str(s.energy_slack)]
    for key, value in s.params.items():
        args += ["--param", f"{key}={value}"]
    return args


class Cluster:
    """A BS and N local device workers; a context manager that always tears everything down."""

    def __init__(
        self,
        model: str = "default",
        devices: int = 2,
        *,
        settings: RuntimeSettings | None = None,
        scenario: str = "lab",
        overrides: Sequence[str] = (),
        replicas: int = 1,
        delays_ms: dict[int, float] | None = None,
        bs_in_process: bool = True,
        top_k: int | None = None,
        metrics_log: Path | None = None,
        ready_s: float = 180.0,
        dashboard: str | None = None,
        placement: Path | None = None,
    ) -> None:
        if devices < 1:
            raise ConfigError(f"--devices must be ≥ 1, got {devices}")
        if not 1 <= replicas <= devices:
            raise ConfigError(f"--replicas must be in 1..{devices} (the devices), got {replicas}")
        self.spec, self.num_devices, self.replicas = model, devices, replicas
        if placement is not None and replicas != 1:
            raise ConfigError("--replicas and --placement exclude each other: the file lists every replica")
        self.placement = placement  # a `wdmoe plan` file: its shard lists instead of round-robin
        self.settings = settings or RuntimeSettings()
        self.scenario_name = scenario
        self.overrides = [*overrides, f"cell.num_devices={devices}"]
        self.delays_ms = delays_ms or {}
        self.bs_in_process, self.top_k = bs_in_process, top_k
        self.metrics_log, self.ready_s = metrics_log, ready_s
        self.dashboard = dashboard  # HOST:PORT of the BS's dashboard and /metrics, or None
        self.token = secrets.token_hex(16)
        self.devices: list[DeviceProcess] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.server: BSServer | None = None
        self.bs_process: subprocess.Popen[bytes] | None = None
        self.bs_log: Path | None = None
        self.bs_address = ""
        self.client: BSClient
        self.wm: WirelessModel
        self.tok: PreTrainedTokenizerBase
        self.bs: BaseStation

    def __enter__(self) -> "Cluster":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Load and split the model, start the BS and every worker, wait until all registered."""
        cell = load_scenario(self.scenario_name, self.overrides)  # bad overrides fail first
        net, self.tok = load_checkpoint(self.spec, top_k=self.top_k)
        wm = install(net)
        if self.num_devices > wm.num_experts:
            raise ConfigError(
                f"--devices must be in 1..{wm.num_experts} (the model's experts per layer), "
                f"got {self.num_devices}"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="wdmoe-cluster-")
        folder = Path(self._tmp.name)
        by_key = {shard_key(p): p for p in split_model(net, folder)}
        keys_all = sorted(by_key)
        lists = (
            round_robin(keys_all, self.num_devices, self.replicas)
            if self.placement is None
            else planned(keys_all, self.num_devices, self.placement)
        )
        for u, keys in enumerate(lists):
            paths = [by_key[k] for k in keys]
            log = folder / f"device{u}.log"
            self.devices.append(DeviceProcess(u, paths, keys, free_port(), log, self.delays_ms.get(u, 0.0)))
        if self.bs_in_process:
            scenario = fit_scenario(cell, wm, self.spec)
            if self.settings.mode != "fallback":
                wm.release_experts()
            self.wm = wm
            self.bs = BaseStation(
                wm, self.tok, scenario, self.settings, token=self.token, metrics_log=self.metrics_log
            )
            page = parse_address(self.dashboard) if self.dashboard else None
            self.server = serve_bs(self.bs, self.token, dashboard=page)
            self.bs_address = self.server.address
        else:
            del net, wm
            self.launch_bs(folder)
        self.client = BSClient(self.bs_address, self.token)
        for d in self.devices:
            self.launch(d)
        self.wait_ready()

    def launch_bs(self, folder: Path) -> None:
        port = free_port()
        self.bs_address = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "wdmoe", "serve-bs", "--model", self.spec, "--port", str(port)]
        cmd += ["--scenario", self.scenario_name, *settings_args(self.settings)]
        for o in self.overrides:
            cmd += ["--set", o]
        if self.top_k is not None:
            cmd += ["--top-k", str(self.top_k)]
        if self.metrics_log is not None:
            cmd += ["--metrics-log", str(self.metrics_log)]
        if self.dashboard is not None:
            cmd += ["--dashboard", self.dashboard]
        self.bs_log = folder / "bs.log"
        with open(self.bs_log, "wb") as log:
            env = os.environ | {"WDMOE_TOKEN": self.token}
            self.bs_process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)

    def launch(self, d: DeviceProcess) -> None:
        """Start device ``d``'s worker; the token travels in the environment, not in argv."""
        cmd = [sys.executable, "-m", "wdmoe.runtime.device", "--port", str(d.port), "--bs", self.bs_address]
        cmd += ["--slot", str(d.device), "--name", f"device{d.device}"]
        if d.delay_ms:
            cmd += ["--inject-delay-ms", str(d.delay_ms)]
        cmd += ["--shards", *map(str, d.shards)]
        env = os.environ | {"WDMOE_TOKEN": self.token}
        with open(d.log, "ab") as log:
            d.process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)

    def check_alive(self) -> None:
        """A ClusterError naming the first process that exited, with the end of its stderr."""
        if self.bs_process is not None and self.bs_process.poll() is not None:
            tail = self.bs_log.read_text(errors="replace")[-2000:] if self.bs_log else ""
            raise ClusterError(
                f"the BS exited with status {self.bs_process.returncode}; "
                f"its stderr ends with:\n{tail.strip()}"
            )
        for d in self.devices:
            if d.process is not None and d.process.poll() is not None:
                raise ClusterError(
                    f"device {d.device} ({d.address}) exited with status {d.process.returncode}; "
                    f"its stderr ends with:\n{d.stderr_tail()}"
                )

    def wait_ready(self, devices: int | None = None) -> None:
        """Until every device (or ``devices`` of them) is registered and usable at the BS."""

        def alive() -> bool:
            self.check_alive()
            return True

        try:
            self.client.wait_ready(self.num_devices if devices is None else devices, self.ready_s, alive)
        except BSError as err:
            raise ClusterError(str(err)) from err

    def kill_device(self, u: int) -> None:
        """Kill device u's worker at once (SIGKILL), as a crash would: for fault tests."""
        proc = self.devices[u].process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart_device(self, u: int) -> None:
        """Start device u again on its old port (stopping it first if it still runs); returns once the
        BS has it usable again (it re-registers by itself)."""
        stop(self.devices[u].process)
        self.launch(self.devices[u])
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            self.check_alive()
            row = self.stats()["devices"][u]
            if row["usable"]:
                return
            time.sleep(0.2)
        raise ClusterError(f"device {u} did not re-register within {self.ready_s:.0f} s")

    def pids(self) -> list[int]:
        procs = [d.process for d in self.devices] + [self.bs_process]
        return [p.pid for p in procs if p is not None]

    def stats(self) -> dict[str, Any]:
        """The BS's per-device and overall figures."""
        return self.bs.summary() if self.bs_in_process else self.client.stats()

    def close(self) -> None:
        """Stop every worker and the BS (terminate → wait → kill), remove the split."""
        try:
            for d in self.devices:
                stop(d.process)
            if self.server is not None:
                self.server.stop()
                self.server = None
            stop(self.bs_process, grace_s=15.0)
        finally:
            if hasattr(self, "client"):
                self.client.close()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


def stop(proc: "subprocess.Popen[bytes] | None", grace_s: float = 5.0) -> None:
    """Terminate ``proc``, wait up to ``grace_s``, then kill it; always reaps it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
