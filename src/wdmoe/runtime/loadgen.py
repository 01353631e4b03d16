"""A load generator against a running BS: requests sent at given arrival times, each timed from
its sending to its first text and to its final message.

For each arrival time a thread starts at that wall time (measured from the run's start) and calls
``Generate`` (greedy) on its own connection; request i asks ``prompts[i mod len(prompts)]``.
Recorded per request (:class:`~wdmoe.serving.load.LoadRecord`, ``face="runtime"``): arrival_s (when
it was sent, s from the run's start), ttft_s (sent → first text message), finished_s (the done
message), new_tokens and the BS's metrics (expert calls dropped, predicted decode step). A request
the BS turns away (RESOURCE_EXHAUSTED: its --max-active and --max-queue are full) is "refused";
any other error "failed", with the error's text.
"""

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import numpy as np

from wdmoe.runtime import api
from wdmoe.runtime.client import BSClient, BSError
from wdmoe.runtime.security import TLSFiles
from wdmoe.serving.load import LoadRecord

RecordSink = Callable[[LoadRecord], None]


@dataclass(frozen=True)
class LoadTarget:
    """Where the requests go and how each is made: the BS's HOST:PORT and token, TLS files,
    ``max_new_tokens`` per request, ``timeout_s``: one request's whole deadline (s),
    ``config``: copied into every record (what the report shows beside the figures)."""

    address: str
    token: str
    tls: TLSFiles | None = None
    max_new_tokens: int = 32
    timeout_s: float = 600.0
    config: Mapping[str, Any] = field(default_factory=dict)


def refused(err: BaseException) -> bool:
    """Whether a Generate error is the BS's refusal for lack of room (RESOURCE_EXHAUSTED)."""
    cause = err.__cause__
    if isinstance(cause, grpc.RpcError) and hasattr(cause, "code"):
        return bool(cause.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    return "RESOURCE_EXHAUSTED" in str(err)


class _Timer:
    """Timestamps of one request (s from the run's start ``t0``, time.perf_counter)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.first_text_s: float | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def on_text(self, piece: str) -> None:
        if self.first_text_s is None and piece:
            self.first_text_s = self.now()


def one_request(
    target: LoadTarget, index: int, prompt: str, t0: float, rate_per_s: float | None
) -> LoadRecord:
    """Send request ``index`` now and wait for its end; every outcome becomes a record."""
    timer = _Timer(t0)
    record = partial(LoadRecord, "runtime", rate_per_s, index, config=target.config)
    req = api.GenerateRequest(prompt, max_new_tokens=target.max_new_tokens, temperature=0.0)
    arrival_s = timer.now()
    try:
        with BSClient(target.address, target.token, target.tls) as client:
            metrics = client.generate(req, timer.on_text, timeout_s=target.timeout_s)
    except Exception as err:  # a load run records every outcome; none may end the run
        status = "refused" if isinstance(err, BSError) and refused(err) else "failed"
        return record(
            arrival_s=arrival_s,
            ttft_s=None if timer.first_text_s is None else timer.first_text_s - arrival_s,
            finished_s=None,
            new_tokens=0,
            status=status,
            error=" ".join(str(err).split()) or type(err).__name__,
        )
    finished_s = timer.now()
    ttft = None if timer.first_text_s is None else timer.first_text_s - arrival_s
    new_tokens = int(metrics.get("new_tokens", 0))
    predicted = metrics.get("token_predicted_s")
    return record(
        arrival_s=arrival_s,
        ttft_s=ttft,
        finished_s=finished_s,
        new_tokens=new_tokens,
        status="ok",
        dropped_experts=int(metrics.get("dropped", -1)),
        predicted_token_s=None if predicted is None or new_tokens < 2 else float(predicted),
    )


def run_load(
    target: LoadTarget,
    arrivals_s: np.ndarray,
    prompts: Sequence[str],
    rate_per_s: float | None = None,
    skip: Collection[int] = (),
    on_record: RecordSink | None = None,
) -> list[LoadRecord]:
    """Send request i at wall time ``arrivals_s[i]`` (s from now) unless i is in ``skip``; wait for
    every one; return their records in request order. ``on_record`` is called (one at a time, from
    the requests' threads) as each request ends. ``rate_per_s``: λ to record (None: a trace)."""
    if not prompts:
        raise ValueError("no prompts to send")
    records: list[LoadRecord] = []
    lock = threading.Lock()

    def request(i: int, t0: float) -> None:
        record = one_request(target, i, prompts[i % len(prompts)], t0, rate_per_s)
        with lock:
            records.append(record)
            if on_record is not None:
                on_record(record)

    threads = []
    t0 = time.perf_counter()
    for i, at_s in enumerate(arrivals_s):
        if i in skip:
            continue
        delay_s = float(at_s) - (time.perf_counter() - t0)
        if delay_s > 0:
            time.sleep(delay_s)
        thread = threading.Thread(target=request, args=(i, t0), name=f"load-{i}", daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()  # each ends by its request's deadline (target.timeout_s) at the latest
    return sorted(records, key=lambda r: r.request)
