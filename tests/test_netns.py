"""The network lab: tbf arguments (pure), then namespaces, veths and tc shaping on this machine.

Tests past the pure ones need root and kernel namespace support; without them they are skipped,
saying why. Device workers run as real processes inside host namespaces and are reached over veths.
"""

import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import failures, static_bs
from tiny import tiny_model, tiny_tokenizer
from wdmoe.config import load_scenario
from wdmoe.errors import ConfigError
from wdmoe.models.experts import run_expert
from wdmoe.models.install import install
from wdmoe.models.split import expert_shard, load_expert_shard, split_model
from wdmoe.runtime import api
from wdmoe.runtime.bs import BaseStation, RuntimeSettings, fit_scenario
from wdmoe.runtime.client import BSClient
from wdmoe.runtime.cluster import shard_key
from wdmoe.runtime.netns import (
    FRAME_BYTES,
    MAX_QUEUE_BYTES,
    MIN_BURST_BYTES,
    MIN_RATE_BPS,
    NetLab,
    NetLabError,
    netns_available,
    tbf_args,
)
from wdmoe.runtime.service import serve_bs

TOKEN = "netns-token"
PORT = 50051
RATE_BPS = 2e6
PIPES = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

# ------------------------------------------------------------------------------------- tbf_args


def test_tbf_args_default_burst_and_queue():
    assert tbf_args(2e6) == ["tbf", "rate", "2000000bit", "burst", str(MIN_BURST_BYTES), "limit", "2503028"]
    fast = tbf_args(1e8)  # 10 ms of traffic once that exceeds two frames
    assert fast[3:5] == ["burst", "125000"] and fast[6] == str(125_000 + 125_000_000)


def test_tbf_args_clamps_rate_and_caps_queue():
    for slow in (0.0, -5.0, 1.0, MIN_RATE_BPS):
        assert tbf_args(slow)[:3] == ["tbf", "rate", f"{int(MIN_RATE_BPS)}bit"]
    assert tbf_args(1e11)[-1] == str(MAX_QUEUE_BYTES)
    assert tbf_args(8e3, burst_bytes=MAX_QUEUE_BYTES + 1)[-1] == str(MAX_QUEUE_BYTES + 1)


def test_tbf_args_explicit_burst_and_bad_values():
    assert tbf_args(1e6, burst_bytes=FRAME_BYTES)[3:5] == ["burst", str(FRAME_BYTES)]
    with pytest.raises(ConfigError, match="burst_bytes"):
        tbf_args(1e6, burst_bytes=FRAME_BYTES - 1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="rate_bps"):
            tbf_args(bad)


def test_lab_arguments_are_checked_before_anything_is_made():
    for kw in ({"hosts": 0}, {"hosts": 257}, {"hosts": 1, "subnet": "10.300"}, {"hosts": 1, "subnet": "10"}):
        with pytest.raises(ConfigError):
            NetLab(**kw)
    lab = NetLab(3)
    assert [h.address for h in lab.hosts] == ["10.231.0.2", "10.231.1.2", "10.231.2.2"]
    assert all(len(name) <= 15 for h in lab.hosts for name in (h.bs_if, h.dev_if))
    assert lab.bs and NetLab(1, bs_namespace=False).bs is None and lab.prefix != NetLab(3).prefix


def test_netns_available_says_why_not(monkeypatch):
    import wdmoe.runtime.netns as netns_module

    monkeypatch.setattr(netns_module.os, "geteuid", lambda: 1000)
    ok, reason = netns_available()
    assert not ok and "root" in reason
    monkeypatch.setattr(netns_module.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns_module.shutil, "which", lambda tool: None if tool == "tc" else "/sbin/ip")
    ok, reason = netns_available()
    assert not ok and reason.startswith("tc ")


# ---------------------------------------------------------------------------- namespaces (root)


@pytest.fixture(scope="module")
def netns():
    ok, reason = netns_available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {reason}")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line}


