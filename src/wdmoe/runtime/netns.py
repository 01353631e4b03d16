"""A network lab on one Linux machine: device hosts in network namespaces, joined to the BS by veths.

Each host i lives in its own namespace with one veth pair to the BS — a star, like a cell: the BS
side of pair i is ``{subnet}.i.1/30``, the device side ``{subnet}.i.2/30``. The BS is a namespace of
its own (``bs_namespace=True``) or the root namespace (then this process, being the BS, reaches
every device directly). Hosts reach only the BS: nothing forwards between pairs.

Links are shaped with ``tc tbf``: the downlink on the BS-side egress, the uplink on the device-side
egress, so each direction has its own rate. Only ``ip`` and ``tc`` (iproute2) are run; it needs root
(CAP_NET_ADMIN). ``netns_available()`` says, without raising, whether this machine allows it.

    with NetLab(hosts=2, bs_namespace=False) as lab:
        worker = lab.popen(lab.hosts[0].name, [sys.executable, "-m", "wdmoe.runtime.device", ...])
        lab.set_rate(0, downlink_bps=2e6, uplink_bps=1e6)
"""

import contextlib
import math
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wdmoe.errors import ConfigError, WdmoeError

MIN_RATE_BPS = 8_000.0
"""tc rates below 8 kbit/s are raised to it: one 1.5 kB frame then already takes 1.5 s, and tbf keeps
the burst as a 32-bit count of scheduler ticks, which overflows when one packet lasts that long."""
FRAME_BYTES = 1514  # an Ethernet frame at MTU 1500: tbf drops any packet larger than its burst
MIN_BURST_BYTES = 2 * FRAME_BYTES
BURST_S = 0.01  # default burst: 10 ms of traffic at the rate (at least MIN_BURST_BYTES)
QUEUE_S = 10.0  # the queue holds 10 s of traffic, so packets wait for tokens instead of being dropped
MAX_QUEUE_BYTES = 2**30  # tc's queue limit is a 32-bit byte count; 1 GiB is 0.86 s even at 10 Gbit/s
COMMAND_TIMEOUT_S = 30.0
STOP_GRACE_S = 3.0


class NetLabError(WdmoeError):
    """An ``ip`` or ``tc`` command failed; ``cmd`` is what ran and ``stderr`` what it said."""

    def __init__(self, cmd: Sequence[str], stderr: str) -> None:
        self.cmd, self.stderr = list(cmd), stderr
        super().__init__(
            f"`{shlex.join(self.cmd)}` failed: {stderr or 'no error output'} "
            "(network labs need root, iproute2 and kernel netns/veth/tbf support: see netns_available())"
        )


def run_command(cmd: Sequence[str]) -> str:
    """Run one ip/tc command under a deadline; its stdout, or NetLabError with its stderr."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetLabError(cmd, str(err)) from err
    if done.returncode != 0:
        raise NetLabError(cmd, done.stderr.strip())
    return done.stdout


def ip(namespace: str | None, *args: str) -> list[str]:
    """The ``ip`` command line acting inside ``namespace`` (None: the root namespace)."""
    return ["ip", *(["-n", namespace] if namespace else []), *args]


def tc(namespace: str | None, *args: str) -> list[str]:
    return ["tc", *(["-n", namespace] if namespace else []), *args]


def tbf_args(rate_bps: float, burst_bytes: int | None = None) -> list[str]:
    """The ``tc qdisc … root`` arguments of a token bucket at ``rate_bps`` (bits per second).

    rate: max(rate_bps, MIN_RATE_BPS), rounded to whole bit/s. burst (bytes sent back to back after
    an idle spell): ``burst_bytes``, or by default max(MIN_BURST_BYTES, rate·BURST_S/8); it must hold
    one full frame. limit (bytes queued before drops): burst + rate·QUEUE_S/8, capped at MAX_QUEUE_BYTES
    but never below the burst.
    """
    if not math.isfinite(rate_bps):
        raise ConfigError(f"rate_bps must be a finite bit/s value (clear_rate unshapes), got {rate_bps}")
    if burst_bytes is not None and burst_bytes < FRAME_BYTES:
        raise ConfigError(f"burst_bytes must be at least one frame ({FRAME_BYTES} B), got {burst_bytes}")
    rate = round(max(rate_bps, MIN_RATE_BPS))
    burst = burst_bytes if burst_bytes is not None else max(MIN_BURST_BYTES, math.ceil(rate * BURST_S / 8))
    limit = max(burst, min(burst + math.ceil(rate * QUEUE_S / 8), MAX_QUEUE_BYTES))
    return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit)]


def netns_available() -> tuple[bool, str]:
    """(True, "") when namespaces, veths and tbf can be set up here; else (False, why). Never raises."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root (CAP_NET_ADMIN); this process is not root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return False, f"{' and '.join(missing)} (iproute2) not found on PATH"
    probe = f"wdmprobe{secrets.token_hex(3)}"
    try:
        run_command(ip(None, "netns", "add", probe))
        run_command(ip(probe, "link", "add", "name", "p0", "type", "veth", "peer", "name", "p1"))
        run_command(tc(probe, "qdisc", "add", "dev", "p0", "root", *tbf_args(1e6)))
    except NetLabError as err:
        return False, f"cannot set up a probe namespace: {err}"
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(ip(None, "netns", "del", probe), capture_output=True, timeout=COMMAND_TIMEOUT_S)
    return True, ""


@dataclass(frozen=True)
class Host:
    """One device host: its namespace, its address there, the BS address of its link, both veth ends."""

    name: str
    address: str
    peer_address: str
    bs_if: str
    dev_if: str


