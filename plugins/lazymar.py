"""LazyMAR (arXiv 2503.12450, feihongyan1/LazyMAR): token cache and condition cache.

Step types: step ``s`` is *full* if ``s < warmup_steps`` or ``(s - warmup_steps) % refresh_interval == 0``
(released: 5 and 9, i.e. {0..5, 14, 23, 32, 41, 50, 59} at 64 steps); other steps are *lazy*. Optionally
(``jump_refresh``, not in the release) a step that reveals at least ``jump_refresh`` times as many tokens
as the step before is full too: under a stepped schedule (GtR's stages) the context changes most at the
jumps, and a stale cache is then reused for the most tokens.

* ``lazymar_token_cache``: full steps recompute everything and refill the per-layer K/V caches, the
  decoder-input cache and the selection layer's values. Lazy steps run the encoder only on the buffer
  and the tokens decoded at the previous step (other known tokens contribute cached K/V and cached
  decoder inputs); the decoder runs every position up to the attention of ``selection_layer``, then
  keeps per sample the ``k`` positions whose values changed most since the previous step (mean over
  heads of cos(V_now, V_prev)), always including this step's and the previous step's predictions;
  ``k = max(|to_pred| + |prev_pred| + forced_margin, floor(P * keep_ratio(s)))``.
* ``lazymar_cond_cache``: full steps store ``h_uncond - h_cond`` (decoder states before
  ``decoder_norm``, every position); lazy steps run only the conditional rows and rebuild the
  unconditional ones as ``h_cond + diff``. Inactive without guidance (cfg = 1).

The 64-entry keep-ratio table is applied by step progress (``table[floor(64 * s / T)]``): exactly the
released table at T = 64, a stretched one at other step counts. Two deliberate differences, each with
the released behaviour as an option (``policies/lazymar_release.yaml`` selects both):

* ``forced_score``: forced positions are ranked below every cosine (``lowest``), so a predicted token
  is always recomputed. The released code scores them 0 (``zero``), so a token with a negative cosine
  can displace one (its +15 margin makes that unlikely); a displaced position then reads the released
  unpruning's zero state.
* ``round_fresh_kv``: attention uses the fresh K/V of the query positions at full precision; the
  released code runs under fp16 autocast, so they are rounded like the fp16 cache (``true``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from marcache.errors import ConfigError
from marcache.hookspecs import hookimpl
from marcache.caching import STORE_NAMESPACE, buffer_and_new_tokens, feature_cache_of, shared_feature_cache
from marcache.models.partial import CachedPass, TokenSelection
from marcache.plugin import Plugin, register_plugin
from marcache.search_space import Int

#: RETAIN_RATIO_SCHEDULE of the released code (64 MAR steps)
RELEASED_KEEP_RATIOS = [1.0] * 20 + [0.6] + [0.5] * 4 + [0.4] * 5 + [0.15] * 5 + [0.12] * 5 + [0.05] * 24
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: score of the forced positions (predicted this step or last) before the ascending sort
FORCED_SCORES = {"lowest": -2.0, "zero": 0.0}


def is_full_step(step: int, warmup: int, refresh: int) -> bool:
    return step < warmup or (step - warmup) % refresh == 0


def keep_ratio(table: List[float], step: int, num_steps: int) -> float:
    """The table entry for this step's progress (identical to indexing by step when T == len(table))."""
    return table[min(len(table) - 1, (step * len(table)) // num_steps)]


@dataclass
class LazyScheduleConfig:
    warmup_steps: int = 5
    refresh_interval: int = 9
    jump_refresh: Optional[float] = None  # also full where tokens revealed >= this x the previous step's; None: off

    def __post_init__(self):
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 1 (the first step builds the caches)")
        if self.refresh_interval < 1:
            raise ValueError(f"refresh_interval={self.refresh_interval}: must be >= 1")
        if self.jump_refresh is not None and not self.jump_refresh > 1.0:
            raise ValueError(f"jump_refresh={self.jump_refresh}: must be > 1 (a ratio of tokens per step) or null")

    def is_full(self, step) -> bool:
        """Whether ``step`` (a :class:`~marcache.state.StepState`) is a full pass."""
        if is_full_step(step.step, self.warmup_steps, self.refresh_interval):
            return True
        counts = step.gen.tokens_per_step
        return self.jump_refresh is not None and counts[step.step] >= self.jump_refresh * counts[step.step - 1]


@dataclass
class LazyMARTokenCacheConfig(LazyScheduleConfig):
    selection_layer: int = 3  # capped at depth - 2 for shallow decoders (report: selection_layer_effective)
    forced_margin: int = 15
    keep_ratios: List[float] = field(default_factory=lambda: list(RELEASED_KEEP_RATIOS))
    cache_dtype: str = "float16"
    forced_score: str = "lowest"  # "lowest": always kept; "zero": the released score 0
    round_fresh_kv: bool = False  # true: fresh K/V rounded to cache_dtype, as under the released fp16 autocast

    def __post_init__(self):
        super().__post_init__()
        if self.forced_score not in FORCED_SCORES:
            raise ValueError(f"forced_score={self.forced_score!r}: one of {', '.join(FORCED_SCORES)}")
        if self.selection_layer < 0:
            raise ValueError(f"selection_layer={self.selection_layer}: must be >= 0")
        if self.forced_margin < 0:
            raise ValueError(f"forced_margin={self.forced_margin}: must be >= 0")
        if not self.keep_ratios or any(not 0.0 < r <= 1.0 for r in self.keep_ratios):
            raise ValueError("keep_ratios: a non-empty list of ratios in (0, 1]")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype={self.cache_dtype!r}: one of {', '.join(CACHE_DTYPES)}")


#: both caches share step types, so their schedule parameters share one sampled value (``key``)
LAZY_SCHEDULE_SPACE = {"warmup_steps": Int(1, 16, key="lazymar.warmup_steps"),
                       "refresh_interval": Int(2, 12, key="lazymar.refresh_interval")}


def _check_schedules_agree(policy, plugin) -> None:
    """Token and condition caches share step types (a condition refresh needs a full pass)."""
    others = {p.name: p.params for p in policy.plugins}
    other = {"lazymar_token_cache": "lazymar_cond_cache", "lazymar_cond_cache": "lazymar_token_cache"}[plugin.name]
    if other in others:
        for key in ("warmup_steps", "refresh_interval", "jump_refresh"):
            mine = getattr(plugin.config, key)
            theirs = others[other].get(key, getattr(LazyScheduleConfig(), key))
            if mine != theirs:
                raise ConfigError(f"{plugin.name}.{key}={mine} differs from {other}.{key}={theirs}: LazyMAR's caches share step types")


@register_plugin
class LazyMARTokenCache(Plugin):
    name = "lazymar_token_cache"
    families = frozenset({"features"})
    conflicts = ("recap",)
    Config = LazyMARTokenCacheConfig
    search_space = LAZY_SCHEDULE_SPACE
    description = "LazyMAR token cache: incremental encoder K/V, similarity-selected decoder recomputation"

    @hookimpl
    def marcache_configure(self, policy, model):
        # the released layer 3 is for 12-20-block decoders; a shallower decoder selects at its
        # second-to-last block so at least one block runs narrowed (reported as effective value)
        depth = len(model.decoder_blocks)
        if depth < 2:
            raise ConfigError(f"lazymar_token_cache needs a decoder of >= 2 blocks, this one has {depth}")
        self.selection_layer = min(self.config.selection_layer, depth - 2)
        _check_schedules_agree(policy, self)

    @hookimpl
    def marcache_forward_plan(self, step, plan):
        cfg = self.config
        model = step.gen.model
        positions = model.buffer_size + model.seq_len
        plan.mode, plan.owner = "cached", self.name
        plan.cache = shared_feature_cache(step.store, CACHE_DTYPES[cfg.cache_dtype])
        plan.cache.exact_fresh_kv = not cfg.round_fresh_kv
        if cfg.is_full(step):
            # full pass: refill every cache, record the selection layer's values (keep = all)
            forced = torch.zeros(step.gen.batch_size, positions, dtype=torch.bool, device=step.mask.device)
            plan.spec = CachedPass(selection=TokenSelection(self.selection_layer, positions, forced))
            self.engagement["full_steps"] += 1
            return
        n_pred, n_prev = step.tokens_this_step, step.tokens_prev_step
        keep = max(n_pred + n_prev + cfg.forced_margin, math.floor(positions * keep_ratio(cfg.keep_ratios, step.step, step.num_steps)))
        forced = model.with_buffer(step.mask_to_pred | step.prev_mask_to_pred)
        release = cfg.forced_score == "zero"
        selection = TokenSelection(self.selection_layer, min(keep, positions), forced,
                                   forced_score=FORCED_SCORES[cfg.forced_score], zero_unselected=release)
        plan.spec = CachedPass(encoder_queries=buffer_and_new_tokens(step), selection=selection)
        self.engagement["lazy_steps"] += 1
        self.engagement["decoder_tokens_recomputed"] += min(keep, positions)
        self.engagement["decoder_tokens_total"] += positions

    @hookimpl
    def marcache_step_end(self, step, record):
        cache = feature_cache_of(step.store)
        kept = getattr(cache, "last_decoder_positions", None)
        if self.config.forced_score == "lowest" or kept is None or self.config.is_full(step):
            return
        # under the released score 0 a predicted position can be displaced: count it (a host sync, release mode only)
        b = step.gen.batch_size
        kept_mask = torch.zeros(kept.shape[0], cache.prenorm.shape[1], dtype=torch.bool, device=kept.device).scatter_(1, kept, True)
        predicted = step.gen.model.with_buffer(step.mask_to_pred)
        self.engagement["predicted_displaced"] += int((predicted & ~kept_mask[:b]).sum())

    def report_section(self) -> dict:
        out = dict(self.engagement)
        out["selection_layer_effective"] = getattr(self, "selection_layer", self.config.selection_layer)
        if out.get("decoder_tokens_total"):
            out["decoder_recompute_fraction_lazy"] = out["decoder_tokens_recomputed"] / out["decoder_tokens_total"]
        return out


@register_plugin
class LazyMARCondCache(Plugin):
    name = "lazymar_cond_cache"
    families = frozenset({"cfg_reuse"})
    conflicts = ("recap",)
    Config = LazyScheduleConfig
    search_space = LAZY_SCHEDULE_SPACE
    description = "LazyMAR condition cache: lazy steps run the conditional branch only (uncond = cond + cached diff)"

    @hookimpl
    def marcache_configure(self, policy, model):
        _check_schedules_agree(policy, self)

    @hookimpl
    def marcache_forward_plan(self, step, plan):
        if not step.gen.guided:
            self.engagement["inactive_without_guidance"] += 1
            return
        if plan.mode == "full":  # alone: the official path cannot run one branch; use a full cached pass
            plan.mode, plan.spec = "cached", CachedPass()
            plan.cache = shared_feature_cache(step.store)
        if self.config.is_full(step):
            self.engagement["full_steps"] += 1
            return
        diff = step.store.get(self.name, "diff")
        plan.branches, plan.cond_diff, plan.owner = "cond", diff, self.name
        self.engagement["cond_only_steps"] += 1

    @hookimpl
    def marcache_step_end(self, step, record):
        # a refresh requested by another plugin (drift_refresh) also renews the difference
        refreshed = step.store.get(STORE_NAMESPACE, "refreshed_step") == step.step
        if step.gen.guided and (refreshed or self.config.is_full(step)):
            cache = feature_cache_of(step.store)
            b = step.gen.batch_size
            step.store.put(self.name, "diff", cache.prenorm[b:] - cache.prenorm[:b])
