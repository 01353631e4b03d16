"""Latency under load in the simulator: requests arriving at given times, served by continuous
batching (:class:`~wdmoe.serving.engine.Engine`) on the simulated cell.

The BS's serving loop on the simulated clock: every request that has arrived by the clock joins
the engine's queue; a step prefills newcomers (each alone) and decodes every running request
in one forward; each forward is priced by the simulator (:class:`~wdmoe.simulate.Simulation`,
rows of one forward priced together: one message per device and layer for all users' tokens)
and advances the clock. With nothing to do, the clock jumps to the next arrival (the channel goes
on moving). Each request's first token and its end are stamped at the end of the forward that
produced them. Up to ``max_batch`` requests run at once; ``max_queue`` more may wait (beyond that
a request is refused, as the BS refuses it); requests beyond both wait nowhere.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from wdmoe.config import ScenarioConfig
from wdmoe.generate import check_fits, encode_prompt
from wdmoe.models.install import WirelessModel
from wdmoe.serving.engine import Engine, Job, eos_ids
from wdmoe.serving.load import LoadRecord
from wdmoe.simulate import SimSettings, Simulation


@dataclass
class Served:
    """One request on the simulated clock: when it arrived, got its first token, ended; the expert
    pairs lost while serving it; its decode steps' times (s)."""

    index: int
    arrival_s: float
    first_s: float | None = None
    end_s: float | None = None
    lost: float = 0.0
    steps_s: list[float] = field(default_factory=list)


class LoadRun:
    """One run of :func:`simulate_load`: the simulation, the engine, the records so far."""

    def __init__(
        self,
        sim: Simulation,
        engine: Engine,
        rate_per_s: float | None,
        config: dict[str, Any],
        on_record: Callable[[LoadRecord], None] | None,
    ) -> None:
        self.sim, self.engine, self.rate_per_s, self.config = sim, engine, rate_per_s, config
        self.on_record = on_record
        self.records: list[LoadRecord] = []
        self.pending: list[tuple[Served, Job]] = []

    def record(self, served: Served, job: Job | None, status: str) -> None:
        steps = served.steps_s[1:]
        why = {"ok": "", "refused": "the BS's queue was full (max_batch running, max_queue waiting)"}
        rec = LoadRecord(
            "sim",
            self.rate_per_s,
            served.index,
            served.arrival_s,
            None if served.first_s is None else served.first_s - served.arrival_s,
            served.end_s,
            len(job.tokens) if job is not None else 0,
            status,
            why.get(status, str(job.error if job is not None else "")),
            round(served.lost),
            float(np.mean(steps)) if steps else None,
            self.config,
        )
        self.records.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    def on_token(self, served: Served) -> Callable[[int], None]:
        """Stamp a token of ``served`` at the end of the forward that produced it."""

        def seen(_: int) -> None:
            sim = self.sim
            served.first_s = sim.time_s if served.first_s is None else served.first_s
            served.end_s = sim.time_s
            for tag, step in zip(sim.batch_tags, sim.batch_records, strict=True):
                if tag is served:
                    served.lost += step.lost_tokens
                    served.steps_s.append(step.total_s)

        return seen

    def arrive(self, served: Served, prompt: Any, max_new_tokens: int, max_queue: int) -> None:
        """A request at the BS: it waits for the batch, or is refused when the queue is full."""
        engine = self.engine
        if len(engine.waiting) >= max_queue and len(engine.running) >= engine.max_batch:
            self.record(served, None, "refused")
            return
        job = Job(prompt, max_new_tokens, self.on_token(served), tag=served)
        self.pending.append((served, engine.submit(job)))

    def settle(self) -> None:
        """Record the requests that ended in the last step."""
        for served, job in [p for p in self.pending if p[1].done.is_set()]:
            self.pending.remove((served, job))
            served.end_s = served.end_s if job.error is None else None
            self.record(served, job, "ok" if job.error is None else "failed")


def simulate_load(
    wm: WirelessModel,
    tok: PreTrainedTokenizerBase,
    scenario: ScenarioConfig,
    settings: SimSettings,
    *,
    prompts: Sequence[str],
    arrivals_s: Any,
    max_new_tokens: int,
    max_batch: int = 16,
    max_queue: int = 256,
    rate_per_s: float | None = None,
    on_record: Callable[[LoadRecord], None] | None = None,
) -> list[LoadRecord]:
    """Serve request i (prompt ``prompts[i mod len]``, greedy, chat template) arriving at
    ``arrivals_s[i]`` simulated seconds; one :class:`~wdmoe.serving.load.LoadRecord` per request
    (face "sim"), handed to ``on_record`` as each ends (module doc)."""
    arrivals = np.sort(np.asarray(arrivals_s, dtype=float))
    ids = [encode_prompt(tok, prompts[i % len(prompts)], True, None)[0] for i in range(len(arrivals))]
    for x in ids:
        check_fits(wm, int(x.numel()), max_new_tokens)
    sim = Simulation(wm, scenario, settings)
    config = {"max_batch": max_batch, "max_queue": max_queue, "max_new_tokens": max_new_tokens}
    run = LoadRun(sim, Engine(wm, eos_ids(wm, tok), max_batch), rate_per_s, config, on_record)
    with sim.attached():
        i = 0
        while i < len(arrivals) or run.engine.busy():
            while i < len(arrivals) and arrivals[i] <= sim.time_s:
                run.arrive(Served(i, float(arrivals[i])), ids[i], max_new_tokens, max_queue)
                i += 1
            if not run.engine.busy():
                sim.time_s = max(sim.time_s, float(arrivals[i]))  # idle until the next arrival
                continue
            run.engine.step()
            run.settle()
    return run.records
