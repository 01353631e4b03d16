"""Serving several users at once: continuous batching (:mod:`~wdmoe.serving.engine`) over the
running batch's caches (:mod:`~wdmoe.serving.batch`), used by the BS and by the simulator's load
study (:mod:`~wdmoe.serving.sim_load`)."""

from wdmoe.serving.engine import Engine, Job, JobFailed, eos_ids

__all__ = ["Engine", "Job", "JobFailed", "eos_ids"]


def __getattr__(name: str) -> object:
    """``simulate_load`` on first use (it imports the simulator and the load study)."""
    if name == "simulate_load":
        from wdmoe.serving.sim_load import simulate_load

        return simulate_load
    raise AttributeError(name)
