"""Drift-triggered cache refresh (the idea of Elastic-Cache, arXiv 2510.14973, and MARche's selective
refresh, arXiv 2506.12035) for LazyMAR's feature caches.

LazyMAR refreshes its caches with a full pass every ``refresh_interval`` steps whatever happens. This
plugin refreshes when the cache has gone stale instead: after every lazy pass it measures, per sample,
the drift of the cached layer's features on the tokens that were recomputed past it,

    drift_i = mean over heads and measured positions of (1 - cos(V_now, V_at_last_refresh))

at LazyMAR's selection layer (the values its selection already computes), where the measured positions
are those recomputed at the pass minus the ones predicted at that step or the one before (their change
is a new token, not drift). If the batch's drift (``reduce``: max or mean over samples) exceeds
``threshold``, the next step runs a full pass (refilling every cache; with ``lazymar_cond_cache`` both
CFG branches run and the branch difference is renewed). Measuring costs ``3 x head_dim`` multiply-adds
per head and position of each conditional row (one dot product, two squared norms), counted as decoder
FLOPs (``drift_cosine``) of the step the measurement decides.

Use it with a long fixed interval (``lazymar_token_cache.refresh_interval`` >= the step count) so that
drift alone decides; its warm-up full steps still run. The decision is batch-wide (a full pass is
batch-wide), so unlike the other built-ins a batch is not its samples one by one unless no refresh
triggers (``batch_invariant = False``). Without feature values (``marcache flops`` shape-only) drift is
unknown and never triggers: those FLOPs are a lower bound; the run report says how often it refreshed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from marcache.caching import STORE_NAMESPACE, feature_cache_of
from marcache.errors import ConfigError
from marcache.hookspecs import hookimpl
from marcache.models.partial import CachedPass, TokenSelection
from marcache.plugin import Plugin, register_plugin
from marcache.search_space import Categorical, Float

CACHE_OWNERS = ("lazymar_token_cache", "lazymar_cond_cache")


@dataclass
class DriftRefreshConfig:
    threshold: float = 0.10  # refresh when the drift (1 - mean cosine) exceeds this
    reduce: str = "max"  # batch statistic over the samples' drifts: max | mean

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 2.0:
            raise ValueError(f"threshold={self.threshold}: must be in [0, 2] (1 - cosine ranges over [0, 2])")
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"reduce={self.reduce!r}: must be 'max' or 'mean'")


@register_plugin
class DriftRefresh(Plugin):
    """Turns the next lazy LazyMAR step into a full pass when the measured feature drift exceeds a threshold."""

    name = "drift_refresh"
    families = frozenset({"features"})
    conflicts = ("recap",)
    Config = DriftRefreshConfig
    # without lazymar_token_cache in the trial the policy is refused and the tuner prunes it
    search_space = {"threshold": Float(0.01, 0.5, log=True), "reduce": Categorical(("max", "mean"))}
    batch_invariant = False  # the refresh decision is batch-wide
    description = "refresh LazyMAR's caches when the selection layer's value drift on recomputed tokens exceeds a threshold"

    @hookimpl
    def marcache_configure(self, policy, model):
        if "lazymar_token_cache" not in {p.name for p in policy.plugins}:
            raise ConfigError("drift_refresh refreshes LazyMAR's caches: add lazymar_token_cache to the policy")

    @hookimpl
    def marcache_generation_start(self, gen):
        self.refresh_steps = []

    # trylast: refine the plan after LazyMAR's plugins laid down this step's (lazy or full) pass
    @hookimpl(trylast=True)
    def marcache_forward_plan(self, step, plan):
        store = step.store
        cost, refresh = store.get(self.name, "pending_flops", 0), store.get(self.name, "refresh_next", False)
        store.put(self.name, "pending_flops", 0)
        store.put(self.name, "refresh_next", False)
        if cost:
            plan.extra_flops[("decoder", "drift_cosine")] = plan.extra_flops.get(("decoder", "drift_cosine"), 0) + cost
        spec = plan.spec
        lazy = plan.mode == "cached" and plan.owner in CACHE_OWNERS and spec is not None and spec.encoder_queries is not None
        if not (lazy and refresh):
            return
        positions = step.gen.model.buffer_size + step.gen.seq_len
        forced = torch.zeros(step.gen.batch_size, positions, dtype=torch.bool, device=step.mask.device)
        plan.spec = CachedPass(selection=TokenSelection(spec.selection.layer, positions, forced))
        plan.branches, plan.cond_diff, plan.owner = "both", None, self.name
        step.store.put(STORE_NAMESPACE, "refreshed_step", step.step)
        self.refresh_steps.append(step.step)
        self.engagement["refreshes"] += 1

    @hookimpl
    def marcache_step_end(self, step, record):
        cache = feature_cache_of(step.store)
        sel_v = getattr(cache, "sel_v", None)
        if cache is None or sel_v is None or sel_v.device.type == "meta" or step.is_last:
            return
        b = step.gen.batch_size
        kept = cache.last_decoder_positions[:b]  # positions recomputed past the selection layer, [B, n]
        now = sel_v[:b].float()  # [B, H, P, hd]
        if kept.shape[1] == now.shape[2]:  # a full pass: the new reference
            step.store.put(self.name, "reference_v", now.clone())
            self.engagement["full_passes_seen"] += 1
            return
        reference = step.store.get(self.name, "reference_v")
        if reference is None:
            return
        heads, head_dim = now.shape[1], now.shape[3]
        index = kept[:, None, :, None].expand(-1, heads, -1, head_dim)
        cos = F.cosine_similarity(now.gather(2, index), reference.gather(2, index), dim=-1).mean(dim=1)  # [B, n]
        # tokens predicted at this step or the one before changed identity, not drift
        measured = ~step.gen.model.with_buffer(step.mask_to_pred | step.prev_mask_to_pred).gather(1, kept)
        drift = ((1 - cos) * measured).sum(dim=1) / measured.sum(dim=1).clamp_min(1)  # [B]
        value = float(drift.max() if self.config.reduce == "max" else drift.mean())
        # one dot product and two squared norms per head and recomputed position (2 FLOPs per MAC)
        step.store.put(self.name, "pending_flops", 2 * 3 * head_dim * heads * kept.numel())
        step.store.put(self.name, "refresh_next", value > self.config.threshold)
        self.engagement["measurements"] += 1
        self.drifts = getattr(self, "drifts", []) + [value]

    def report_section(self) -> dict:
        out = dict(self.engagement)
        out.setdefault("refreshes", 0)  # refreshes per run (since the last report)
        out["params"] = {"threshold": self.config.threshold, "reduce": self.config.reduce}
        out["batch_invariant"] = False
        out["refresh_steps_last_batch"] = list(getattr(self, "refresh_steps", []))
        drifts = getattr(self, "drifts", [])
        if drifts:
            t = torch.tensor(drifts)
            out["drift_percentiles"] = {f"p{q}": float(t.quantile(q / 100)) for q in (10, 50, 90)}
            out["drift_max"] = float(t.max())
        return out
