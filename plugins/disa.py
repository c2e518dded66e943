"""DiSA (Diffusion Step Annealing, arXiv 2505.20297, Qinyu-Allen-Zhao/DiSA): fewer head steps as
generation proceeds.

Early MAR steps predict tokens with little context and need a careful diffusion; late tokens are nearly
determined by their neighbours. DiSA gives step ``s`` of ``T`` AR steps a head budget between
``upper_steps`` and ``lower_steps``, as the release's ``DiffLoss.sample`` picks it from its list of
respaced diffusions ``[lower, lower + 1, ..., upper]`` (``span = upper - lower``, ``last = T - 1``):

* ``linear``:    ``lower + int((last - s) / last * span)``
* ``cosine``:    ``lower + int((cos(pi * s / last) + 1) / 2 * span)``
* ``two-stage``: ``upper`` while ``s < last / 2``, then ``lower``
* ``constant``:  ``lower``

(``int`` truncates, as the release does; at ``T = 1`` the release divides by zero, here the one step
gets ``upper``.) Each budget ``N`` is a fresh ADM respacing of the 1000-step process to ``N`` steps
(``create_diffusion(str(N))``) whose timesteps the release clips at 950 (its ``create_diffusion``
default ``clip_timesteps=950``), merging duplicates: 50 requested steps run 48, from t = 950.
``timestep_cap`` reproduces that (``null``: plain respacing, as marcache's other budgets).
The release's MAR recipe: 64 AR steps, 50 -> 5, linear (``policies/disa.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from marcache.hookspecs import hookimpl
from marcache.plans import HEAD_STEPS_MAX, HEAD_STEPS_MIN
from marcache.plugin import Plugin, register_plugin
from marcache.search_space import Categorical, Int

STRATEGIES = ("linear", "cosine", "two-stage", "constant")


@dataclass
class DiSAConfig:
    upper_steps: int = 50  # head steps at the first AR step
    lower_steps: int = 5  # head steps at the last AR step
    strategy: str = "linear"  # linear | cosine | two-stage | constant (the release's names)
    timestep_cap: Optional[int] = 950  # the release clips respaced timesteps at 950; null = no clip

    def __post_init__(self):
        if not HEAD_STEPS_MIN <= self.lower_steps <= self.upper_steps <= HEAD_STEPS_MAX:
            raise ValueError(f"lower_steps={self.lower_steps}, upper_steps={self.upper_steps}: "
                             f"need {HEAD_STEPS_MIN} <= lower_steps <= upper_steps <= {HEAD_STEPS_MAX}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: one of {', '.join(STRATEGIES)}")
        if self.timestep_cap is not None and not 1 <= self.timestep_cap <= 999:
            raise ValueError(f"timestep_cap={self.timestep_cap}: must be in [1, 999] or null")


def disa_budget(step: int, num_steps: int, cfg: DiSAConfig) -> int:
    """Head steps requested at AR step ``step`` of ``num_steps`` (the release's schedule index + lower)."""
    span, last = cfg.upper_steps - cfg.lower_steps, num_steps - 1
    if last <= 0:
        return cfg.upper_steps
    if cfg.strategy == "linear":
        index = int((last - step) / last * span)
    elif cfg.strategy == "cosine":
        index = int((math.cos(math.pi * step / last) + 1) / 2 * span)
    elif cfg.strategy == "two-stage":
        index = span if step < last / 2 else 0
    else:
        index = 0
    return cfg.lower_steps + index


@register_plugin
class DiSA(Plugin):
    """Caps every token's head budget at the annealed DiSA budget of the step (budgets combine by min)."""

    name = "disa"
    families = frozenset({"head"})
    Config = DiSAConfig
    # lower > upper is refused by the config: the tuner prunes that combination
    search_space = {"upper_steps": Int(10, 100, log=True), "lower_steps": Int(2, 25, log=True),
                    "strategy": Categorical(("linear", "cosine", "two-stage"))}
    description = "DiSA: head steps annealed over AR progress (50 -> 5 linear; cosine, two-stage), timesteps clipped at 950"

    @hookimpl
    def marcache_head_plan(self, step, plan, z):
        budget = disa_budget(step.step, step.num_steps, self.config)
        plan.cap(self.name, budget)
        if self.config.timestep_cap is not None:
            plan.cap_timesteps(self.name, self.config.timestep_cap)
        self.engagement["steps"] += 1
        self.engagement["requested_head_steps_total"] += budget * plan.steps.numel()
        self._last = (step.num_steps, step.gen.model.diffloss)

    def report_section(self) -> dict:
        out = dict(self.engagement)
        out["params"] = {"upper_steps": self.config.upper_steps, "lower_steps": self.config.lower_steps,
                         "strategy": self.config.strategy, "timestep_cap": self.config.timestep_cap}
        last = getattr(self, "_last", None)
        if last is not None:
            num_steps, diffloss = last
            budgets = [disa_budget(s, num_steps, self.config) for s in range(num_steps)]
            out["budget_per_step"] = budgets
            if self.config.timestep_cap is not None:  # what a capped chain really runs
                cap = self.config.timestep_cap
                out["chain_steps_per_step"] = [diffloss.schedule(f"{n}@{cap}").num_timesteps for n in budgets]
        return out
