"""`wdmoe demo`: vanilla top-k against WDMoE-θ on the same channel trace, side by side; with a
dashboard hub, every forward, answer and request is also published for the page
(:mod:`wdmoe.dashboard.sim`)."""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from wdmoe.config import ScenarioConfig
from wdmoe.dashboard.hub import Event, Hub
from wdmoe.dashboard.sim import request_events, watching
from wdmoe.dashboard.steps import cell_values
from wdmoe.generate import generate
from wdmoe.models.install import WirelessModel
from wdmoe.policies import Policy
from wdmoe.simulate import SimSettings, Simulation, StepRecord

PROMPTS = (
    "What is the capital of France?",
    "Give two tips for saving energy at home.",
)


@dataclass(frozen=True)
class RunSummary:
    """One policy's answers and simulated latency over the demo prompts."""

    policy: str
    texts: tuple[str, ...]
    ttft_s: float  # mean time to first token (prefill step)
    tpot_s: float  # mean time per output token (decode steps)
    total_s: float  # simulated end-to-end time of all answers
    drops_per_device: tuple[float, ...]  # dropped candidate tokens per device, all layers and steps
    experts_per_token: float
    down_per_device: tuple[float, ...] = ()  # share of (step, layer) times the device's link was down
    lost_per_device: tuple[int, ...] = ()  # calls lost to its link in outage, all layers and steps
    late_per_device: tuple[int, ...] = ()  # calls cut at their deadline, all layers and steps
    energy_per_device: tuple[float, ...] = ()  # J spent (compute + radio), all answers; () unknown


def summarise(
    policy: str, texts: list[str], records: list[StepRecord], experts_per_token: float
) -> RunSummary:
    prefill = [r.total_s for r in records if r.phase == "prefill"]
    decode = [r.total_s for r in records if r.phase == "decode"]
    drops = np.sum([r.dropped_tokens.sum(0) for r in records], axis=0)
    down = np.mean(np.concatenate([r.link_down for r in records]), axis=0)
    lost = np.sum([r.cut_down.sum(0) for r in records], axis=0)
    late = np.sum([r.cut_late.sum(0) for r in records], axis=0)
    spent = [r.compute_j + r.radio_j for r in records if r.compute_j is not None and r.radio_j is not None]
    energy = np.sum([e.sum(0) for e in spent], axis=0) if spent and len(spent) == len(records) else ()
    return RunSummary(
        policy,
        tuple(texts),
        float(np.mean(prefill)),
        float(np.mean(decode)) if decode else 0.0,
        float(sum(r.total_s for r in records)),
        tuple(float(d) for d in drops),
        experts_per_token,
        tuple(float(d) for d in down),
        tuple(int(n) for n in lost),
        tuple(int(n) for n in late),
        tuple(float(j) for j in energy),
    )


def run_policy(
    wm: WirelessModel,
    tok: PreTrainedTokenizerBase,
    scenario: ScenarioConfig,
    name: str,
    policy: Policy,
    settings: SimSettings,
    prompts: tuple[str, ...],
    max_new_tokens: int,
    on_text: Callable[[str], None],
    hub: Hub | None = None,
    pace_s: float = 0.0,
) -> RunSummary:
    """Answer ``prompts`` with ``policy``; the simulation starts at time 0 on the seed's trace.
    With ``hub``, the run is published for the dashboard (pausing ``pace_s`` after each forward)."""
    wm.set_policy(policy)
    sim = Simulation(wm, scenario, settings)
    texts, experts = [], []
    with sim.attached(), watching(sim, hub, name, pace_s) if hub else contextlib.nullcontext():
        for i, prompt in enumerate(prompts):  # each prompt's prefill starts a new request
            seen, text = len(sim.records), on_text
            if hub is not None:
                text, done = request_events(hub, f"{name} · {i + 1}", on_text)
            result = generate(wm, tok, prompt, max_new_tokens=max_new_tokens, on_text=text)
            if hub is not None:
                done(sim.records[seen:], result.text)
            texts.append(result.text)
            on_text("\n")
            experts.append(
                float(np.mean([r.expert_tokens.sum() / max(r.new_tokens, 1) for r in sim.records]))
            )
    per_token = float(np.mean(experts)) / len(wm.blocks)
    return summarise(name, texts, sim.records, per_token)


def demo_hello(scenario: ScenarioConfig) -> Callable[[], list[Event]]:
    """What a viewer of the demo's dashboard is shown first: the cell; no controls (the policies
    are the demo's own)."""
    return lambda: [
        ("cell", cell_values(scenario, "simulator · wdmoe demo", "sim")),
        ("controls", {"enabled": False}),
    ]
