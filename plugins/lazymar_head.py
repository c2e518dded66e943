"""LazyMAR diffusion-head caches (methods.md §1.5): CFG-delta reuse, block skipping, MLP reuse.

Inside every DDPM chain of the head (reset at every MAR step; nothing survives a chain), the respaced
head steps ``i = T-1 .. 0`` are of three kinds:

* **full** (``i == T-1`` or ``i % refresh_interval == 0``): the plain guided forward on both CFG
  halves. It stores ``delta = eps_cond - eps_uncond`` (epsilon channels only), every ResBlock's MLP
  output (before the gate) and, for the blocks in ``skip_blocks``, the block residual
  ``x_out - x_in``.
* **cached, MLP recomputed** (not full, ``i > mlp_reuse_threshold * T``): the conditional half only.
  ``eps = eps_uncond + cfg * (eps_cond - eps_uncond)`` with ``eps_uncond = eps_cond - delta``;
  variance channels from the conditional rows. Blocks of ``skip_blocks`` are skipped
  (``x += cached residual``); the other blocks run in full (their MLP output replaces the cache).
* **cached** (the remaining steps): as above, but the non-skipped blocks recompute only their adaLN
  modulation from the current ``(t, z)`` and add ``gate * cached MLP output``.

Input projection, time and condition embeddings and the final layer always run. Without guidance
(``cfg == 1``) there is no delta and no second half: cached steps are the plain forward with block and
MLP reuse.

The released code decides the two reuses with separate thresholds (both 7): ``refresh_interval``
for the blocks and MLPs, ``cfg_refresh_interval`` (default: the same) for the CFG delta. When they
differ, a step may run both halves with cached blocks, or the cond half with full blocks; every cache
keeps the rows it was computed on and is fitted to a step's rows as the release does (the first rows
when it has more, repeated when it has fewer).

The released constants are tuned for 100 head steps. Here the refresh interval is scaled with the
head-step count ``T`` (``round(refresh_interval * T / reference_head_steps)``, at least 1; disable
with ``scale_with_head_steps: false``) and the MLP threshold is a fraction of ``T``, so at ``T = 100``
the released schedule is reproduced exactly: 16 full steps {99, 98, 91, 84, ..., 7, 0}, MLPs
recomputed at i = 92..97.

Every operation is row-wise (Linear, LayerNorm, SiLU, elementwise), so a token's chain does not depend
on the other tokens of the batch.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from marcache.errors import ConfigError
from marcache.hookspecs import hookimpl
from marcache.models.diffloss import modulate
from marcache.plans import HEAD_MODULES, require_head_steps
from marcache.plugin import Plugin, register_plugin
from marcache.search_space import Float, Int

#: head-step kinds, in the order of their cost
FULL = "full"
CACHED_MLP = "cached_mlp_recompute"
CACHED = "cached"


@dataclass
class LazyMARHeadConfig:
    """Parameters of the head caches; defaults are the released LazyMAR constants (for T = 100)."""

    refresh_interval: int = 7  # full head step when i % interval == 0 (and at i == T-1), at T = reference_head_steps
    reference_head_steps: int = 100  # head-step count the interval is tuned for
    scale_with_head_steps: bool = True  # interval = max(1, round(refresh_interval * T / reference_head_steps))
    skip_blocks: List[int] = field(default_factory=lambda: [1, 2, 3, 4])  # ResBlocks replaced by their cached residual
    mlp_reuse_threshold: float = 0.9  # non-skipped MLPs are recomputed at cached steps while i > threshold * T
    cfg_delta: bool = True  # cached steps run the cond half only, eps_uncond = eps_cond - delta
    cfg_refresh_interval: Optional[int] = None  # both CFG halves (delta refreshed) when i % it == 0; None = refresh_interval

    def __post_init__(self):
        if not isinstance(self.refresh_interval, int) or self.refresh_interval < 1:
            raise ValueError(f"refresh_interval={self.refresh_interval}: must be an integer >= 1 (1 = every head step full)")
        require_head_steps("reference_head_steps", self.reference_head_steps)
        blocks = [int(b) for b in self.skip_blocks]
        if any(b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(f"skip_blocks={blocks}: must be distinct block indices >= 0")
        self.skip_blocks = sorted(blocks)
        if not 0.0 <= self.mlp_reuse_threshold <= 1.0:
            raise ValueError(f"mlp_reuse_threshold={self.mlp_reuse_threshold}: must be in [0, 1] (fraction of the head steps)")
        if self.cfg_refresh_interval is not None and (not isinstance(self.cfg_refresh_interval, int) or self.cfg_refresh_interval < 1):
            raise ValueError(f"cfg_refresh_interval={self.cfg_refresh_interval}: must be an integer >= 1 or null (= refresh_interval)")

    def effective_interval(self, num_steps: int, interval: Optional[int] = None) -> int:
        """Refresh interval (in respaced head steps) used for a chain of ``num_steps`` steps."""
        interval = self.refresh_interval if interval is None else interval
        if not self.scale_with_head_steps:
            return interval
        return max(1, round(interval * num_steps / self.reference_head_steps))

    def effective_cfg_interval(self, num_steps: int) -> int:
        """Interval of the CFG-delta refresh (both halves run) for a chain of ``num_steps`` steps."""
        return self.effective_interval(num_steps, self.cfg_refresh_interval)


def head_step_kinds(num_steps: int, config: LazyMARHeadConfig) -> list[str]:
    """Kind of each head step of a ``num_steps`` chain, in execution order (``i = T-1 .. 0``)."""
    interval = config.effective_interval(num_steps)
    mlp_above = config.mlp_reuse_threshold * num_steps
    kinds = []
    for i in range(num_steps - 1, -1, -1):
        if i == num_steps - 1 or i % interval == 0:
            kinds.append(FULL)
        elif i > mlp_above:
            kinds.append(CACHED_MLP)
        else:
            kinds.append(CACHED)
    return kinds


def cfg_full_steps(num_steps: int, config: LazyMARHeadConfig) -> list[bool]:
    """Per head step (execution order): do both CFG halves run (and refresh the delta)?"""
    interval = config.effective_cfg_interval(num_steps)
    return [i == num_steps - 1 or i % interval == 0 for i in range(num_steps - 1, -1, -1)]


def fit_rows(cached: torch.Tensor, rows: int) -> torch.Tensor:
    """A cache computed on other rows, fitted to ``rows`` as the release does: its first rows when it
    has more (the cond half of a two-half cache), repeated when it has fewer (a cond-half cache on
    both halves)."""
    if cached.shape[0] > rows:
        return cached[:rows]
    if cached.shape[0] < rows:
        return torch.cat([cached, cached])
    return cached


def schedule_summary(num_steps: int, config: LazyMARHeadConfig) -> dict:
    """Effective schedule of a ``num_steps`` chain (for reports and FLOP accounting)."""
    kinds = head_step_kinds(num_steps, config)
    steps = list(range(num_steps - 1, -1, -1))
    cfg_full = cfg_full_steps(num_steps, config)
    return {
        "refresh_interval": config.effective_interval(num_steps),
        "cfg_refresh_interval": config.effective_cfg_interval(num_steps),
        "cfg_full_steps": [i for i, f in zip(steps, cfg_full) if f],
        "mlp_recompute_above_i": config.mlp_reuse_threshold * num_steps,
        FULL: kinds.count(FULL),
        CACHED_MLP: kinds.count(CACHED_MLP),
        CACHED: kinds.count(CACHED),
        "full_steps": [i for i, k in zip(steps, kinds) if k == FULL],
    }


class LazyMARHeadCache:
    """The cached DDPM chain: a drop-in for ``DiffLoss.sample_with_noise`` (``HeadPlan.chain_cache``).

    State (delta, residuals, MLP outputs) lives only inside one :meth:`sample` call. ``counter``
    (the plugin's engagement) receives what ran: ``full_head_steps`` / ``cached_head_steps`` per
    chain, ``*_token_steps`` weighted by the chain's tokens, ``blocks_skipped`` / ``mlp_reused`` /
    ``mlp_recomputed`` per chain step and block (cached steps only), ``chains``.
    """

    def __init__(self, config: LazyMARHeadConfig, counter: Optional[Counter] = None):
        self.config = config
        self.counter = counter if counter is not None else Counter()
        self.peak_cache_bytes = 0
        self.schedules: dict[int, dict] = {}

    def module_rows(self, steps: int, tokens: int, guided: bool, depth: int) -> dict:
        """Row invocations of each head module over one chain (FLOP accounting; marcache.flops).

        Steps with both CFG halves (every row) are the CFG-full ones; the others run the conditional
        rows only (with ``cfg_delta``). Full block steps run every block; cached ones skip
        ``skip_blocks`` and recompute the kept blocks' MLPs only on ``cached_mlp`` steps.
        """
        rows_full = 2 * tokens if guided else tokens
        rows_cached = tokens if (guided and self.config.cfg_delta) else rows_full
        kept = depth - len(self.config.skip_blocks)
        out = dict.fromkeys(HEAD_MODULES, 0)
        for kind, cfg_full in zip(head_step_kinds(steps, self.config), cfg_full_steps(steps, self.config)):
            r = rows_full if cfg_full else rows_cached
            if kind == FULL:
                adaln, mlp = depth, depth
            else:
                adaln, mlp = kept, kept if kind == CACHED_MLP else 0
            out["time_embed"] += r
            out["cond_embed"] += r
            out["input_proj"] += r
            out["final"] += r
            out["block_adaln"] += adaln * r
            out["block_mlp"] += mlp * r
        # as executed, the condition embedding runs once per chain and the time MLP once per step
        out["executed_cond_embed"] = rows_full
        out["executed_time_embed"] = steps
        return out

    def kinds(self, num_steps: int) -> list[str]:
        if num_steps not in self.schedules:
            self.schedules[num_steps] = schedule_summary(num_steps, self.config)
        return head_step_kinds(num_steps, self.config)

    @torch.no_grad()
    def sample(self, diffloss, z: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0,
               steps=None, clip_denoised: bool = False) -> torch.Tensor:
        """Same arguments and result as :meth:`DiffLoss.sample_with_noise` (conditional samples ``[N, C]``)."""
        cfg_ = self.config
        net, c = diffloss.net, diffloss.in_channels
        sched = diffloss.schedule(steps) if steps is not None else diffloss.gen_diffusion
        num_steps = sched.num_timesteps
        kinds = self.kinds(num_steps)
        cfg_fulls = cfg_full_steps(num_steps, cfg_)
        guided = cfg != 1.0
        n = noise.shape[0]
        skip = set(cfg_.skip_blocks)
        half_only = guided and cfg_.cfg_delta  # CFG-delta reuse: steps that are not CFG-full run the cond half

        x = noise[:, 0]
        c_emb = net.cond_embed(z)  # once per chain, as the plain chain does
        delta = None
        residual: dict[int, torch.Tensor] = {}  # block -> x_out - x_in at the last full block step
        mlp_out: dict[int, torch.Tensor] = {}  # block -> last computed MLP output, before the gate

        for j, i in enumerate(range(num_steps - 1, -1, -1)):
            kind = kinds[j]
            t = torch.full((n,), i, dtype=torch.long, device=z.device)
            t_emb = diffloss.time_embedding(sched, j)
            both = guided and (cfg_fulls[j] or not half_only)
            h, y = (torch.cat([x, x], dim=0), t_emb + c_emb) if both else (x, t_emb + c_emb[:n])
            if kind == FULL:
                out = self._trunk(net, h, y, skip, residual, mlp_out)
            else:
                out = self._trunk_cached(net, h, y, skip, residual, mlp_out, kind == CACHED_MLP)
            if both:
                eps_c, eps_u = out[:n, :c], out[n:, :c]
                if half_only:
                    delta = eps_c - eps_u
            elif guided:
                eps_c = out[:, :c]
                eps_u = eps_c - delta
            if guided:
                out = torch.cat([eps_u + cfg * (eps_c - eps_u), out[:n, c:]], dim=1)
            if kind == FULL:
                self.counter["full_head_steps"] += 1
                self.counter["full_head_token_steps"] += n
            else:
                kept = len(net.res_blocks) - len(skip)
                self.counter["cached_head_steps"] += 1
                self.counter["cached_head_token_steps"] += n
                self.counter["blocks_skipped"] += len(skip)
                self.counter["mlp_recomputed" if kind == CACHED_MLP else "mlp_reused"] += kept
            if half_only and cfg_fulls[j] != (kind == FULL):  # only with separate thresholds
                self.counter["cfg_steps_off_block_schedule"] += 1
            step = sched.p_mean_variance_from_output(out, x, t, clip_denoised)
            nonzero = 1.0 if i != 0 else 0.0
            x = step["mean"] + nonzero * torch.exp(0.5 * step["log_variance"]) * noise[:, 1 + j] * temperature
            if j == 0:
                held = [delta] if delta is not None else []
                nbytes = sum(v.numel() * v.element_size() for v in held + list(residual.values()) + list(mlp_out.values()))
                self.peak_cache_bytes = max(self.peak_cache_bytes, nbytes)
        self.counter["chains"] += 1
        return x

    @staticmethod
    def _trunk(net, x, y, skip, residual, mlp_out) -> torch.Tensor:
        """Full forward (as ``SimpleMLPAdaLN.forward_embedded``), filling the caches with every row:
        residuals of skipped blocks, MLP outputs of the others."""
        x = net.input_proj(x)
        for b, block in enumerate(net.res_blocks):
            shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
            m = block.mlp(modulate(block.in_ln(x), shift, scale))
            x_next = x + gate * m
            if b in skip:
                residual[b] = x_next - x
            else:
                mlp_out[b] = m
            x = x_next
        return net.final_layer(x, y)

    @staticmethod
    def _trunk_cached(net, x, y, skip, residual, mlp_out, recompute_mlp: bool) -> torch.Tensor:
        """Cached forward: skipped blocks add their residual; the others recompute the modulation and
        either run the MLP (refreshing its cache) or reuse the cached MLP output."""
        x = net.input_proj(x)
        rows = x.shape[0]
        for b, block in enumerate(net.res_blocks):
            if b in skip:
                x = x + fit_rows(residual[b], rows)
                continue
            shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
            if recompute_mlp:
                mlp_out[b] = block.mlp(modulate(block.in_ln(x), shift, scale))
            x = x + gate * fit_rows(mlp_out[b], rows)
        return net.final_layer(x, y)


@register_plugin
class LazyMARHead(Plugin):
    """Per-head-step caches inside every DDPM chain (LazyMAR §1.5), via ``HeadPlan.chain_cache``."""

    name = "lazymar_head"
    families = frozenset({"head"})
    Config = LazyMARHeadConfig
    search_space = {"refresh_interval": Int(2, 10), "mlp_reuse_threshold": Float(0.5, 1.0)}
    description = "LazyMAR head caches: full head step every 7 of 100 (CFG delta, block 1-4 skip, MLP reuse in between)"

    def __init__(self, config: Optional[LazyMARHeadConfig] = None):
        super().__init__(config)
        self.executor = LazyMARHeadCache(self.config, self.engagement)

    @hookimpl
    def marcache_configure(self, policy, model):
        depth = len(model.diffloss.net.res_blocks)
        bad = [b for b in self.config.skip_blocks if b >= depth]
        if bad:
            raise ConfigError(f"lazymar_head.skip_blocks={list(self.config.skip_blocks)}: block {bad[0]} does not exist, "
                              f"the model's head has {depth} blocks (indices 0..{depth - 1})")

    @hookimpl
    def marcache_head_plan(self, step, plan, z):
        plan.chain_cache = self.executor
        self.engagement["mar_steps"] += 1

    def report_section(self) -> dict:
        section = dict(self.engagement)
        section["params"] = dataclasses.asdict(self.config)
        section["effective_schedules"] = {str(t): s for t, s in sorted(self.executor.schedules.items())}
        section["peak_cache_bytes_per_chain"] = self.executor.peak_cache_bytes
        return section