def free_subnet() -> str:
    """A 10.x subnet with no address in this (root) namespace, so parallel runs do not clash."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    return next(s for s in (f"10.{x}" for x in range(231, 255)) if f" {s}." not in used)


def wait_line(proc: subprocess.Popen, says: str, timeout_s: float) -> str:
    """The first stdout line of ``proc`` containing ``says``; fails with its stderr on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                line = proc.stdout.readline()
                if says in line:
                    return line
                if not line:
                    break
    proc.kill()
    raise AssertionError(f"no {says!r} from {proc.args} (exit {proc.wait()}): {proc.stderr.read()[-2000:]}")


@pytest.fixture(scope="module")
def cell(netns, tmp_path_factory, one_torch_thread):
    """The BS in this (root) namespace, two device workers in host namespaces; shards split between them."""
    model = tiny_model("mixtral")
    shards = split_model(model, tmp_path_factory.mktemp("shards"))
    env = {**os.environ, "WDMOE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    placement = {}
    with NetLab(2, bs_namespace=False, subnet=free_subnet()) as lab:
        workers = []
        for i, host in enumerate(lab.hosts):
            mine = shards[i::2]
            cmd = [sys.executable, "-m", "wdmoe.runtime.device", "--host", host.address, "--port", str(PORT)]
            workers.append(lab.popen(host.name, [*cmd, "--shards", *map(str, mine)], env=env, **PIPES))
            for path in mine:
                shard, _ = load_expert_shard(path)
                placement[(shard.layer, shard.expert)] = f"{host.address}:{PORT}"
        try:
            for proc in workers:
                wait_line(proc, "device listening on", timeout_s=60)
            yield lab, model, placement
        finally:
            for proc in workers:
                proc.kill()
                proc.wait()


def test_remote_experts_over_veths_equal_in_process(cell):
    lab, model, placement = cell
    assert {a.split(":")[0] for a in placement.values()} == {h.address for h in lab.hosts}
    gen = torch.Generator().manual_seed(0)
    with static_bs(install(tiny_model("mixtral")), placement, timeout_s=20, token=TOKEN) as bs:
        for layer in range(2):
            inputs = {e: torch.randn(5, 32, generator=gen) for e in range(8)}
            outputs = bs.run_layer(layer, inputs)
            assert sorted(outputs) == list(range(8))
            for e, x in inputs.items():
                ref = run_expert(expert_shard(model, layer, e), x)
                assert (outputs[e] - ref).abs().max() <= 1e-4
    assert failures(bs) == {}


def timed_run(bs: BaseStation, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out = bs.run_layer(0, {0: x})
    elapsed = time.perf_counter() - start
    assert failures(bs) == {} and out[0].shape == x.shape
    return elapsed


def test_shaped_link_takes_bytes_over_rate(cell):
    lab, _, placement = cell
    i = next(i for i, h in enumerate(lab.hosts) if placement[(0, 0)].startswith(f"{h.address}:"))
    x = torch.randn(3200, 32)  # 409.6 kB of float32 each way
    payload_bits = 2 * x.numel() * x.element_size() * 8  # request + response; headers only add to it
    with static_bs(install(tiny_model("mixtral")), placement, timeout_s=30, token=TOKEN) as d:
        timed_run(d, x[:1])  # connect before measuring
        try:
            lab.set_rate(i, RATE_BPS, RATE_BPS)
            shaped_s = timed_run(d, x)
        finally:
            lab.clear_rate(i)
        clear_s = timed_run(d, x)
    ideal_s = payload_bits / RATE_BPS
    print(
        f"shaped {shaped_s:.2f} s (payload at {RATE_BPS:.0e} bit/s: {ideal_s:.2f} s), clear {clear_s:.3f} s"
    )
    assert 0.8 * ideal_s <= shaped_s <= 2 * ideal_s + 1
    assert clear_s < 0.2 * ideal_s


SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn, conn.makefile("rb") as f:
        op, n = f.read(1), int.from_bytes(f.read(8), "big")
        if op == b"d":
            f.read(n)
            conn.sendall(b"k")
        else:
            conn.sendall(bytes(n))
"""


def transfer_s(address: str, port: int, op: bytes, n: int) -> float:
    """Seconds to move n bytes to (op b'd') or from (op b'u') the server, measured at this end."""
    with socket.create_connection((address, port), timeout=20) as sock, sock.makefile("rb") as f:
        start = time.perf_counter()
        sock.sendall(op + n.to_bytes(8, "big") + (bytes(n) if op == b"d" else b""))
        got = f.read(1 if op == b"d" else n)
        elapsed = time.perf_counter() - start
    assert len(got) == (1 if op == b"d" else n)
    return elapsed


def test_downlink_and_uplink_have_their_own_rates(cell):
    lab, _, _ = cell
    host, n, port = lab.hosts[1], 125_000, PORT + 1
    server = lab.popen(host.name, [sys.executable, "-c", SERVER, host.address, str(port)], **PIPES)
    try:
        wait_line(server, "ready", timeout_s=20)
        slow_s = n * 8 / RATE_BPS
        for down_bps, up_bps in ((RATE_BPS, 100e6), (100e6, RATE_BPS)):
            lab.set_rate(1, down_bps, up_bps)
            down_s, up_s = transfer_s(host.address, port, b"d", n), transfer_s(host.address, port, b"u", n)
            print(f"downlink {down_bps:.0e} bit/s: {down_s:.3f} s, uplink {up_bps:.0e} bit/s: {up_s:.3f} s")
            shaped, free = (down_s, up_s) if down_bps == RATE_BPS else (up_s, down_s)
            assert 0.8 * slow_s <= shaped <= 2 * slow_s + 1 and free < 0.3 * slow_s
    finally:
        lab.clear_rate(1)
        server.kill()
        server.wait()


CONNECT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    print(s.recv(64).decode())
"""
GREET = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = srv.accept()
conn.sendall(b"hello from " + sys.argv[1].encode())
conn.close()
"""


def test_bs_namespace_reaches_every_host_and_is_torn_down(netns):
    with NetLab(2) as lab:
        assert set(lab.namespaces) <= namespaces() and lab.bs in lab.namespaces
        for host in lab.hosts:
            greeter = lab.popen(host.name, [sys.executable, "-c", GREET, host.address, "7000"], **PIPES)
            wait_line(greeter, "ready", timeout_s=20)
            client = lab.popen(lab.bs, [sys.executable, "-c", CONNECT, host.address, "7000"], **PIPES)
            out, err = client.communicate(timeout=20)
            assert client.returncode == 0 and out.strip() == f"hello from {host.address}", err
        with pytest.raises(OSError):  # this process is not the BS: no route into the cell
            socket.create_connection((lab.hosts[0].address, 7000), timeout=0.3).close()
        lingering = lab.popen(lab.hosts[0].name, ["sleep", "60"])
    assert not set(lab.namespaces) & namespaces()
    assert lingering.poll() is not None  # the lab stopped what it started
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert lab.prefix not in links


def test_teardown_on_error_and_errors_name_the_command(netns):
    with (
        pytest.raises(RuntimeError, match="boom"),
        NetLab(1, bs_namespace=False, subnet=free_subnet()) as lab,
    ):
        assert set(lab.namespaces) <= namespaces()
        with pytest.raises(NetLabError, match="in use"), NetLab(1, bs_namespace=False, subnet=lab.subnet):
            pass
        raise RuntimeError("boom")
    assert not set(lab.namespaces) & namespaces()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert lab.prefix not in links
    with pytest.raises(NetLabError) as err:
        lab.set_rate(0, 1e6, 1e6)  # its links are gone
    assert err.value.cmd[0] == "tc" and err.value.stderr and "tbf" in str(err.value)


# ------------------------------------------------------------------ the full runtime across hosts

DEVICE_PORT = 50052
RATE_SCALE = 1 / 200
"""The lab cell's equal-share rates (2 devices: 20 MHz each, at the 8.33 bit/s/Hz cap: 167 Mbit/s)
times 1/200, i.e. ~0.83 Mbit/s per direction (clipped to 0.2–2 Mbit/s), so the shaped veths, not
the CPU, pace every expert call, while the tiny model's frames still take milliseconds."""
PROMPT = " ".join(["what is the router of the wireless cell and how fast is the channel"] * 3)


def shaped_rates_bps(bs: BaseStation) -> tuple[np.ndarray, np.ndarray]:
    """Downlink and uplink [U] of the BS's current channel at the equal share, scaled down."""
    state = bs.cell.snapshot(bs.sim_time_s()).true
    share_hz = state.equal_share_hz()
    scaled = (RATE_SCALE * state.dl.rate_bps(share_hz), RATE_SCALE * state.ul.rate_bps(share_hz))
    dl, ul = (np.clip(rate, 2e5, 2e6) for rate in scaled)
    return dl, ul


def start_devices(lab: NetLab, shards: list[Path], bs_port: int) -> None:
    """Worker i in host i's namespace, hosting expert e of every layer where e % 2 == i, registered
    with the BS at its end of the veth (the lab stops the workers when it closes)."""
    env = {**os.environ, "WDMOE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    workers = []
    for i, host in enumerate(lab.hosts):
        mine = [str(p) for p in shards if shard_key(p)[1] % 2 == i]
        cmd = [sys.executable, "-m", "wdmoe.runtime.device", "--host", host.address]
        cmd += ["--port", str(DEVICE_PORT), "--bs", f"{host.peer_address}:{bs_port}"]
        workers.append(lab.popen(host.name, [*cmd, "--slot", str(i), "--shards", *mine], env=env, **PIPES))
    for proc in workers:
        wait_line(proc, "device listening on", timeout_s=30)


def test_full_runtime_with_devices_in_host_namespaces(netns, tmp_path, one_torch_thread):
    """BS (root namespace) + two registered device workers behind veths: exact logits, then the same
    answer with the veths shaped to the channel model's rates."""
    net = tiny_model("mixtral")
    shards = split_model(net, tmp_path)
    wm = install(net)
    scenario = fit_scenario(load_scenario("lab", ["cell.num_devices=2"]), wm, "tiny-mixtral")
    wm.release_experts()
    settings = RuntimeSettings(grace_s=5.0)  # deadlines trust the 167 Mbit/s channel; the veths are slower
    bs = BaseStation(wm, tiny_tokenizer(), scenario, settings, token=TOKEN)
    server = serve_bs(bs, TOKEN, host="0.0.0.0")  # port 0: any free one
    try:
        with NetLab(2, bs_namespace=False, subnet=free_subnet()) as lab:
            start_devices(lab, shards, server.port)
            with BSClient(f"127.0.0.1:{server.port}", TOKEN) as client:
                client.wait_ready(2, timeout_s=30)
                rows = client.stats()["devices"]
                assert [r["address"] for r in rows] == [f"{h.address}:{DEVICE_PORT}" for h in lab.hosts]

                ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(0))
                reference = tiny_model("mixtral")(ids).logits
                assert (wm.model(ids).logits - reference).abs().max() <= 1e-4
                summary = bs.summary()
                assert all(d["calls"] > 0 for d in summary["devices"])
                assert summary["totals"]["failed_calls"] == 0

                request = api.GenerateRequest(PROMPT, max_new_tokens=6)
                clear = client.generate(request, timeout_s=60)
                assert clear["dropped"] == 0 and clear["new_tokens"] == 6

                dl_bps, ul_bps = shaped_rates_bps(bs)
                for i in range(2):
                    lab.set_rate(i, dl_bps[i], ul_bps[i])
                before = bs.summary()["devices"]
                shaped = client.generate(request, timeout_s=60)
                after = bs.summary()["devices"]
                assert shaped["dropped"] == 0 and shaped["text"] == clear["text"]
                assert bs.summary()["totals"]["failed_calls"] == 0
                # tbf passes at most burst + rate·t bytes in t seconds: a floor on the shaped wall time
                sent_bits = [
                    8 * (a["bytes_dl"] - b["bytes_dl"] - MIN_BURST_BYTES)
                    for a, b in zip(after, before, strict=True)
                ]
                floor_s = max(bits / rate for bits, rate in zip(sent_bits, dl_bps, strict=True))
                print(
                    f"rates {dl_bps / 1e6} / {ul_bps / 1e6} Mbit/s: shaped {shaped['wall_s']:.2f} s "
                    f"(floor {floor_s:.2f} s), clear {clear['wall_s']:.2f} s"
                )
                assert shaped["wall_s"] >= floor_s
    finally:
        server.stop()
