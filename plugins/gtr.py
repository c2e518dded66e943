"""GtR (Generation then Reconstruction, arXiv 2510.17171): two-stage order and step/head schedule.

The token grid is split by recursive bisection into K spatially uniform stages: round 1 splits all
positions by ``(r + c) mod 2`` and the odd half becomes the last stage S_K (reconstruction: every
target has decoded neighbours); round k splits the remainder by ``(r + c) mod 2^k`` and one half
becomes S_{K-k+1}; what is left after K-1 rounds is S_1. Stages are decoded S_1 first, slowly; the
reconstruction stage in 1-2 highly parallel steps. For a 16x16 grid and K = 3: |S_1| = 64,
|S_2| = 64, |S_3| = 128.

Details the paper leaves open are parameters (methods.md §2): which half continues at each split
(``continue_half``), per-stage step counts (``steps_per_stage``, default from the published rates),
and the stage-aware head schedule (generation stages ramp linearly from ``head_max`` to ``head_min``
head steps, the reconstruction stage uses ``head_rec``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from marcache.errors import ConfigError
from marcache.hookspecs import hookimpl
from marcache.plans import require_head_steps
from marcache.plugin import Plugin, register_plugin
from marcache.search_space import Int


#: stage k bisects by (r + c) mod 2^k: 16 stages already split a 2^15-wide diagonal (any real grid is smaller)
MAX_STAGES = 16
#: tokens per step cannot exceed the tokens of a 256 x 256 grid
MAX_RATE = 65536


def gtr_stages(h: int, w: int, num_stages: int = 3, continue_half: str = "low") -> list[torch.Tensor]:
    """Positions (raster indices) of stages S_1..S_K of an ``h x w`` grid, by recursive bisection."""
    if num_stages < 1:
        raise ValueError("num_stages must be >= 1")
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    diag = (r + c).reshape(-1)
    remainder = torch.arange(h * w)
    residue = 0
    stages_from_end = []
    for k in range(1, num_stages):
        period = 2**k
        high = residue + period // 2
        vals = diag[remainder] % period
        low_part, high_part = remainder[vals == residue], remainder[vals == high]
        # one half is set aside as the next stage counted from the end; the other is split further
        if continue_half == "low":
            stages_from_end.append(high_part)
            remainder = low_part
        else:
            stages_from_end.append(low_part)
            remainder, residue = high_part, high
    return [remainder] + stages_from_end[::-1]


def split_evenly(n: int, parts: int) -> list[int]:
    """``n`` tokens over ``parts`` steps, as even as possible, smaller steps first."""
    base, extra = divmod(n, parts)
    return [base] * (parts - extra) + [base + 1] * extra


@dataclass
class GtROrderConfig:
    num_stages: int = 3  # K
    continue_half: str = "low"  # which half of each split keeps being bisected ("low": S_1 = (r+c) mod 2^(K-1) == 0)

    def __post_init__(self):
        if not 1 <= self.num_stages <= MAX_STAGES:
            raise ValueError(f"num_stages={self.num_stages}: must be in [1, {MAX_STAGES}]")
        if self.continue_half not in ("low", "high"):
            raise ValueError(f"continue_half={self.continue_half!r}: must be 'low' or 'high'")


@register_plugin
class GtROrder(Plugin):
    """Stage-structured order: S_1 revealed first, random order within each stage (per sample)."""

    name = "gtr_order"
    families = frozenset({"order"})
    Config = GtROrderConfig
    search_space = {}  # on/off; the stage count is the schedule's (its rates list one rate per stage)
    description = "GtR two-stage order: recursive checkerboard bisection into K stages, random within a stage"

    @hookimpl
    def marcache_token_order(self, gen):
        h, w = gen.grid
        stages = gtr_stages(h, w, self.config.num_stages, self.config.continue_half)
        orders = []
        for g in gen.generators:
            # positions are revealed from the tail of the order: S_1 goes last
            parts = [s[torch.randperm(len(s), generator=g)] for s in reversed(stages)]
            orders.append(torch.cat(parts))
        self.engagement["orders"] += gen.batch_size
        return torch.stack(orders).to(gen.device)


@dataclass
class GtRScheduleConfig:
    num_stages: int = 3
    continue_half: str = "low"
    # tokens per step in each stage (published for MAR, K=3); used when steps_per_stage is empty
    rates: List[float] = field(default_factory=lambda: [2.67, 10.67, 64.0])
    # explicit MAR steps per stage (overrides rates); methods.md: the paper's split is uncertain
    steps_per_stage: List[int] = field(default_factory=list)
    head_schedule: bool = True  # GtR-dagger: stage-aware head steps
    head_max: int = 50  # first generation-stage step
    head_min: int = 20  # last generation-stage step
    head_rec: int = 20  # reconstruction stage

    def __post_init__(self):
        GtROrderConfig(self.num_stages, self.continue_half)
        if self.steps_per_stage and len(self.steps_per_stage) != self.num_stages:
            raise ValueError(f"steps_per_stage={list(self.steps_per_stage)}: needs one count per stage ({self.num_stages})")
        if any(s < 1 for s in self.steps_per_stage):
            raise ValueError("steps_per_stage: every stage needs >= 1 step")
        if not self.steps_per_stage and (len(self.rates) != self.num_stages
                                         or not all(0 < r <= MAX_RATE for r in self.rates)):
            raise ValueError(f"rates={list(self.rates)}: needs one rate in (0, {MAX_RATE}] tokens per step per stage "
                             f"({self.num_stages})")
        for key in ("head_max", "head_min", "head_rec"):
            require_head_steps(key, getattr(self, key))


def gtr_plan(h: int, w: int, cfg: GtRScheduleConfig) -> tuple[list[int], list[int]]:
    """(tokens per step, stage index per step) for an ``h x w`` grid."""
    sizes = [len(s) for s in gtr_stages(h, w, cfg.num_stages, cfg.continue_half)]
    steps = list(cfg.steps_per_stage) or [max(1, math.ceil(n / r - 1e-9)) for n, r in zip(sizes, cfg.rates)]
    counts, stage_of_step = [], []
    for k, (n, m) in enumerate(zip(sizes, steps)):
        if n == 0:
            continue
        if m > n:
            raise ConfigError(f"gtr_schedule.steps_per_stage: stage {k + 1} has {n} tokens on this grid, cannot take {m} steps")
        counts += split_evenly(n, m)
        stage_of_step += [k] * m
    return counts, stage_of_step


def head_steps_for(stage_of_step: list[int], cfg: GtRScheduleConfig) -> list[int]:
    """GtR-dagger: linear ramp head_max -> head_min over generation-stage steps, head_rec after."""
    last_stage = max(stage_of_step)
    gen_steps = [i for i, s in enumerate(stage_of_step) if s != last_stage]
    out = []
    for i, s in enumerate(stage_of_step):
        if s == last_stage and len(set(stage_of_step)) > 1:
            out.append(cfg.head_rec)
        else:
            pos = gen_steps.index(i) if i in gen_steps else 0
            frac = pos / max(len(gen_steps) - 1, 1)
            out.append(round(cfg.head_max + (cfg.head_min - cfg.head_max) * frac))
    return out


@register_plugin
class GtRSchedule(Plugin):
    """Per-stage token budgets and (optionally) the stage-aware head-step schedule."""

    name = "gtr_schedule"
    families = frozenset({"schedule", "head"})
    Config = GtRScheduleConfig
    # the stage-aware head budgets (the rates stay as the policy or the space file fixes them)
    search_space = {"head_max": Int(10, 100, log=True), "head_min": Int(5, 50, log=True), "head_rec": Int(5, 50, log=True)}
    description = "GtR per-stage tokens per step and stage-aware head steps (50->20 ramp, 20 in reconstruction)"

    @hookimpl
    def marcache_step_schedule(self, gen):
        h, w = gen.grid
        counts, stage_of_step = gtr_plan(h, w, self.config)
        gen.store.put(self.name, "stage_of_step", stage_of_step)
        gen.store.put(self.name, "head_steps", head_steps_for(stage_of_step, self.config))
        self.engagement["steps_planned"] += len(counts)
        return counts

    @hookimpl
    def marcache_head_plan(self, step, plan, z):
        if not self.config.head_schedule:
            return
        steps = step.store.get(self.name, "head_steps")
        if steps is None:  # another schedule plugin won: our stage plan does not apply
            return
        plan.cap(self.name, steps[step.step])  # budgets combine by min (HeadPlan)
        self.engagement["head_steps_total"] += steps[step.step] * plan.steps.numel()
