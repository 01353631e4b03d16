"""A BS on a tiny model with device servers in this process, all on loopback (for runtime tests)."""

from contextlib import contextmanager

from tiny import tiny_model, tiny_tokenizer
from wdmoe.config import load_scenario
from wdmoe.models.install import install
from wdmoe.runtime.bs import BaseStation, RuntimeSettings, fit_scenario
from wdmoe.runtime.client import BSClient
from wdmoe.runtime.cluster import round_robin
from wdmoe.runtime.device import serve
from wdmoe.runtime.service import serve_bs

TOKEN = "bs-token"


class Lab:
    """A BS on a tiny model and device servers in this process, all on loopback."""

    def __init__(
        self,
        family,
        by_key,
        devices=8,
        settings=None,
        overrides=(),
        replicas=1,
        delays=None,
        log=None,
        tls=None,
    ):
        self.ref = install(tiny_model(family))
        wm = install(tiny_model(family))
        cell = load_scenario("lab", [f"cell.num_devices={devices}", *overrides])
        scenario = fit_scenario(cell, wm, family)
        settings = settings or RuntimeSettings()
        if settings.mode != "fallback":
            wm.release_experts()
        self.bs = BaseStation(wm, tiny_tokenizer(), scenario, settings, token=TOKEN, metrics_log=log, tls=tls)
        self.server = serve_bs(self.bs, TOKEN)
        self.devices = []
        for u, keys in enumerate(round_robin(sorted(by_key), devices, replicas)):
            d = serve([by_key[k] for k in keys], token=TOKEN, delay_s=(delays or {}).get(u, 0.0), tls=tls)
            d.register(self.server.address, TOKEN, u, tls=tls)
            self.devices.append(d)
        self.client = BSClient(self.server.address, TOKEN, tls)
        self.client.wait_ready(devices, timeout_s=30)

    @property
    def wm(self):
        return self.bs.wm

    def close(self):
        self.client.close()
        for d in self.devices:
            d.stop()
        self.server.stop()


@contextmanager
def static_bs(wm, placement, timeout_s, token=TOKEN):
    """A BS (no gRPC face) over devices known by address, {(layer, expert): "host:port"}, whose calls
    may take ``timeout_s``; closed and ``wm`` given back its in-process dispatcher on exit. Static
    devices advertise no data plane: these calls travel as gRPC RunExpert calls."""
    slots = len(set(placement.values()))
    scenario = fit_scenario(load_scenario("lab", [f"cell.num_devices={slots}"]), wm, "mixtral")
    bs = BaseStation(wm, None, scenario, RuntimeSettings(slack=1.0, grace_s=timeout_s), token=token)
    try:
        bs.add_static(placement)
        yield bs
    finally:
        bs.close()
        wm.set_dispatcher(wm.local_dispatcher())


def failures(bs):
    """{address: {code: count}} of the devices whose calls failed."""
    return {d["address"]: d["failures"] for d in bs.summary()["devices"] if d["failures"]}
