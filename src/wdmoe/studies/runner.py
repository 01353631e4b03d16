"""One evaluation point run on tasks inside the simulation, its records appended to a resumable
JSON Lines file. Shared by `wdmoe eval`, `wdmoe sweep`, `wdmoe reproduce` and the lm-eval model.

A point is made of the settings each stage already takes, spelled once: the policy
(:class:`PolicySpec`), the simulation (:class:`~wdmoe.simulate.SimSettings`: allocator, channel
seed, CSI) and the scoring (:class:`~wdmoe.eval.harness.EvalSettings`), plus the model, the
scenario with its overrides, and which items (limit, data folder).

Latency per request: multiple-choice, WinoGrande, LAMBADA and perplexity scorers batch many
sequences into one forward; every row (one context + continuation, without padding) is accounted
as its own prefill request (``SimSettings.split_rows``) on the channel its batch met, layer by
layer. Generation tasks run one request at a time: a prefill, then one decode step per token.
"""

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wdmoe.config import ScenarioConfig, load_scenario
from wdmoe.errors import ConfigError
from wdmoe.eval.harness import EvalSettings, TaskResult, score_items
from wdmoe.eval.results import (
    append_record,
    completed_keys,
    config_key,
    latency_summary,
    make_record,
    read_records,
    record_key,
)
from wdmoe.eval.tasks import Item, Task, default_data_dir, get_task
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import load_checkpoint
from wdmoe.policies import Policy, make_policy
from wdmoe.simulate import SimSettings, Simulation

DEFAULT_MODEL_PRESET = "model=smollm2-moe8"


def scenario_overrides(model: str, overrides: Sequence[str]) -> list[str]:
    """The default model needs the smollm2-moe8 dimensions; the user's overrides come after."""
    return ([DEFAULT_MODEL_PRESET] if model == "default" else []) + list(overrides)


@dataclass(frozen=True)
class PolicySpec:
    """The policy of a point: its registered ``name``, its keyword ``params`` (e.g. {"theta": 0.1})
    and ``top_k``, the router's candidates per token (None: the model's own)."""

    name: str = "topk"
    params: Mapping[str, Any] = field(default_factory=dict)
    top_k: int | None = None

    def build(self) -> Policy:
        """The policy; an unknown name, parameter or value raises a ConfigError naming it."""
        return make_policy(self.name, **self.params)


def channel_seed_zero() -> SimSettings:
    """A point's simulation unless told otherwise: the channel trace of seed 0."""
    return SimSettings(seed=0)


@dataclass(frozen=True)
class EvalPoint:
    """Everything that decides a result, apart from the task. ``overrides``: dotted scenario
    overrides ("cell.bandwidth_hz=1e7"); ``sim.split_rows`` is set per task by the runner;
    ``limit``: items per task (None: all); ``data_dir``: the benchmark files (None: the default)."""

    model: str = "default"
    policy: PolicySpec = field(default_factory=PolicySpec)
    scenario: str = "paper"
    overrides: tuple[str, ...] = ()
    sim: SimSettings = field(default_factory=channel_seed_zero)
    scoring: EvalSettings = field(default_factory=EvalSettings)
    limit: int | None = None
    data_dir: Path | None = None

    def scenario_overrides(self) -> list[str]:
        return scenario_overrides(self.model, self.overrides)

    def load_scenario(self) -> ScenarioConfig:
        return load_scenario(self.scenario, self.scenario_overrides())

    def folder(self) -> Path:
        return (self.data_dir or default_data_dir()).resolve()

    def run_config(self, cfg: ScenarioConfig, top_k: int) -> dict[str, Any]:
        """What reproduces a simulated run of the model (the scenario fully resolved): the part of
        a record's ``config`` that the lm-eval model records too."""
        return {
            "model": self.model if self.model == "default" else str(Path(self.model).resolve()),
            "policy": {"name": self.policy.name, "params": dict(self.policy.params)},
            "top_k": top_k,
            "scenario": {
                "name": self.scenario,
                "overrides": self.scenario_overrides(),
                "resolved": cfg.to_dict(),
            },
            "allocator": self.sim.allocator,
            "csi": {"delay_blocks": self.sim.csi_delay_blocks, "error_std_db": self.sim.csi_error_std_db},
            "deadline": asdict(self.sim.deadline),
            "channel_moves": self.sim.channel_moves,
            "seeds": {"channel": self.sim.seed},
            **placement_digest(cfg),
        }

    def resolved(self, cfg: ScenarioConfig, top_k: int) -> dict[str, Any]:
        """The record's ``config``: the run's, then which items and how they are scored (the
        perplexity window only when one is set, so that older records keep their keys)."""
        scoring = self.scoring
        window = {"max_length": scoring.max_length, "stride": scoring.stride}
        return {
            **self.run_config(cfg, top_k),
            "limit": self.limit,
            "num_fewshot": 0,
            "batch_size": scoring.batch_size,
            "share_context": scoring.share_context,
            "max_new_tokens": scoring.max_new_tokens,
            "data_dir": str(self.folder()),
            **{k: v for k, v in window.items() if v is not None},
        }


