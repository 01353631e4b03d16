"""Serving several users at once: continuous batching (:mod:`~wdmoe.serving.engine`) over the
running batch's caches (:mod:`~wdmoe.serving.batch`), used by the BS and by the simulator's load
study (:mod:`~wdmoe.serving.sim_load`, import it from there); arrivals, records and the figures
of latency under load (:mod:`~wdmoe.serving.load`, pure)."""

from wdmoe.serving.engine import Engine, Job, JobFailed, eos_ids

__all__ = ["Engine", "Job", "JobFailed", "eos_ids"]

