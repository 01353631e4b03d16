"""What `wdmoe reproduce` runs: its settings, the points in run order, what a run produced."""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wdmoe.errors import ConfigError
from wdmoe.eval.harness import EvalSettings
from wdmoe.eval.tasks import get_task
from wdmoe.simulate import SimSettings
from wdmoe.studies.latency_study import DEFAULT_THETAS as STUDY_THETAS
from wdmoe.studies.latency_study import STUDY_PRESETS, StudyRow
from wdmoe.studies.report import policy_label
from wdmoe.studies.runner import EvalPoint, PolicySpec

PAPER_TASKS = ("arc_easy", "piqa", "winogrande", "boolq", "arc_challenge", "gsm8k")
PAPER_THETAS = (0.05, 0.1, 0.2, 0.3)
# Sized for ≲ 40 min on 2 CPU cores, one torch thread, default model. Measured s/item (quiet machine
# / machine loaded by other jobs): arc_easy 0.7 / 1.2, piqa 0.8 / 1.7, winogrande 0.3 / 0.9, boolq
# 2.5 / 5.7, arc_challenge 0.6 / 1.3, gsm8k ≈ 0.1 / 0.2 s per new token. × 10 configs: 20 items and
# 2 GSM8K questions of ≤ 96 tokens take ≈ 20 min (quiet) to ≈ 42 min (loaded); the study ≈ 1 min.
# Beyond the paper (issue 14), `--beyond NAME,…`: published baselines and the straggler-aware
# policy, each at the setting its measurements chose (benchmarks/dominance.py), and two cell
# variants run with WDMoE at θ = 0.1 (or the first θ): activations sized to the link (the adaptive
# wire format) and experts placed by `wdmoe plan` (needs --placement FILE).
BEYOND: dict[str, tuple[str, dict[str, Any]]] = {
    "dynskip": ("dynskip", {"calibration": "default"}),  # arXiv 2402.14800, β_l on calibration text
    "capacity": ("capacity", {"gamma": 1.0}),  # arXiv 2503.05066, score-based drop
    "marginal": ("marginal", {"price_per_ms": 0.3, "protect_top1": False}),
}
BEYOND_CELLS = ("adaptive", "placement")
Variant = tuple[str, dict[str, Any], tuple[str, ...]]  # policy, its params, scenario overrides
DEFAULT_LIMIT = 20
DEFAULT_GSM8K_LIMIT = 2
DEFAULT_MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class ReproduceSettings:
    """What `wdmoe reproduce` runs. ``seeds``: channel trace seeds (every point runs on each; the
    latency study on the first); ``limit``: items per task (None: all); generation tasks (GSM8K)
    use ``gsm8k_limit`` and ``max_new_tokens`` instead; ``task_limits``: (task, items) pairs that
    replace either limit for that task; ``study_prompts``: prompts per task for the Mixtral
    latency study (0: skip it); ``study_presets``: model presets (configs/models) whose
    dimensions the study also prices the same router scores at."""

    tasks: tuple[str, ...] = PAPER_TASKS
    thetas: tuple[float, ...] = PAPER_THETAS
    allocators: tuple[str, ...] = ("equal", "minmax")
    k_scaled: bool = True
    model: str = "default"
    scenario: str = "paper"
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    limit: int | None = DEFAULT_LIMIT
    gsm8k_limit: int | None = DEFAULT_GSM8K_LIMIT
    task_limits: tuple[tuple[str, int], ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    out_dir: Path = Path("docs/reproduce")
    data_dir: Path | None = None
    batch_size: int = 16
    study_prompts: int = 20
    study_thetas: tuple[float, ...] = STUDY_THETAS
    study_presets: tuple[str, ...] = STUDY_PRESETS
    beyond: tuple[str, ...] = ()
    placement: Path | None = None

    def __post_init__(self) -> None:
        allowed = (*BEYOND, *BEYOND_CELLS)
        unknown = [b for b in self.beyond if b not in allowed]
        if unknown:
            raise ConfigError(f"--beyond {','.join(unknown)}: unknown; allowed: {', '.join(allowed)}")
        if "placement" in self.beyond and (self.placement is None or not Path(self.placement).is_file()):
            raise ConfigError(
                f"--beyond placement needs --placement FILE (a plan of `wdmoe plan`); got {self.placement}"
            )
        if not self.tasks:
            raise ConfigError("--tasks is empty; give e.g. arc_easy,piqa")
        if not self.thetas or any(not 0.0 < t <= 1.0 for t in self.thetas):
            raise ConfigError(f"--thetas = {list(self.thetas)} is out of range; allowed: values in (0, 1]")
        if not self.allocators:
            raise ConfigError("--allocators is empty; give e.g. equal,minmax")
        for name, value in (("--limit", self.limit), ("--gsm8k-limit", self.gsm8k_limit)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} = {value} is out of range; allowed: ≥ 1 (or unset: all items)")
        if self.max_new_tokens < 1 or self.study_prompts < 0:
            raise ConfigError(
                f"--max-new-tokens must be ≥ 1 and --study-prompts ≥ 0, got "
                f"{self.max_new_tokens} and {self.study_prompts}"
            )
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds = {list(self.seeds)} is invalid; allowed: distinct integers ≥ 0")
        self.check_task_limits()

    def check_task_limits(self) -> None:
        names = [task for task, _ in self.task_limits]
        for task, items in self.task_limits:
            flag = f"--task-limit {task}={items}"
            if task not in self.tasks:
                raise ConfigError(f"{flag}: {task!r} is not one of --tasks ({', '.join(self.tasks)})")
            if items < 1:
                raise ConfigError(f"{flag}: {items} items is out of range; allowed: ≥ 1")
            if names.count(task) > 1:
                raise ConfigError(f"--task-limit names {task!r} twice; give one limit per task")

    def limit_for(self, task: str) -> int | None:
        """Items of ``task``: its ``task_limits`` entry, else ``gsm8k_limit`` (generation) or ``limit``."""
        own = dict(self.task_limits)
        if task in own:
            return own[task]
        return self.gsm8k_limit if is_generation(task) else self.limit


def parse_task_limit(text: str) -> tuple[str, int]:
    """``"boolq=100"`` → ("boolq", 100); anything else raises a ConfigError naming ``text``."""
    task, sep, raw = text.partition("=")
    if not sep or not task.strip():
        raise ConfigError(f"--task-limit {text!r} is malformed; allowed: TASK=ITEMS (e.g. boolq=100)")
    try:
        return task.strip(), int(raw)
    except ValueError:
        raise ConfigError(
            f"--task-limit {text!r}: {raw.strip()!r} is not a whole number of items (e.g. boolq=100)"
        ) from None


def policies(settings: ReproduceSettings) -> list[Variant]:
    """Vanilla topk, WDMoE-θ for each θ, then the ``beyond`` policies and cell variants."""
    wdmoe = [("wdmoe", {"theta": t, "k_scaled": settings.k_scaled}, ()) for t in settings.thetas]
    out: list[Variant] = [("topk", {}, ()), *wdmoe]
    theta = 0.1 if 0.1 in settings.thetas else settings.thetas[0]
    for name in settings.beyond:
        if name in BEYOND:
            out.append((*BEYOND[name], ()))
            continue
        cell = "wire.format=adaptive" if name == "adaptive" else f"cell.placement={settings.placement}"
        out.append(("wdmoe", {"theta": theta, "k_scaled": settings.k_scaled}, (cell,)))
    return out


def is_generation(task: str) -> bool:
    return get_task(task).kind == "generate_exact"


def sim_settings(allocator: str, seed: int) -> SimSettings:
    """The simulation of every point: the allocator and seed, the rest (deadline rule, a channel
    that moves layer by layer, perfect CSI) at SimSettings' defaults."""
    return SimSettings(allocator=allocator, seed=seed)


def point_for(
    settings: ReproduceSettings,
    task: str,
    policy: str,
    params: dict,
    allocator: str,
    seed: int,
    cell: tuple[str, ...] = (),
) -> EvalPoint:
    """The evaluation point of one (seed, task, policy, allocator); generation tasks get their own
    generation cap (the others keep the runner's default cap, unused by their scorers)."""
    scoring = EvalSettings(batch_size=settings.batch_size)
    if is_generation(task):
        scoring = replace(scoring, max_new_tokens=settings.max_new_tokens)
    return EvalPoint(
        model=settings.model,
        policy=PolicySpec(policy, params),
        scenario=settings.scenario,
        overrides=(*settings.overrides, *cell),
        sim=sim_settings(allocator, seed),
        scoring=scoring,
        limit=settings.limit_for(task),
        data_dir=settings.data_dir,
    )


def plan(settings: ReproduceSettings) -> list[tuple[str, EvalPoint]]:
    """(task, point) in run order: seed → task → allocator → policy, so that an interrupted run
    leaves whole tables, all of the first seed first."""
    return [
        (task, point_for(settings, task, name, params, allocator, seed, cell))
        for seed in settings.seeds
        for task in settings.tasks
        for allocator in settings.allocators
        for name, params, cell in policies(settings)
    ]


def point_label(task: str, point: EvalPoint, seeds: int) -> str:
    """``arc_easy · wdmoe θ=0.1 k-scaled · equal`` (``· seed 1`` when there are several seeds)."""
    label = f"{task} · {policy_label(point.policy.name, point.policy.params)} · {point.sim.allocator}"
    return label + (f" · seed {point.sim.seed}" if seeds > 1 else "")


@dataclass(frozen=True)
class Timing:
    """Wall seconds one (task, point) took (None: unknown); ``resumed``: its record was already
    there (its seconds then come from ``timings.jsonl``, when the run that made it wrote them)."""

    task: str
    label: str
    items: int
    seconds: float | None
    resumed: bool


@dataclass
class Outcome:
    """What a reproduction produced."""

    records: list[dict[str, Any]] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    study: list[StudyRow] = field(default_factory=list)
    study_seconds: float = 0.0
    wall_s: float = 0.0
    files: list[Path] = field(default_factory=list)
