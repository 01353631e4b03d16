"""The Mixtral-8x7B latency study: real router scores, priced at Mixtral's dimensions, no Mixtral.

No Mixtral checkpoint runs here, but its latency depends on the model only through which experts
each token selects. So (1) a model that runs (the default) answers task prompts with ``topk`` and
its router logits [T, E] are recorded per layer; (2) each prompt becomes one prefill request of a
Mixtral-sized model (``paper`` scenario: D = 4096, F = 14336, 32 layers, 8 experts, top-2): layer l
reads the recorded layer l mod L_src, the router's top-2 come from those logits as Mixtral's do
(softmax, top-2, renormalised), the policy under study selects on the BS's channel estimate, and
:func:`wdmoe.latency.pricing.price_forward` prices the loads on the true channel with the allocator's
split. Request i arrives at i·Δ (Δ = 1 s by default, far beyond the fading's coherence time) on
the seed's channel trace, whatever the policy: each request meets the same channel under every
policy and allocator (paired). The study prices its whole prefill on the fading block of its
arrival (the simulator moves the channel layer by layer; this study has no model to run layer
by layer); experts on devices the BS sees in outage are skipped and calls are settled by the
runtime's deadline rule (defaults), as in :class:`wdmoe.simulate.Simulation`.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wdmoe.allocation import Allocator, make_allocator
from wdmoe.config import ScenarioConfig, load_scenario
from wdmoe.errors import ConfigError
from wdmoe.eval.tasks import (
    ChoiceItem,
    ContinuationItem,
    Document,
    GenerationItem,
    Item,
    PartialItem,
    get_task,
)
from wdmoe.latency.cell import Cell, CellSnapshot
from wdmoe.latency.deadline import DeadlineRule
from wdmoe.latency.pricing import Calls, price_forward
from wdmoe.loads import expert_loads
from wdmoe.models.install import WirelessModel
from wdmoe.policies import Policy, make_policy
from wdmoe.types import LayerTrace, RouterOutput

RouterSample = list[torch.Tensor]  # one prompt: router logits [T, E] per MoE layer of the source model
DEFAULT_THETAS = (0.1, 0.2, 0.3, 0.4)
DEFAULT_ALLOCATORS = ("equal", "minmax")
DEFAULT_INTERVAL_S = 1.0  # between request arrivals: ≫ the fading's coherence, so requests see fresh fades


# --- 1. router scores from a model that runs ---------------------------------------------------


def request_text(item: Item) -> str:
    """The text one request prefills: a scored sequence (context + the gold continuation), a
    generation prompt, or a document."""
    if isinstance(item, ChoiceItem):
        return item.context + item.continuations[item.gold]
    if isinstance(item, PartialItem):
        return item.contexts[item.gold] + item.continuation
    if isinstance(item, GenerationItem):
        return item.prompt
    if isinstance(item, ContinuationItem):
        return item.context + item.continuation
    assert isinstance(item, Document), f"unknown item type {type(item).__name__}"
    return item.text


def study_prompts(tasks: Sequence[str], per_task: int, data_dir: Path | None = None) -> list[str]:
    """The first ``per_task`` requests of each task."""
    return [request_text(item) for t in tasks for item in get_task(t).load(data_dir, per_task)]


def collect_logits(
    wm: WirelessModel, tok: Any, prompts: Sequence[str], max_tokens: int = 512
) -> list[RouterSample]:
    """Run each prompt alone (vanilla topk) and keep its router logits per layer."""
    wm.set_policy(make_policy("topk"))
    wm.set_view(None)
    wm.recorder.clear()
    wm.recorder.enabled = True
    samples = []
    try:
        for text in prompts:
            ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens]
            with torch.no_grad():
                wm.model(input_ids=ids)
            traces = sorted(wm.recorder.clear(), key=lambda t: t.layer)
            samples.append([t.logits.detach().float().cpu() for t in traces])
    finally:
        wm.recorder.enabled = False
    return samples


# --- 2. pricing the scores at another model's dimensions --------------------------------------


def mixtral_route(logits: torch.Tensor, top_k: int) -> RouterOutput:
    """Mixtral's router on logits [T, E]: softmax, the top-k candidates, weights renormalised over
    them; importance = the softmax probability (what the mixtral adapter gives policies)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, candidates = torch.topk(probs, top_k, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True)
    return RouterOutput(logits, candidates, weights, top, renormalize=True)


