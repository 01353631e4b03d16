"""Running a sweep: which points are left, worker processes (or Ray tasks), one writer.

Points run in worker processes (or Ray tasks), each keeping its model loaded; the workers return
records and the parent alone appends them, so lines never interleave. A point whose records are
all in the results file already is skipped, so a killed sweep restarted ends with the same file
as an uninterrupted one.
"""

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from wdmoe.errors import ConfigError
from wdmoe.eval.results import append_record, completed_keys, config_key
from wdmoe.studies.runner import EvalPoint, Evaluator


@cache
def native_top_k(model: str) -> int | None:
    """The router candidates ``model`` uses when a point gives none, read without loading weights
    (None when its config does not say: then the worker decides and the parent deduplicates)."""
    from transformers import AutoConfig

    from wdmoe.models.default import DEFAULT_TOP_K
    from wdmoe.models.loading import DEFAULT

    path = Path(model).expanduser()
    if model == DEFAULT or (path / "wdmoe.json").is_file():
        return DEFAULT_TOP_K
    try:
        k = getattr(AutoConfig.from_pretrained(path), "num_experts_per_tok", None)
    except (OSError, ValueError):  # loading the checkpoint will say what is wrong with it
        return None
    return int(k) if isinstance(k, int) else None


def point_keys(point: EvalPoint, tasks: Sequence[str]) -> list[str | None]:
    """The record key of each task for ``point`` (None where the model's top-k is not known)."""
    top_k = point.policy.top_k or native_top_k(point.model)
    if top_k is None:
        return [None for _ in tasks]
    config = point.resolved(point.load_scenario(), top_k)
    return [config_key(config, task) for task in tasks]


@dataclass(frozen=True)
class Job:
    """A point to run (its index in the expanded grid) and its tasks not in the results file yet."""

    index: int
    point: EvalPoint
    tasks: tuple[str, ...]


def plan(points: Sequence[EvalPoint], tasks: Sequence[str], out: Path) -> list[Job]:
    """The jobs left: points with a task whose record is not in ``out`` (nor claimed by an earlier
    point of the same key, e.g. a point listed twice)."""
    claimed = completed_keys(out)
    jobs = []
    for i, point in enumerate(points):
        keys = point_keys(point, tasks)
        todo = tuple(t for t, key in zip(tasks, keys, strict=True) if key is None or key not in claimed)
        claimed.update(k for k in keys if k is not None)
        if todo:
            jobs.append(Job(i, point, todo))
    return jobs


# --- running ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a worker hands back: the point's new records, or the error that stopped it."""

    records: tuple[dict[str, Any], ...] = ()
    error: str | None = None


@cache
def worker_evaluator(threads: int | None) -> Evaluator:
    """This process's evaluator (its model stays loaded between points); set its torch threads once."""
    import torch
    from transformers.utils import logging as hf_logging

    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return Evaluator()


def run_job(point: EvalPoint, tasks: tuple[str, ...], threads: int | None = None) -> Outcome:
    """Evaluate ``point`` on ``tasks`` in this process. Nothing is written to the results file: the
    evaluator writes to a scratch file and the records travel back to the parent."""
    try:
        with tempfile.TemporaryDirectory(prefix="wdmoe-sweep-") as scratch:
            records = worker_evaluator(threads).run(point, tasks, Path(scratch) / "records.jsonl")
    except Exception as e:  # any failure is this point's: reported with it, the sweep goes on
        return Outcome(error=f"{type(e).__name__}: {e}")
    return Outcome(records=tuple(records))


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


Outcomes = Generator[tuple[Job, Outcome], None, None]


def _inline(jobs: Sequence[Job]) -> Outcomes:
    for job in jobs:
        yield job, run_job(job.point, job.tasks)


def _process_pool(jobs: Sequence[Job], workers: int) -> Outcomes:
    """Spawned workers, each with cores // workers torch threads so that they do not oversubscribe."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        futures: dict[Future[Outcome], Job] = {
            pool.submit(run_job, job.point, job.tasks, threads): job for job in jobs
        }
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as e:  # the worker process died (killed, out of memory)
                outcome = Outcome(error=f"{type(e).__name__}: {e}")
            yield futures[future], outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ray(jobs: Sequence[Job], address: str, workers: int) -> Outcomes:
    """Ray tasks (one CPU, one torch thread each) on the cluster at ``address`` ('auto', 'local' or
    host:port); a Ray already initialised in this process is used as it is."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--ray-address needs Ray: pip install 'wdmoe[ray]'") from e
    started = not ray.is_initialized()
    if started:
        try:
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:
            raise ConfigError(f"cannot start or reach Ray at --ray-address {address!r}: {e}") from e
    try:
        task: Any = ray.remote(num_cpus=1)(run_job)
        pending = {task.remote(job.point, job.tasks, 1): job for job in jobs}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready)
            try:
                outcome = ray.get(ready)
            except Exception as e:  # the Ray worker died or the task was lost
                outcome = Outcome(error=f"{type(e).__name__}: {e}")
            yield job, outcome
    finally:
        if started:
            ray.shutdown()


@dataclass
class Writer:
    """The single writer of the results file: appends each record once (a key already written is
    dropped, so a point that ran twice or a wrong top-k guess never duplicates a line)."""

    out: Path
    written: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.written = completed_keys(self.out)

    def append(self, record: Mapping[str, Any]) -> bool:
        if record["key"] in self.written:
            return False
        append_record(self.out, record)
        self.written.add(str(record["key"]))
        return True


@dataclass(frozen=True)
class PointResult:
    """One finished job as the parent reports it: the records it wrote, or the error."""

    job: Job
    written: int
    error: str | None


def run_sweep(
    jobs: Sequence[Job],
    out: Path,
    workers: int | None = None,
    ray_address: str | None = None,
    on_result: Callable[[PointResult], None] | None = None,
) -> list[PointResult]:
    """Run ``jobs`` (one process when ``workers`` is 1; a spawned pool or Ray otherwise) and append
    their records to ``out`` as they complete; a failing job is reported and the others go on."""
    workers = workers or default_workers()
    if workers < 1:
        raise ConfigError(f"workers must be ≥ 1, got {workers}")
    writer = Writer(Path(out))
    if ray_address is not None:
        outcomes = _ray(jobs, ray_address, workers)
    elif workers == 1 or len(jobs) <= 1:
        outcomes = _inline(jobs)
    else:
        outcomes = _process_pool(jobs, min(workers, len(jobs)))
    results = []
    with contextlib.closing(outcomes):
        for job, outcome in outcomes:
            written = sum(writer.append(r) for r in outcome.records)
            results.append(PointResult(job, written, outcome.error))
            if on_result is not None:
                on_result(results[-1])
    return results
