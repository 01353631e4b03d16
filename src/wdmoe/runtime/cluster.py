"""A local cluster: the model's experts served by N device worker processes on loopback.

``Cluster`` loads a model, splits it into a temporary folder, places expert e of every layer on
device ``e % N``, starts one ``python -m wdmoe.runtime.device`` subprocess per device (free
loopback ports; a random token handed over in ``$WDMOE_TOKEN``, never on the command line), waits
until each answers, and installs a ``RemoteDispatcher`` on the model. Leaving the ``with`` block
always stops the workers (terminate → wait → kill), whatever ended it (an error, Ctrl-C).

    with Cluster("default", devices=4) as cluster:
        generate(cluster.wm, cluster.tok, "What is a router?")
        cluster.summary()
"""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import load_checkpoint
from wdmoe.models.split import split_model
from wdmoe.runtime.device import ExpertKey
from wdmoe.runtime.remote import RemoteDispatcher


class ClusterError(WdmoeError):
    """A device worker could not be started or did not become ready."""


def round_robin(keys: Sequence[ExpertKey], devices: int) -> list[list[ExpertKey]]:
    """Device u hosts expert e of every layer where e % devices == u (pure; U lists of keys)."""
    return [[k for k in keys if k[1] % devices == u] for u in range(devices)]


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


class CountingDispatcher(RemoteDispatcher):
    """A RemoteDispatcher that also counts calls and sums reported compute time per device address."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()
        self.compute_sum_s: dict[str, float] = {}
        self.answered: Counter[str] = Counter()

    def forget(self, address: str) -> None:
        """Drop the channel to ``address`` so the next call connects afresh (no reconnect back-off)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def gather(self, layer: int, e: int, address: str, future: Any, x: torch.Tensor) -> torch.Tensor | None:
        y = super().gather(layer, e, address, future, x)
        self.calls[address] += 1
        if y is not None:
            self.answered[address] += 1
            self.compute_sum_s[address] = self.compute_sum_s.get(address, 0.0) + self.compute_s[(layer, e)]
        return y


@dataclass(frozen=True)
class DeviceSummary:
    """What one device did while the cluster ran."""

    device: int
    address: str
    experts: int
    calls: int
    failures: int
    mean_compute_ms: float


@dataclass
class DeviceProcess:
    """One worker subprocess: the shards it hosts, where it listens, its stderr log."""

    device: int
    shards: list[Path]
    hosted: list[ExpertKey]
    port: int
    log: Path
    process: "subprocess.Popen[bytes] | None" = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr_tail(self, chars: int = 2000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:].strip() or "(empty)"


class Cluster:
    """N local device workers serving a model's experts; a context manager that always tears down."""

    def __init__(
        self,
        model: str = "default",
        devices: int = 2,
        *,
        timeout_s: float = 10.0,
        ready_s: float = 120.0,
    ) -> None:
        if devices < 1:
            raise ConfigError(f"--devices must be ≥ 1, got {devices}")
        self.spec, self.num_devices = model, devices
        self.timeout_s, self.ready_s = timeout_s, ready_s
        self.token = secrets.token_hex(16)
        self.devices: list[DeviceProcess] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.wm: WirelessModel
        self.tok: PreTrainedTokenizerBase
        self.dispatcher: CountingDispatcher

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
        """Load and split the model, start every worker, wait until all are ready, install remote experts."""
        net, self.tok = load_checkpoint(self.spec)
        self.wm = install(net)
        if self.num_devices > self.wm.num_experts:
            raise ConfigError(
                f"--devices must be in 1..{self.wm.num_experts} (the model's experts per layer), "
                f"got {self.num_devices}"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="wdmoe-cluster-")
        folder = Path(self._tmp.name)
        by_key = {shard_key(p): p for p in split_model(net, folder)}
        for u, keys in enumerate(round_robin(sorted(by_key), self.num_devices)):
            paths = [by_key[k] for k in keys]
            self.devices.append(DeviceProcess(u, paths, keys, free_port(), folder / f"device{u}.log"))
        for d in self.devices:
            self.launch(d)
        for d in self.devices:
            self.wait_ready(d)
        placement = {k: d.address for d in self.devices for k in d.hosted}
        self.dispatcher = CountingDispatcher(placement, self.token, timeout_s=self.timeout_s)
        self.wm.set_dispatcher(self.dispatcher)

    def launch(self, d: DeviceProcess) -> None:
        """Start device ``d``'s worker; the token travels in the environment, not in argv."""
        cmd = [sys.executable, "-m", "wdmoe.runtime.device", "--port", str(d.port), "--shards"]
        cmd += [str(p) for p in d.shards]
        env = os.environ | {"WDMOE_TOKEN": self.token}
        with open(d.log, "wb") as log:
            d.process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)

    def wait_ready(self, d: DeviceProcess) -> None:
        """Poll until the worker's gRPC port accepts a channel; a clear error if it dies or is late."""
        assert d.process is not None, d
        deadline = time.monotonic() + self.ready_s
        with grpc.insecure_channel(d.address) as channel:
            while True:
                if d.process.poll() is not None:
                    raise ClusterError(
                        f"device {d.device} ({d.address}) exited with status {d.process.returncode} "
                        f"before it was ready; its stderr ends with:\n{d.stderr_tail()}"
                    )
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise ClusterError(
                            f"device {d.device} ({d.address}) was not ready within {self.ready_s:.0f} s; "
                            f"its stderr ends with:\n{d.stderr_tail()}"
                        ) from None

    def kill_device(self, u: int) -> None:
        """Kill device u's worker at once (SIGKILL), as a crash would: for fault tests."""
        proc = self.devices[u].process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart_device(self, u: int) -> None:
        """Start device u again on its old port (stopping it first if it still runs) and wait for it."""
        stop(self.devices[u].process)
        self.launch(self.devices[u])
        self.wait_ready(self.devices[u])
        if hasattr(self, "dispatcher"):
            self.dispatcher.forget(self.devices[u].address)

    def pids(self) -> list[int]:
        return [d.process.pid for d in self.devices if d.process is not None]

    def summary(self) -> list[DeviceSummary]:
        """Per device: experts hosted, expert calls, failed calls, mean reported compute time."""
        failed = Counter(f.address for f in self.dispatcher.failures)
        rows = []
        for d in self.devices:
            n, answered = self.dispatcher.calls[d.address], self.dispatcher.answered[d.address]
            mean_ms = 1e3 * self.dispatcher.compute_sum_s.get(d.address, 0.0) / answered if answered else 0.0
            rows.append(DeviceSummary(d.device, d.address, len(d.hosted), n, failed[d.address], mean_ms))
        return rows

    def close(self) -> None:
        """Stop every worker (terminate → wait → kill), close channels, remove the split."""
        try:
            for d in self.devices:
                stop(d.process)
        finally:
            if hasattr(self, "dispatcher"):
                self.dispatcher.close()
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