def layer_logits(sample: RouterSample, num_layers: int, num_experts: int | None = None) -> list[torch.Tensor]:
    """The source layers mapped onto ``num_layers`` target layers cyclically (l → l mod L_src), each
    widened to ``num_experts`` experts by :func:`wider_logits` when the target has more."""
    width = num_experts or int(sample[0].shape[-1])
    return [wider_logits(sample, layer, width) for layer in range(num_layers)]


def wider_logits(sample: RouterSample, layer: int, num_experts: int) -> torch.Tensor:
    """Router logits [T, E] for target layer l from a source router with E_s ≤ E experts.

    E = E_s: source layer l mod L_src. E a multiple of E_s: target expert e is read as digits in base E_s,
    e = d_0 + E_s·d_1 + E_s²·d_2 + …, and its logit is Σ_m z^{(l+m)}[d_m], the logits of the
    source layers l, l+1, … (mod L_src) at those digits: the joint choice of m independent source
    routers, so a token's preference among the E experts is still the source model's, token by token
    (a DeepSeek-V3 preset, E = 256, reads three consecutive layers of the 8-expert default model; a
    source with fewer layers than digits repeats its layers, and experts whose digits are a
    permutation of each other then tie).
    """
    src = int(sample[0].shape[-1])
    if num_experts == src:
        return sample[layer % len(sample)]
    assert num_experts % src == 0 and src > 1, f"{num_experts} experts are no multiple of {src}"
    digits, out, m = torch.arange(num_experts), torch.zeros(sample[0].shape[0], num_experts), 0
    while src**m < num_experts:
        out += sample[(layer + m) % len(sample)].float()[:, digits % src]
        digits, m = digits // src, m + 1
    return out