def placement_digest(cfg: ScenarioConfig) -> dict[str, Any]:
    """A planned placement's content hash, so that a record's key changes when the file at
    ``cell.placement`` is re-planned in place (nothing when no placement is set: older keys hold)."""
    path = cfg.cell.placement
    if path is None or not Path(path).is_file():
        return {}
    return {"placement_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def evaluate_simulated(
    wm: WirelessModel, tok: Any, task: Task, items: Sequence[Item], cfg: ScenarioConfig, point: EvalPoint
) -> tuple[TaskResult, dict[str, Any]]:
    """Score ``items`` with every forward accounted on the scenario's channel trace (from t = 0)."""
    generate = task.kind == "generate_exact"
    sim = Simulation(wm, cfg, replace(point.sim, split_rows=not generate))
    settings = replace(point.scoring, batch_size=1) if generate else point.scoring
    with sim.attached():  # every forward without cached tokens starts a new request
        result = score_items(task, wm.model, tok, items, settings)
    return result, latency_summary(sim.records)


class Evaluator:
    """Runs points; keeps the last loaded model so that points on one model load it once."""

    def __init__(self, progress: Callable[[str, int, int], None] | None = None) -> None:
        self.progress = progress
        self.loaded: tuple[str, WirelessModel, Any, int] | None = None

    def model(self, point: EvalPoint) -> tuple[WirelessModel, Any]:
        """The point's model with its policy and top-k installed."""
        policy = point.policy.build()
        if self.loaded is None or self.loaded[0] != point.model:
            self.loaded = None  # free the previous model first
            net, tok = load_checkpoint(point.model, progress=self.progress)
            wm = install(net, policy)
            self.loaded = (point.model, wm, tok, wm.top_k)
        _, wm, tok, native_k = self.loaded
        wm.set_policy(policy)
        wm.set_top_k(point.policy.top_k or native_k)
        return wm, tok

    def run(
        self,
        point: EvalPoint,
        tasks: Sequence[str],
        out: Path,
        on_task: Callable[[str, bool], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Evaluate ``point`` on ``tasks``; append one record per task not yet in ``out``; return the
        point's records (old and new) in task order. ``on_task(name, skipped)`` reports each task.
        Bad input (an unknown task, a missing file, a bad field) fails before anything runs."""
        names = [get_task(t).name for t in tasks]
        if not names:
            raise ConfigError("no task given; e.g. arc_easy,piqa")
        cfg = point.load_scenario()
        folder = point.folder()
        items = {name: get_task(name).load(folder, point.limit) for name in names}
        done = completed_keys(out)
        records: dict[str, dict[str, Any]] = {}
        wm: WirelessModel | None = None
        for name in names:
            if wm is None:
                wm, tok = self.model(point)
            config = point.resolved(cfg, wm.top_k)
            key = config_key(config, name)
            if key in done:
                records[name] = next(r for r in reversed(read_records(out)) if record_key(r) == key)
            else:
                result, latency = evaluate_simulated(wm, tok, get_task(name), items[name], cfg, point)
                records[name] = make_record(config, result, latency)
                append_record(out, records[name])
            if on_task is not None:
                on_task(name, key in done)
        return [records[n] for n in names]