class NetLab:
    """Namespaces and veths for ``hosts`` devices and a BS; built on ``with`` (or start()), always removed.

    Names are unique per lab ('wdm' + 6 random hex digits), so labs may coexist; in root mode
    (``bs_namespace=False``) the BS-side addresses live in the root namespace, so two live labs
    there need different ``subnet`` values (a clash raises NetLabError).
    """

    def __init__(self, hosts: int, bs_namespace: bool = True, subnet: str = "10.231") -> None:
        if not 1 <= hosts <= 256:
            raise ConfigError(f"hosts must be in 1..256 (one /30 per host in {subnet}.i.0), got {hosts}")
        octets = subnet.split(".")
        if len(octets) != 2 or not all(o.isdigit() and int(o) <= 255 for o in octets):
            raise ConfigError(f"subnet must be two IPv4 octets such as '10.231', got {subnet!r}")
        self.prefix = f"wdm{secrets.token_hex(3)}"
        self.subnet = subnet
        self.bs: str | None = f"{self.prefix}-bs" if bs_namespace else None
        self.hosts = [self.plan_host(i) for i in range(hosts)]
        self._namespaces: list[str] = []  # created so far, deleted in reverse
        self._processes: list[subprocess.Popen[Any]] = []

    def plan_host(self, i: int) -> Host:
        """Host i's names and addresses: namespace '<prefix>-h<i>', link {subnet}.i.0/30."""
        p = self.prefix
        return Host(f"{p}-h{i}", f"{self.subnet}.{i}.2", f"{self.subnet}.{i}.1", f"{p}b{i}", f"{p}d{i}")

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this lab creates (the BS's first, when it has one)."""
        return ([self.bs] if self.bs else []) + [h.name for h in self.hosts]

    def start(self) -> "NetLab":
        """Create the namespaces and links; on any failure remove what was made and raise NetLabError."""
        try:
            if self.bs is None:
                self.check_subnet_free()
            else:
                self.add_namespace(self.bs)
            for host in self.hosts:
                self.add_host(host)
        except BaseException:
            self.close()
            raise
        return self

    def check_subnet_free(self) -> None:
        """Root mode only: refuse a subnet that already has addresses in the root namespace."""
        cmd = ip(None, "-o", "-4", "addr", "show")
        used = [word for word in run_command(cmd).split() if word.startswith(f"{self.subnet}.")]
        if used:
            raise NetLabError(cmd, f"subnet {self.subnet} is in use here ({used[0]}): pass another subnet")

    def add_namespace(self, name: str) -> None:
        run_command(ip(None, "netns", "add", name))
        self._namespaces.append(name)
        run_command(ip(name, "link", "set", "lo", "up"))

    def add_host(self, host: Host) -> None:
        """Host namespace + a veth pair born with one end at the BS and the other in the host."""
        self.add_namespace(host.name)
        link = ("link", "add", "name", host.bs_if, "type", "veth", "peer", "name", host.dev_if)
        run_command(ip(self.bs, *link, "netns", host.name))
        ends = ((self.bs, host.bs_if, host.peer_address), (host.name, host.dev_if, host.address))
        for namespace, dev, address in ends:
            run_command(ip(namespace, "addr", "add", f"{address}/30", "dev", dev))
            run_command(ip(namespace, "link", "set", dev, "up"))

    def popen(self, namespace: str | None, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside ``namespace`` (None: this one); the lab stops it on close if still running."""
        full = cmd if namespace is None else ["ip", "netns", "exec", namespace, *cmd]
        process: subprocess.Popen[Any] = subprocess.Popen(full, **kw)
        self._processes.append(process)
        return process

    def set_rate(
        self, i: int, downlink_bps: float, uplink_bps: float, burst_bytes: int | None = None
    ) -> None:
        """Shape host i's link: BS→device at ``downlink_bps``, device→BS at ``uplink_bps`` (see tbf_args).

        Replaces any previous shaping of that link."""
        for namespace, dev, rate_bps in self.sides(i, downlink_bps, uplink_bps):
            qdisc = tbf_args(rate_bps, burst_bytes)
            run_command(tc(namespace, "qdisc", "replace", "dev", dev, "root", *qdisc))

    def clear_rate(self, i: int) -> None:
        """Remove host i's shaping (a no-op on an unshaped link)."""
        for namespace, dev, _ in self.sides(i, 0.0, 0.0):
            if run_command(tc(namespace, "qdisc", "show", "dev", dev, "root")).startswith("qdisc tbf"):
                run_command(tc(namespace, "qdisc", "del", "dev", dev, "root"))

    def sides(self, i: int, downlink_bps: float, uplink_bps: float) -> list[tuple[str | None, str, float]]:
        """(namespace, egress interface, rate) of host i's downlink and uplink."""
        host = self.hosts[i]
        return [(self.bs, host.bs_if, downlink_bps), (host.name, host.dev_if, uplink_bps)]

    def close(self) -> None:
        """Stop the lab's processes, delete its links and namespaces; raise if a namespace survived."""
        self.stop_processes()
        undo = [ip(None, "netns", "del", name) for name in reversed(self._namespaces)]
        if self.bs is None:  # root-side veth ends go with their peers' namespaces, but only eventually
            undo = [ip(None, "link", "del", host.bs_if) for host in self.hosts] + undo
        for cmd in undo:
            with contextlib.suppress(NetLabError):  # a link or namespace that was never made
                run_command(cmd)
        cmd = ip(None, "netns", "list")
        left = set(self._namespaces) & {line.split()[0] for line in run_command(cmd).splitlines() if line}
        self._namespaces = [n for n in self._namespaces if n in left]
        if left:
            raise NetLabError(cmd, f"namespaces {sorted(left)} could not be deleted")

    def stop_processes(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()

    def __enter__(self) -> "NetLab":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
