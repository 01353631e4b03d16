"""`slo`: WDMoE-θ whose θ a feedback controller adapts so that each request meets an end-to-end
latency target L* with as little dropped as possible (the seed's suggestion).

Control law (integral action on the relative error of the projected request latency), applied
after every forward n of a request, with what it cost (:class:`~wdmoe.types.Feedback`):
    spent_n = Σ_{i ≤ n} step_s_i                      (prefill included)
    L̂_n     = spent_n + steps_left_n · step_s_n       (remaining steps cost what the last one did)
    θ_{n+1} = clip(θ_n + κ·(L̂_n / L* − 1), θ_min, θ_max)
A prefill followed by decode steps only adds to ``spent`` (its time says nothing about a decode
step); a request of one forward (a scored sequence) is judged on its own latency. When the steps
left are unknown (0), L̂ is what was spent. θ rises while requests are projected late and falls
back towards θ_min (top-k at 0) while there is slack, so accuracy is given up only when the target
needs it; θ carries over to the next request.

The controller state is an explicit immutable value (:class:`SloState`) inside the policy; the
simulator and the BS own it: they install ``policy.observe(feedback)`` after every forward and
``policy.begin_request()`` at the start of each request. ``select`` stays a pure function of the
view and that state.
"""

from dataclasses import dataclass, replace

import numpy as np

from wdmoe.config import check_range
from wdmoe.errors import ConfigError
from wdmoe.latency.view import ExpertLatency
from wdmoe.policies.registry import POLICIES
from wdmoe.policies.wdmoe import WDMoE
from wdmoe.types import Feedback, RouterOutput, Selection


@dataclass(frozen=True)
class SloState:
    """θ now and the seconds the current request has spent so far."""

    theta: float
    spent_s: float = 0.0


def slo_update(
    state: SloState, step_s: float, steps_left: int, target_s: float, gain: float, bounds: tuple[float, float]
) -> SloState:
    """One decode step of the control law (module docstring)."""
    spent_s = state.spent_s + step_s
    projected_s = spent_s + steps_left * step_s
    theta = float(np.clip(state.theta + gain * (projected_s / target_s - 1.0), *bounds))
    return SloState(theta, spent_s)


@POLICIES.register("slo")
@dataclass(frozen=True)
class Slo:
    """target_s > 0 (L*), gain > 0 (κ), 0 ≤ theta_min ≤ theta_max ≤ 1; starts at θ_min."""

    target_s: float = 1.0
    gain: float = 0.05
    theta_min: float = 0.0
    theta_max: float = 0.5
    k_scaled: bool = False
    state: SloState | None = None
    name: str = "slo"

    def __post_init__(self) -> None:
        check_range("slo.target_s", self.target_s, 0.0, np.inf, lo_open=True)
        check_range("slo.gain", self.gain, 0.0, np.inf, lo_open=True)
        check_range("slo.theta_max", self.theta_max, 0.0, 1.0)
        if not 0.0 <= self.theta_min <= self.theta_max:
            allowed = f"[0, slo.theta_max = {self.theta_max:g}]"
            raise ConfigError(f"slo.theta_min = {self.theta_min!r} is out of range; allowed: {allowed}")

    @property
    def theta(self) -> float:
        return self.theta_min if self.state is None else self.state.theta

    def select(self, route: RouterOutput, view: ExpertLatency | None = None) -> Selection:
        return WDMoE(self.theta, self.k_scaled, name=self.name).select(route, view)

    def begin_request(self) -> "Slo":
        """The policy for a new request: θ kept, the request's spent time reset."""
        return replace(self, state=SloState(self.theta))

    def observe(self, feedback: Feedback) -> "Slo":
        """The policy after a forward that cost ``feedback.step_s`` (module doc)."""
        state = self.state or SloState(self.theta)
        if not feedback.decode and feedback.steps_left > 0:
            return replace(self, state=replace(state, spent_s=state.spent_s + feedback.step_s))
        bounds = (self.theta_min, self.theta_max)
        update = slo_update(state, feedback.step_s, feedback.steps_left, self.target_s, self.gain, bounds)
        return replace(self, state=update)
