"""The lm-eval model ``wdmoe``: lm-eval's own HFLM scoring a model with wdmoe installed, in a simulated cell.

    lm_eval.simple_evaluate(
        model="wdmoe",
        model_args="policy=wdmoe,theta=0.1,scenario=paper,top_k=7,allocator=minmax,seed=0",
        tasks=["wdmoe_arc_easy"], task_manager=local_task_manager(folder),
    )

Scoring is HFLM's, unchanged (its tokenisation, batching, truncation and metrics): only the model
differs. Every request batch lm-eval hands over runs with a :class:`~wdmoe.simulate.Simulation`
of the scenario's cell attached, so channel-aware policies (``wdmoe``, ``budget``, …) see the
channel, and every forward is priced on it; a forward without a KV cache starts a new simulated
request, as in ``wdmoe eval``. ``lm.latency`` holds the summary so far (``latency_summary`` of
``lm.sim.records``); it is logged after each request batch.

model_args: ``model`` ('default' or a local checkpoint folder), ``policy`` (a registered name),
``theta`` and the policy's other parameters by name (e.g. ``tau_s`` for ``budget``), ``top_k``,
``scenario`` (preset or .toml), ``overrides`` (dotted scenario overrides separated by ``;``,
e.g. ``overrides=cell.bandwidth_hz=10e6;cell.num_devices=4``), ``allocator``, ``seed``, and any
parameter of HFLM itself (``batch_size``, ``max_length``, …) except ``pretrained`` / ``tokenizer``.
They make a :class:`~wdmoe.studies.runner.EvalPoint`, recorded as ``wdmoe eval`` records its run;
the values of a model_args string are read as `--set` reads its own (:func:`wdmoe.config.parse_value`).
"""

import inspect
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from wdmoe.allocation import make_allocator
from wdmoe.config import ScenarioConfig, parse_assignment
from wdmoe.errors import ConfigError
from wdmoe.eval.results import latency_summary
from wdmoe.models.install import WirelessModel, install
from wdmoe.models.loading import DEFAULT, load_checkpoint
from wdmoe.policies import POLICIES
from wdmoe.simulate import SimSettings, Simulation
from wdmoe.studies.runner import EvalPoint, PolicySpec

log = logging.getLogger(__name__)

WDMOE_ARGS = ("model", "policy", "theta", "top_k", "scenario", "overrides", "allocator", "seed")
HFLM_ARGS = tuple(p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs"))
SET_BY_WDMOE = ("pretrained", "tokenizer")  # the loaded model and its tokenizer


@dataclass(frozen=True)
class ModelArgs:
    """lm-eval's model_args, checked: ``point``, the evaluation point wdmoe's arguments describe
    (model, policy with θ and top-k, scenario, simulation), and ``hflm``, HFLM's own arguments."""

    point: EvalPoint
    hflm: Mapping[str, Any]


def as_text(name: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"model_args {name}={value!r} must be a name or a path")
    return str(value)


def as_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"model_args {name}={value!r} must be an integer ≥ {lo}")
    return value


def as_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"model_args {name}={value!r} must be a number")
    return float(value)


def policy_parameters(policy: str) -> tuple[str, ...]:
    """The keyword parameters of a registered policy (its dataclass fields but ``name``)."""
    params = inspect.signature(POLICIES.get(policy)).parameters
    return tuple(p for p in params if p not in ("name", "state"))


def parse_arg_string(text: str) -> dict[str, Any]:
    """``policy=wdmoe,theta=0.1,overrides=a.b=1;c.d=2`` → {"policy": "wdmoe", "theta": 0.1, …}:
    comma-separated NAME=VALUE pairs, each value read as `--set` and `--param` read theirs."""
    pairs = [p for p in text.split(",") if p.strip()]
    example = "(e.g. policy=wdmoe,theta=0.1)"
    return dict(parse_assignment(p, f"model_args {p!r} is not NAME=VALUE {example}") for p in pairs)