def arrival_blocks(requests: int, interval_s: float, block_s: float) -> list[int]:
    """The fading block at which request i arrives, at i·Δ (the same for every policy)."""
    if interval_s < 0:
        raise ConfigError(f"the study's arrival interval = {interval_s} s is out of range; allowed: ≥ 0")
    return [int(i * interval_s // block_s) for i in range(requests)]


@dataclass(frozen=True)
class RequestCost:
    """One priced request: end-to-end prefill latency (s), retained router mass, kept and dropped
    expert-token pairs."""

    total_s: float
    retained_mass: float
    kept: float
    dropped: float
    tokens: int


def price_request(
    sample: RouterSample, scenario: ScenarioConfig, policy: Policy, allocator: Allocator, snap: CellSnapshot
) -> RequestCost:
    """One prompt's prefill on the cell snapshot ``snap``: select per layer on the BS's view (equal
    split, as the simulator's policies see it), then :func:`price_forward` on the truth."""
    m = scenario.model
    src = int(sample[0].shape[-1])
    if m.num_experts % src or src < 2:
        raise ConfigError(
            f"the router scores have {src} experts but {m.name} has {m.num_experts}; record them from "
            "a model whose expert count divides it (the scores are widened to a multiple: wider_logits)"
        )
    traces = []
    for layer, logits in enumerate(layer_logits(sample, m.num_layers, m.num_experts)):
        route = mixtral_route(logits, m.top_k)
        sel = policy.select(route, snap.view)
        traces.append(LayerTrace(layer, logits, route.candidates, sel.keep, sel.weights))
    loads = expert_loads(traces, m.num_experts)
    view, tokens = snap.view, int(sample[0].shape[0])
    kept = np.where(view.unreachable_experts(), 0.0, loads.kept[0])  # experts the BS cannot reach: skipped
    dropped = loads.dropped[0].sum() + (loads.kept[0] - kept).sum()
    calls = Calls(DeadlineRule(), snap.true_up)
    args = (scenario, view.device_tokens(kept), tokens, 0, calls)
    total = float(price_forward(view, snap.true, allocator, *args).latency.total_s)
    return RequestCost(total, loads.mass[0], float(kept.sum()), float(dropped), tokens)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded inside: the study's tensors are tiny ([T, 8]), and on a busy
    machine every multi-threaded op on them waits for a core (10× slower measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def price_requests(
    samples: Sequence[RouterSample],
    scenario: ScenarioConfig,
    policy: Policy,
    allocator: str,
    seed: int,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> list[RequestCost]:
    """Request i (sample i) arrives at i·Δ on the seed's trace: every policy and allocator meets
    the same channel per request (paired)."""
    blocks = arrival_blocks(len(samples), interval_s, scenario.channel.coherence_s)
    cell = Cell(scenario, max(blocks, default=0) + 1, seed)
    split = make_allocator(allocator)
    with one_thread():
        return [
            price_request(sample, scenario, policy, split, cell.snapshot(i * interval_s))
            for i, sample in enumerate(samples)
        ]


@dataclass(frozen=True)
class StudyRow:
    """One (policy, allocator) of the study: per-request prefill latency (s), router mass kept,
    drop rate, and the ×speed-up against topk with the same allocator and with equal bandwidth."""

    policy: str
    theta: float
    allocator: str
    requests: int
    mean_s: float
    p50_s: float
    p95_s: float
    retained_mass: float
    drop_rate: float
    experts_per_token: float
    speedup: float = 1.0
    speedup_vs_equal: float = 1.0


def summarise(
    policy: str, theta: float, allocator: str, costs: Sequence[RequestCost], layers: int
) -> StudyRow:
    total = np.array([c.total_s for c in costs])
    kept, dropped = sum(c.kept for c in costs), sum(c.dropped for c in costs)
    return StudyRow(
        policy,
        theta,
        allocator,
        len(costs),
        float(total.mean()),
        float(np.percentile(total, 50)),
        float(np.percentile(total, 95)),
        float(np.mean([c.retained_mass for c in costs])),
        dropped / (kept + dropped) if kept + dropped else 0.0,
        kept / max(sum(c.tokens for c in costs), 1) / layers,
    )


def run_study(
    samples: Sequence[RouterSample],
    scenario: ScenarioConfig,
    thetas: Sequence[float] = DEFAULT_THETAS,
    allocators: Sequence[str] = DEFAULT_ALLOCATORS,
    seed: int = 0,
    on_point: Callable[[str], None] | None = None,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> list[StudyRow]:
    """topk and WDMoE-θ (θ at the scenario's own k: no k-scaling) under each allocator."""
    if not samples:
        raise ConfigError("the latency study needs at least one prompt's router scores")
    rows = []
    for allocator in allocators:
        for theta in (0.0, *thetas):
            name = "topk" if theta == 0.0 else f"wdmoe θ={theta:g}"
            policy = make_policy("topk") if theta == 0.0 else make_policy("wdmoe", theta=theta)
            costs = price_requests(samples, scenario, policy, allocator, seed, interval_s)
            rows.append(summarise(name, theta, allocator, costs, scenario.model.num_layers))
            if on_point is not None:
                on_point(f"{name} · {allocator}")
    return with_speedups(rows)


def with_speedups(rows: Sequence[StudyRow]) -> list[StudyRow]:
    """Fill the speed-ups against topk under the same allocator and under equal bandwidth."""
    base = {r.allocator: r.mean_s for r in rows if r.theta == 0.0}
    equal = base.get("equal")
    return [
        replace(
            r,
            speedup=base[r.allocator] / r.mean_s if r.allocator in base else float("nan"),
            speedup_vs_equal=equal / r.mean_s if equal is not None else float("nan"),
        )
        for r in rows
    ]


def render_study(
    rows: Sequence[StudyRow], scenario: ScenarioConfig, source: str, interval_s: float = DEFAULT_INTERVAL_S
) -> str:
    """The study as Markdown: setting, then one table row per (policy, allocator)."""
    m = scenario.model
    lines = [
        f"Router scores of `{source}` on {rows[0].requests} prompts (one prefill request each, arriving "
        f"{interval_s:g} s apart: every policy meets the same channel per request), priced at {m.name} "
        f"dimensions (D = {m.hidden_size}, F = {m.ffn_size}, {m.num_layers} layers, {m.num_experts} "
        f"experts, top-{m.top_k}) on the `{scenario.name}` cell; θ at k = {m.top_k} (no k-scaling). "
        "Latency per request in seconds; speed-up against topk with the same allocator and against "
        "topk with equal bandwidth.",
        "",
        "| policy | allocator | mean s | p50 s | p95 s | speed-up | vs topk equal | latency −% "
        "| retained mass | drop rate | experts/token |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r.policy} | {r.allocator} | {r.mean_s:.3f} | {r.p50_s:.3f} | {r.p95_s:.3f} | "
            f"{r.speedup:.2f}× | {r.speedup_vs_equal:.2f}× | {(1 - 1 / r.speedup) * 100:.1f} | "
            f"{r.retained_mass:.3f} | {r.drop_rate:.3f} | {r.experts_per_token:.2f} |"
        )
    return "\n".join(lines)


# --- 3. the same scores at the dimensions of other models' presets ----------------------------

# configs/models/*.toml whose rows `wdmoe reproduce` adds to its latency study.
STUDY_PRESETS = (
    "mixtral-8x22b",
    "deepseek-v3",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "qwen3-30b-a3b",
    "qwen3-next-80b-a3b",
    "olmoe-1b-7b",
    "llama4-scout-17b-16e",
)


def run_presets(
    samples: Sequence[RouterSample],
    scenario: str,
    overrides: Sequence[str],
    presets: Sequence[str] = STUDY_PRESETS,
    **study: Any,
) -> dict[str, tuple[ScenarioConfig, list[StudyRow]]]:
    """:func:`run_study` of the same router scores on the ``scenario`` cell (with ``overrides``)
    at each preset's dimensions (``model=<preset>``); scores are widened to its E (wider_logits)."""
    out = {}
    for name in presets:
        at = load_scenario(scenario, [*overrides, f"model={name}"])
        out[name] = (at, run_study(samples, at, **study))
    return out


def render_presets(results: dict[str, tuple[ScenarioConfig, list[StudyRow]]]) -> str:
    """One Markdown row per (preset, allocator): topk's mean prefill latency, then each θ's
    speed-up against it (and drop rate)."""
    thetas = sorted({r.theta for _, rows in results.values() for r in rows} - {0.0})
    lines = [
        "| model | D | F | L | E | k | allocator | topk mean s | "
        + " | ".join(f"θ={t:g} speed-up (drop)" for t in thetas)
        + " |",
        "|" + "---|" * (8 + len(thetas)),
    ]
    for name, (scenario, rows) in results.items():
        m = scenario.model
        for allocator in dict.fromkeys(r.allocator for r in rows):
            mine = {r.theta: r for r in rows if r.allocator == allocator}
            cells = [f"{mine[t].speedup:.2f}× ({mine[t].drop_rate:.2f})" for t in thetas if t in mine]
            lines.append(
                f"| {name} | {m.hidden_size} | {m.ffn_size} | {m.num_layers} | {m.num_experts} | {m.top_k} "
                f"| {allocator} | {mine[0.0].mean_s:.3f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)
