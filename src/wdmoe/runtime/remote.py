"""The remote dispatcher: the BS side of RunExpert, fanning a layer's experts out to devices.

All experts of a layer are sent at once (gRPC futures, one per expert) and gathered under one
deadline. An expert whose device refuses, errors, times out or cannot be reached is left out of
the result — the block then treats it as dropped — and recorded in ``failures``; ``run`` never
raises for a device and never waits much past ``timeout_s``.
"""

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from wdmoe.runtime.device import RUN_EXPERT, ExpertKey, bearer
from wdmoe.runtime.server import GRPC_OPTIONS
from wdmoe.runtime.wire import ExpertRequest, WireError, decode_response, encode


@dataclass(frozen=True)
class Failure:
    """One expert call that brought back no outputs; ``code`` is the gRPC status name or 'WIRE'."""

    layer: int
    expert: int
    address: str
    code: str
    message: str


class RemoteDispatcher:
    """Runs experts on the devices of ``placement``: (layer, expert) → "host:port"."""

    def __init__(self, placement: Mapping[ExpertKey, str], token: str, timeout_s: float = 5.0) -> None:
        self.placement = dict(placement)
        self.metadata = bearer(token)
        self.timeout_s = timeout_s
        self.failures: list[Failure] = []
        self.compute_s: dict[ExpertKey, float] = {}  # the devices' last reported compute time
        self._channels: dict[str, Any] = {}
        self._ids = itertools.count()

    def stub(self, address: str) -> Any:
        """The RunExpert callable of ``address`` (one channel per device, reused)."""
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        return self._channels[address].unary_unary(RUN_EXPERT)

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """inputs: expert id → hidden [n_e, D]; returns the outputs [n_e, D] of the experts that answered."""
        calls: dict[int, tuple[str, Any]] = {}
        for e, x in inputs.items():
            address = self.placement.get((layer, e))
            if address is None:
                self.fail(layer, e, "", "NOT_PLACED", "no device hosts this expert")
                continue
            req = ExpertRequest(layer, e, x, next(self._ids), self.timeout_s)
            future = self.stub(address).future(encode(req), timeout=self.timeout_s, metadata=self.metadata)
            calls[e] = (address, future)
        outputs = {}
        for e, (address, future) in calls.items():
            y = self.gather(layer, e, address, future, inputs[e])
            if y is not None:
                outputs[e] = y
        return outputs

    def gather(self, layer: int, e: int, address: str, future: Any, x: torch.Tensor) -> torch.Tensor | None:
        """One call's outputs, or None (recorded) when it failed."""
        try:
            resp = decode_response(future.result())
        except grpc.RpcError as err:
            self.fail(layer, e, address, err.code().name, str(err.details()))
            return None
        except WireError as err:
            self.fail(layer, e, address, "WIRE", str(err))
            return None
        if resp.outputs.shape != x.shape:
            got = f"outputs {list(resp.outputs.shape)} for hidden {list(x.shape)}"
            self.fail(layer, e, address, "WIRE", got)
            return None
        self.compute_s[(layer, e)] = resp.compute_s
        return resp.outputs.to(x.dtype)

    def fail(self, layer: int, e: int, address: str, code: str, message: str) -> None:
        self.failures.append(Failure(layer, e, address, code, message))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> "RemoteDispatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