def split_args(policy: str, rest: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arguments that are not wdmoe's own → (the policy's, HFLM's); others are errors."""
    accepted = policy_parameters(policy)  # an unknown policy raises here, naming it and the known ones
    params: dict[str, Any] = {}
    hf: dict[str, Any] = {}
    for key, value in rest.items():
        if key in WDMOE_ARGS and key != "theta":
            continue
        if key in accepted:
            params[key] = as_number(key, value) if key == "theta" else value
        elif key == "theta":
            raise ConfigError(
                f"model_args theta={value!r}: policy {policy!r} has no θ "
                f"(its parameters: {', '.join(accepted) or 'none'}); use e.g. policy=wdmoe"
            )
        elif key in HFLM_ARGS and key not in SET_BY_WDMOE:
            hf[key] = value
        else:
            raise ConfigError(
                f"unknown model_args {key}={value!r}; wdmoe takes {', '.join(WDMOE_ARGS)}, policy "
                f"{policy!r} takes {', '.join(accepted) or 'no parameter'}, and HFLM's own (e.g. batch_size)"
            )
    return params, hf


def parse_model_args(raw: Mapping[str, Any]) -> ModelArgs:
    """lm-eval's model_args → wdmoe's evaluation point and HFLM's own arguments, checked. Errors
    name the argument and its value; theta=None is no θ."""
    raw = {k: v for k, v in raw.items() if k != "theta" or v is not None}
    policy = as_text("policy", raw.get("policy", "topk"))
    params, hf = split_args(policy, raw)
    top_k = None if raw.get("top_k") is None else as_int("top_k", raw["top_k"], 1)
    overrides = as_text("overrides", raw.get("overrides", "")).split(";")
    point = EvalPoint(
        model=as_text("model", raw.get("model", DEFAULT)),
        policy=PolicySpec(policy, params, top_k),
        scenario=as_text("scenario", raw.get("scenario", "paper")),
        overrides=tuple(o.strip() for o in overrides if o),
        sim=SimSettings(
            allocator=as_text("allocator", raw.get("allocator", "equal")),
            seed=as_int("seed", raw.get("seed", 0), 0),
            split_rows=True,  # as `wdmoe eval` scores: every row of a batch is its own request
        ),
    )
    make_allocator(point.sim.allocator)  # an unknown allocator raises now, not after the model has loaded
    return ModelArgs(point, hf)


@register_model("wdmoe")
class WdmoeLM(HFLM):  # type: ignore[misc]  # HFLM is untyped
    """HFLM on ``load_checkpoint(model)`` with wdmoe installed and the scenario's cell simulated."""

    def __init__(self, **model_args: Any) -> None:
        device = model_args.pop("device", None)  # lm-eval's CLI passes cuda:0 unless told otherwise
        if device not in (None, "cpu"):
            log.info("device=%s ignored: wdmoe runs the model on the CPU (where it is simulated)", device)
        args = parse_model_args(model_args)
        point = args.point
        policy = point.policy.build()
        scenario = point.load_scenario()
        net, tok = load_checkpoint(point.model)
        wm = install(net, policy)
        if point.policy.top_k is not None:
            wm.set_top_k(point.policy.top_k)
        sim = Simulation(wm, scenario, point.sim)  # checks that the scenario describes this model
        super().__init__(pretrained=net, tokenizer=tok, **args.hflm)
        self.args: ModelArgs = args
        self.wm: WirelessModel = wm
        self.scenario: ScenarioConfig = scenario
        self.sim: Simulation = sim
        self.latency: dict[str, Any] = latency_summary([])
        self._depth = 0

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "WdmoeLM":
        """As LM's, but a value in model_args (e.g. batch_size) wins over the CLI's default for it,
        and the values are read as wdmoe's `--set` and `--param` read theirs."""
        args = parse_arg_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict | None = None
    ) -> "WdmoeLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def config(self) -> dict[str, Any]:
        """The resolved configuration, for result records: the run's part of what ``wdmoe eval``
        writes (the same code), without wdmoe's item and scoring settings."""
        return self.args.point.run_config(self.scenario, self.wm.top_k)

    @contextmanager
    def accounted(self) -> Iterator[Simulation]:
        """Run forwards inside the simulation (re-entrant); then refresh and log ``latency``."""
        if self._depth:
            yield self.sim
            return
        self._depth += 1
        try:
            with self.sim.attached():  # every forward without cached tokens starts a new request
                yield self.sim
        finally:
            self._depth -= 1
        self.latency = latency_summary(self.sim.records)
        log.info("wdmoe simulated latency (%s): %s", self.label(), brief(self.latency))

    def label(self) -> str:
        spec, sim = self.args.point.policy, self.args.point.sim
        params = ",".join(f"{k}={v}" for k, v in spec.params.items())
        policy = f"{spec.name}({params})" if params else spec.name
        return f"{policy}, top-{self.wm.top_k}, {self.scenario.name}, {sim.allocator}, seed {sim.seed}"

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        with self.accounted():
            result: list[tuple[float, bool]] = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        return result

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        with self.accounted():
            result: list[float] = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        return result

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        with self.accounted():
            result: list[str] = super().generate_until(requests, disable_tqdm=disable_tqdm)
        return result


def brief(latency: Mapping[str, Any]) -> str:
    """The headline numbers of a latency summary, for a log line (ms; rates as fractions)."""
    if not latency.get("requests"):
        return "no request"
    ms = " ".join(f"{k.removesuffix('_s')} {latency[k] * 1e3:.2f}" for k in ("mean_s", "p50_s", "p99_s"))
    return (
        f"{latency['requests']} requests, ms: {ms}; drop rate {latency['drop_rate']:.3f}, "
        f"retained mass {latency['retained_mass']:.3f}"
    )
