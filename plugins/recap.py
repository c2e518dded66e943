"""ReCAP (arXiv 2505.19089, liebenxj/ReCAP): cheap local steps that reuse cached context K/V.

After ``warmup_steps`` ordinary full steps (default: half the steps, as released for MAR), steps come
in groups of one Full-FE and ``local_per_group`` Local-FEs. The Full-FE is a full pass that refills
every layer's K/V (encoder and decoder, both CFG branches). A Local-FE runs the network only on the
group: the encoder on the buffer + the tokens decoded at the previous step, the decoder on the buffer
+ every target position of the group (decoded ones with their fresh encoding, the rest as mask
tokens), attending to the cached K/V of every other position. The buffer is always recomputed.

Two details of the released sampler (``examples/MAR+ReCAP/models/mar.py``) are parameters, released
behaviour by default:

* ``group_split``: the release lists a group's targets in **ascending raster position** and lets the
  Full-FE sample the first ones, each Local-FE the next ones (``raster``); ``order`` keeps the
  random order's split (the group's set of targets is the same, only who decodes which changes).
* ``final_step_cfg``: the release computes the last step's mask length as 0, so under the linear
  schedule the last step gets the full guidance scale (``release``); the official MAR sampler clamps
  it to 1, i.e. ``1 + (cfg - 1) * (L - 1) / L`` (``schedule``).

The released code samples Local-FE tokens with a smaller head: its ``--diff_fast_ratio 0.4`` flag is
parsed as a string and the sampler is built before it is read, so **50 of 100** head steps are what
actually runs; ``local_head_steps`` defaults to that effective value (40 is the intended one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from marcache.caching import buffer_and_new_tokens, shared_feature_cache
from marcache.hookspecs import hookimpl
from marcache.models.partial import CachedPass
from marcache.plans import require_head_steps
from marcache.plugin import Plugin, register_plugin
from marcache.plugins.cfg_schedules import linear_cfg_scale
from marcache.search_space import Int

GROUP_SPLITS = ("raster", "order")
FINAL_STEP_CFGS = ("release", "schedule")


@dataclass
class ReCAPConfig:
    warmup_steps: Optional[int] = None  # ordinary full steps first; None = half of the steps
    local_per_group: int = 1  # k Local-FEs after each Full-FE
    local_head_steps: Optional[int] = 50  # at most this many head steps for Local-FE tokens; None = unchanged
    group_split: str = "raster"  # who decodes which target of a group: raster position (release) or the order
    final_step_cfg: str = "release"  # last step under the linear schedule: full scale (release) or the schedule's

    def __post_init__(self):
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0 or null")
        if self.local_per_group < 0:
            raise ValueError(f"local_per_group={self.local_per_group}: must be >= 0")
        require_head_steps("local_head_steps", self.local_head_steps, nullable=True)
        if self.group_split not in GROUP_SPLITS:
            raise ValueError(f"group_split={self.group_split!r}: one of {', '.join(GROUP_SPLITS)}")
        if self.final_step_cfg not in FINAL_STEP_CFGS:
            raise ValueError(f"final_step_cfg={self.final_step_cfg!r}: one of {', '.join(FINAL_STEP_CFGS)}")


def step_kind(step: int, num_steps: int, cfg: ReCAPConfig) -> tuple[str, int]:
    """``("warmup" | "full" | "local", first step of the group)``."""
    warmup = num_steps // 2 if cfg.warmup_steps is None else cfg.warmup_steps
    if step < warmup or cfg.local_per_group == 0:
        return "warmup", step
    offset = (step - warmup) % (cfg.local_per_group + 1)
    return ("full" if offset == 0 else "local"), step - offset


def group_spans(counts: list[int], cfg: ReCAPConfig) -> list[tuple[int, int]]:
    """``(first, last)`` step of every Full-FE + Local-FE group of a schedule (warm-up excluded)."""
    spans, n = [], len(counts)
    for step in range(n):
        kind, first = step_kind(step, n, cfg)
        if kind == "full":
            spans.append((first, min(first + cfg.local_per_group, n - 1)))
    return spans


def local_token_count(counts: list[int], cfg: ReCAPConfig) -> int:
    """Tokens of one image decoded in Local-FEs under the schedule ``counts``."""
    return sum(c for s, c in enumerate(counts) if step_kind(s, len(counts), cfg)[0] == "local")


@register_plugin
class ReCAP(Plugin):
    name = "recap"
    families = frozenset({"features", "head", "guidance", "order_refine"})
    conflicts = ("lazymar_token_cache", "lazymar_cond_cache")
    Config = ReCAPConfig
    search_space = {"warmup_steps": Int(1, 32), "local_per_group": Int(1, 4), "local_head_steps": Int(10, 100, log=True)}
    description = "ReCAP: groups of 1 Full-FE + k Local-FEs on the group's tokens with cached context K/V"

    @hookimpl
    def marcache_refine_order(self, gen, orders):
        if self.config.group_split != "raster":
            return
        # positions are revealed from the tail of the order: sorting a group's slice in descending
        # position order lets its first step (the Full-FE) reveal the lowest raster positions
        counts = gen.tokens_per_step
        for first, last in group_spans(counts, self.config):
            hi = gen.seq_len - sum(counts[:first])
            lo = gen.seq_len - sum(counts[: last + 1])
            orders[:, lo:hi] = orders[:, lo:hi].sort(dim=1, descending=True).values
            self.engagement["groups_raster_split"] += gen.batch_size

    @hookimpl
    def marcache_cfg_scale(self, step):
        last = step.step == step.num_steps - 1
        if not last or self.config.final_step_cfg != "release" or step.gen.cfg_schedule != "linear":
            return None
        # the released loop's last mask length is 0 (the official one clamps it to 1)
        return linear_cfg_scale(step.gen.cfg, step.gen.seq_len, 0)

    @hookimpl
    def marcache_forward_plan(self, step, plan):
        kind, first = step_kind(step.step, step.num_steps, self.config)
        b = step.gen.batch_size
        self.engagement["tokens"] += step.tokens_this_step * b
        if kind == "warmup":
            return
        plan.mode, plan.owner = "cached", self.name
        plan.cache = shared_feature_cache(step.store)
        if kind == "full":
            plan.spec = CachedPass()
            self.engagement["full_fe"] += 1
            return
        gen, model = step.gen, step.gen.model
        buf = model.buffer_size
        buffer = torch.arange(buf, device=step.mask.device).expand(b, -1)
        group = self._group_positions(gen, first) + buf
        plan.spec = CachedPass(encoder_queries=buffer_and_new_tokens(step),
                               decoder_queries=torch.cat([buffer, group], dim=1))
        self.engagement["local_fe"] += 1
        self.engagement["local_tokens"] += step.tokens_this_step * b

    @hookimpl
    def marcache_head_plan(self, step, plan, z):
        if self.config.local_head_steps is None or step_kind(step.step, step.num_steps, self.config)[0] != "local":
            return
        # a reduction: never more steps than the plan already gives (budgets combine by min)
        plan.cap(self.name, self.config.local_head_steps)

    def _group_positions(self, gen, first: int) -> torch.Tensor:
        """Sorted target positions of the group starting at step ``first`` (Full-FE + its Local-FEs)."""
        counts = gen.tokens_per_step
        masked_before = gen.seq_len - sum(counts[:first])
        last = min(first + self.config.local_per_group, len(counts) - 1)
        masked_after = gen.seq_len - sum(counts[: last + 1])
        return gen.orders[:, masked_after:masked_before].sort(dim=1).values

    def report_section(self) -> dict:
        out = dict(self.engagement)
        out["local_head_steps_effective"] = self.config.local_head_steps
        out["group_split"] = self.config.group_split
        out["final_step_cfg"] = self.config.final_step_cfg
        if out.get("tokens"):
            out["local_token_fraction"] = out.get("local_tokens", 0) / out["tokens"]
        return out
