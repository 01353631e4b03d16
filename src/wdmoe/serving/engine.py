"""Continuous batching: several users' requests served by one model, one decode forward per step.

A :class:`Job` is one request: its prompt ids, how to pick tokens, and a callback for each new
token. :class:`Engine` keeps a running :class:`~wdmoe.serving.batch.Batch`; every :meth:`Engine.step`

1. admits waiting jobs up to ``max_batch`` running rows: each is prefilled alone (its prompt's
   tokens are real, none padding, so the MoE layers carry only work a BS would send), picks its
   first token and joins the batch;
2. runs one decode forward for all running rows (one token each): at every MoE layer each device
   gets one message carrying every user's tokens;
3. hands each row its token; rows that finished (end-of-sequence, ``max_new_tokens``, an error in
   their callback such as a user gone away) leave.

Every forward is annotated with :func:`~wdmoe.models.requests.serving_rows` (the job's ``tag``
per row and its cached tokens), so whoever accounts the forwards — the simulator's clock, the BS's
books — charges each request its share and times each step once. Greedy answers are those of
each request alone (tests/test_serving.py checks them against :func:`wdmoe.generate.generate`).

The engine runs in one thread (the BS's serving thread, or the simulator's loop); ``submit`` and
``cancel`` may be called from any thread.
"""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from wdmoe.errors import WdmoeError
from wdmoe.models.install import WirelessModel
from wdmoe.models.requests import serving_rows
from wdmoe.serving.batch import Batch, joinable, sample, single


class JobFailed(WdmoeError):
    """A request's forward failed; the message says why (the other requests go on)."""


@dataclass(eq=False)
class Job:
    """One request. ``prompt`` [T] token ids; ``on_token(id)`` is called in the engine's thread for
    every new token (raising there ends this job with that error, not the others); ``tag``: what
    the accountant of each forward keeps for this request. After ``done`` is set: ``tokens`` (the
    end-of-sequence token included when one ended it), ``error`` (None on success)."""

    prompt: torch.Tensor
    max_new_tokens: int
    on_token: Callable[[int], None] | None = None
    tag: Any = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed) if self.temperature > 0 else None

    @property
    def context(self) -> int:
        """Tokens this request has cached once its newest token is fed."""
        return int(self.prompt.numel()) + len(self.tokens) - 1

    def wait(self, timeout_s: float | None = None) -> list[int]:
        """Block until the job ends; its tokens, or its error raised here."""
        if not self.done.wait(timeout_s):
            raise TimeoutError(f"the request did not finish within {timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.tokens


def eos_ids(wm: WirelessModel, tok: Any = None) -> frozenset[int]:
    """The tokens that end a sequence: the model's generation config's, else the tokenizer's."""
    eos = getattr(getattr(wm.model, "generation_config", None), "eos_token_id", None)
    if eos is None and tok is not None:
        eos = tok.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class Engine:
    """Continuous batching over a wdmoe-installed model (see the module doc)."""

    def __init__(self, wm: WirelessModel, eos: frozenset[int], max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.wm, self.eos, self.max_batch = wm, eos, max_batch
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.batch: Batch | None = None
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.forwards = 0  # forwards run (prefills and decode steps)

    # --- from any thread ------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue ``job``; it joins the batch at the next step with room."""
        with self.wakeup:
            self.waiting.append(job)
            self.wakeup.notify()
        return job

    def busy(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.running)

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until a job is waiting or running (or ``timeout_s`` passes); whether one is."""
        with self.wakeup:
            if not (self.waiting or self.running):
                self.wakeup.wait(timeout_s)
            return bool(self.waiting or self.running)

    def fail_all(self, error: BaseException) -> None:
        """End every job with ``error`` (the server is stopping)."""
        with self.lock:
            jobs = list(self.waiting) + self.running
            self.waiting.clear()
        self.running, self.batch = [], None
        for job in jobs:
            self.finish(job, error)

    # --- the engine's thread ----------------------------------------------------------------

    def step(self) -> None:
        """Admit, decode once, hand out tokens, let finished rows leave (module doc)."""
        self.admit()
        if self.batch is not None and self.running:
            self.decode()
        self.leave()

    def admit(self) -> None:
        """Prefill waiting jobs alone while the batch has room; each joins with its first token."""
        while len(self.running) < self.max_batch:
            if self.running and self.batch is not None and not joinable(self.batch.cache):
                return  # a cache that cannot be batched: one running request at a time
            with self.lock:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            try:
                cache, token = self.prefill(job)
            except Exception as err:
                self.finish(job, as_failure(err))
                continue
            if self.give(job, token):
                self.join(job, cache, token)

    def prefill(self, job: Job) -> tuple[DynamicCache, int]:
        ids = job.prompt.reshape(1, -1)
        cache = DynamicCache(config=self.wm.model.config)
        with torch.no_grad(), serving_rows([job.tag], [0]):
            out = self.wm.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.forwards += 1
        return out.cache, sample(out.logits[0, -1], job.temperature, job.top_p, job.generator)

    def join(self, job: Job, cache: DynamicCache, token: int) -> None:
        if self.batch is None or not self.running:
            self.batch = single(cache, token)
        else:
            self.batch.join(cache, token)
        self.running.append(job)

    def decode(self) -> None:
        """One forward for every running row; a failure ends every job in it."""
        batch = self.batch
        assert batch is not None
        contexts = [job.context for job in self.running]
        try:
            with torch.no_grad(), serving_rows([job.tag for job in self.running], contexts):
                out = self.wm.model(
                    **batch.step_inputs(), cache=batch.cache, use_cache=True, logits_to_keep=1
                )
        except Exception as err:
            for job in self.running:
                self.finish(job, as_failure(err))
            self.running, self.batch = [], None
            return
        self.forwards += 1
        batch.cache = out.cache
        for b, job in enumerate(self.running):
            if job.done.is_set():
                continue
            token = sample(out.logits[b, -1], job.temperature, job.top_p, job.generator)
            batch.last[b] = token
            self.give(job, token)

    def give(self, job: Job, token: int) -> bool:
        """Hand ``job`` its token; whether it goes on (else it is finished here)."""
        job.tokens.append(token)
        try:
            if job.on_token is not None:
                job.on_token(token)
        except BaseException as err:
            self.finish(job, err)
            return False
        if token in self.eos or len(job.tokens) >= job.max_new_tokens:
            self.finish(job, None)
            return False
        return True

    def leave(self) -> None:
        """Rows whose jobs ended leave the batch."""
        keep = [b for b, job in enumerate(self.running) if not job.done.is_set()]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[b] for b in keep]
        if not keep:
            self.batch = None
        elif self.batch is not None:
            self.batch.keep(keep)

    @staticmethod
    def finish(job: Job, error: BaseException | None) -> None:
        job.error = error
        job.done.set()

    def run(self, stop: threading.Event, idle_s: float = 0.1) -> None:
        """Serve until ``stop`` is set (the BS's serving thread); jobs left then fail."""
        while not stop.is_set():
            if self.wait_for_work(idle_s):
                self.step()
        self.fail_all(JobFailed("the server stopped before this request finished"))


def as_failure(err: Exception) -> BaseException:
    """A forward's error as the job's: wdmoe's own errors as they are, anything else wrapped."""
    return err if isinstance(err, WdmoeError) else JobFailed(f"the forward failed: {err!r}")
