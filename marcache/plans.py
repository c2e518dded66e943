"""Plans: what plugins decide for a step and the backend executes.

Plans are plain data (tensors, ints, strings) built once per step outside the tensor math. Each plan
records the plugin that last shaped it (``owner``) so reports and traces can attribute work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


#: the range of DDPM head steps a token may get (``sampler.head_steps`` and every head plan): the
#: reference's 1-step respacing has an empty posterior table and crashes, and the diffusion was
#: trained on 1000 steps
HEAD_STEPS_MIN, HEAD_STEPS_MAX = 2, 1000


def require_head_steps(key: str, value, nullable: bool = False) -> None:
    """Raise ``ValueError("key=value: must be in [2, 1000]")`` unless ``value`` is a head-step count
    (an int in ``[HEAD_STEPS_MIN, HEAD_STEPS_MAX]``; ``None`` too when ``nullable``). For configs."""
    if nullable and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not HEAD_STEPS_MIN <= value <= HEAD_STEPS_MAX:
        raise ValueError(f"{key}={value!r}: must be an integer in [{HEAD_STEPS_MIN}, {HEAD_STEPS_MAX}]"
                         + (" or null" if nullable else ""))


@dataclass
class ForwardPlan:
    """How the encoder and decoder run at this step.

    ``mode="full"``: the official path: the encoder runs on the buffer and every known token, the
    decoder on all buffer + L positions, for every row of the (CFG-doubled) batch.

    ``mode="cached"``: a partial pass (:func:`marcache.models.partial.cached_forward`) over the
    generation's :class:`~marcache.models.partial.FeatureCache` (``cache``), computing only the query
    positions of ``spec`` and reusing cached K/V and decoder inputs elsewhere. With
    ``branches="cond"`` only the conditional rows run and the unconditional pre-norm decoder states
    are rebuilt as ``cond + cond_diff`` (LazyMAR's condition cache).
    """

    mode: str = "full"
    owner: str = "full_recompute"
    cache: Optional[object] = None
    spec: Optional[object] = None  # CachedPass
    branches: str = "both"
    cond_diff: Optional[torch.Tensor] = None  # [B, P, D]
    # work a plugin does beside the transformer runs (e.g. measuring feature drift), priced as is:
    # {(component, operator): FLOPs of the whole batch (2 x MAC)}
    extra_flops: dict = field(default_factory=dict)


@dataclass
class HeadPlan:
    """How the diffusion head samples the tokens predicted at this step.

    **Budget rule** (docs/composition.md): the built-in ``ddpm_head`` lays down the sampler's budget
    (:meth:`lay_down`); every budget plugin *proposes* a cap (:meth:`cap`) and a token's budget is the
    **minimum** of the laid-down budget and every cap, whatever the plugins' order; then raisers
    (:meth:`raise_to`, e.g. FTS, registered ``trylast``) lift chosen tokens, possibly above the caps.
    The loop checks that ``steps`` equals exactly this composition, so a plugin that writes ``steps``
    directly (silently overwriting another's budget) fails with one line.

    Attributes:
        steps: ``[B, k]`` int64, DDPM head steps for each predicted token (row order = the sample's
            predicted positions in ascending order). Rows with different counts run as separate
            chains, grouped by count (no per-token loop).
        temperature: scales only the per-step noise.
        owner: plugin whose budget is binding for most tokens (the last raiser, else the lowest cap).
        chain_cache: optional per-head-step caching inside each chain (LazyMAR's head caches): an
            object with ``sample(diffloss, z, noise, temperature, cfg, steps, clip_denoised) -> [N, C]``
            executed by the backend in place of the plain chain; ``None`` = the official chain.
        clip_denoised: clamp each predicted x_0 to [-1, 1] (the sampler setting; pixel-space models).
        timestep_cap: largest original timestep a chain visits (DiSA's release clips its respaced
            timesteps at 950, merging duplicates); ``None`` = plain ADM respacing. Combined by min.
        caps / raises: the proposals, ``{plugin: int | [B, k] tensor}`` and ``{plugin: (index [B, n], value)}``.
    """

    steps: Optional[torch.Tensor]
    temperature: float = 1.0
    owner: str = "ddpm_head"
    chain_cache: Optional[object] = None
    clip_denoised: bool = False
    timestep_cap: Optional[int] = None
    base: Optional[torch.Tensor] = None
    base_owner: str = "ddpm_head"
    caps: dict = field(default_factory=dict)
    raises: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ the budget rule
    def lay_down(self, owner: str, steps: torch.Tensor) -> None:
        """The starting budget (the built-in ``ddpm_head``); resets every proposal."""
        self.base, self.caps, self.raises = steps.clone(), {}, {}
        self.steps, self.owner, self.base_owner = steps.clone(), owner, owner

    def cap(self, owner: str, budget) -> None:
        """Propose at most ``budget`` steps (an int or a ``[B, k]`` tensor); budgets combine by min."""
        if self.raises:
            raise RuntimeError(f"head plan: {owner!r} caps budgets after {sorted(self.raises)} raised them; "
                               "raisers must run last (trylast)")
        budget = torch.as_tensor(budget, dtype=torch.long)
        self.caps[owner] = budget if budget.dim() else int(budget)
        self.steps = torch.minimum(self.steps, budget.expand_as(self.steps))
        self.owner = self.binding_cap()

    def raise_to(self, owner: str, index: torch.Tensor, value: int) -> None:
        """Raise the tokens ``index [B, n]`` (per row) to at least ``value`` steps (FTS's detail budget)."""
        self.raises[owner] = (index.clone(), int(value))
        raised = torch.full_like(self.steps, 0).scatter_(1, index, int(value))
        self.steps = torch.maximum(self.steps, raised)
        self.owner = owner

    def cap_timesteps(self, owner: str, timestep: int) -> None:
        """Clip the chains' original timesteps at ``timestep`` (duplicates merged); combined by min."""
        self.timestep_cap = int(timestep) if self.timestep_cap is None else min(self.timestep_cap, int(timestep))

    def binding_cap(self) -> str:
        """The plugin whose cap sets the budget of the most tokens (the laid-down owner if no cap binds;
        ties go to the first name alphabetically, so the policy order never changes the answer)."""
        best, owner = 0, self.base_owner
        for name, budget in sorted(self.caps.items()):
            binding = (self.steps == torch.as_tensor(budget).expand_as(self.steps)) & (self.steps < self.base)
            if int(binding.sum()) > best:
                best, owner = int(binding.sum()), name
        return owner

    def composed(self) -> torch.Tensor:
        """``steps`` as the rule composes them from the recorded proposals."""
        steps = self.base.clone()
        for budget in self.caps.values():
            steps = torch.minimum(steps, torch.as_tensor(budget).expand_as(steps))
        for index, value in self.raises.values():
            steps = torch.maximum(steps, torch.zeros_like(steps).scatter_(1, index, value))
        return steps

    def budget_summary(self) -> dict:
        """JSON-serialisable proposals and effective budget of this step (run report, per step)."""
        def brief(b):
            if isinstance(b, int):
                return b
            lo, hi = int(b.min()), int(b.max())
            return lo if lo == hi else [lo, hi]

        return {"laid_down": brief(self.base) if self.base is not None else None,
                "caps": {k: brief(v) for k, v in self.caps.items()},
                "raises": {k: {"value": v, "tokens": int(i.numel())} for k, (i, v) in self.raises.items()},
                "effective": [int(self.steps.min()), int(self.steps.max())],
                "mean": float(self.steps.float().mean()),
                "timestep_cap": self.timestep_cap,
                "owner": self.owner}

    def spec(self, count: int) -> str:
        """Diffusion spec of a ``count``-step chain under this plan (``DiffLoss.schedule``)."""
        return str(count) if self.timestep_cap is None else f"{count}@{self.timestep_cap}"

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """``[(count, flat row indices into the [B*k] rows), ...]`` in ascending count."""
        flat = self.steps.reshape(-1)
        return [(int(c), (flat == c).nonzero(as_tuple=True)[0]) for c in torch.unique(flat).tolist()]


@dataclass(frozen=True)
class TransformerRun:
    """``layers`` consecutive blocks run on ``rows`` sequences with ``queries`` query tokens each,
    attending over ``keys`` keys (queries included; ``keys - queries`` of them cached). The unit of
    FLOP accounting. ``mlp_queries`` (default: ``queries``) is the number of tokens that continue
    through the MLP half when a block is narrowed between its attention and MLP (LazyMAR)."""

    rows: int
    queries: int
    keys: int
    layers: int
    mlp_queries: Optional[int] = None


def transformer_runs(step, plan: ForwardPlan) -> tuple[list[TransformerRun], list[TransformerRun]]:
    """The encoder and decoder work a forward plan implies at ``step`` (what the backend executes)."""
    gen, model = step.gen, step.gen.model
    rows = 2 * gen.batch_size if gen.guided else gen.batch_size
    enc = model.buffer_size + gen.seq_len - step.num_masked
    dec = model.buffer_size + gen.seq_len
    n_enc, n_dec = len(model.encoder_blocks), len(model.decoder_blocks)
    if plan.mode == "full":
        return [TransformerRun(rows, enc, enc, n_enc)], [TransformerRun(rows, dec, dec, n_dec)]
    if plan.mode != "cached":
        raise ValueError(f"unknown forward plan mode {plan.mode!r}")
    spec = plan.spec
    if plan.branches == "cond":
        rows = gen.batch_size
    enc_q = enc if spec.encoder_queries is None else int(spec.encoder_queries.shape[1])
    dec_q = dec if spec.decoder_queries is None else int(spec.decoder_queries.shape[1])
    encoder = [TransformerRun(rows, enc_q, enc, n_enc)]
    sel = spec.selection
    if sel is None:
        return encoder, [TransformerRun(rows, dec_q, dec, n_dec)]
    keep = min(sel.keep, dec_q)
    decoder = [TransformerRun(rows, dec_q, dec, sel.layer), TransformerRun(rows, dec_q, dec, 1, mlp_queries=keep)]
    if n_dec - sel.layer - 1 > 0:
        decoder.append(TransformerRun(rows, keep, dec, n_dec - sel.layer - 1))
    return encoder, [r for r in decoder if r.layers > 0]


def executed_positions(step, plan: ForwardPlan) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(recomputed, cached)``: ``[B, L]`` masks of the decoder outputs this step computed fresh and
    those it served from the feature cache (``None`` after a full pass).

    From what executed: the positions the partial pass carried through the last decoder layer (the
    :class:`~marcache.models.partial.FeatureCache` records them; a LazyMAR selection is known only
    then), else the plan's decoder queries (the shape-only backend runs no pass). No device sync."""
    mask = step.mask
    if plan.mode != "cached":
        return torch.ones_like(mask), None
    b, buf = step.gen.batch_size, step.gen.model.buffer_size
    pos = getattr(plan.cache, "last_decoder_positions", None)
    if pos is None or pos.is_meta:
        pos = plan.spec.decoder_queries
    if pos is None:  # every position ran
        return torch.ones_like(mask), torch.zeros_like(mask)
    ran = torch.zeros(b, buf + mask.shape[1], dtype=torch.bool, device=mask.device)
    ran.scatter_(1, pos[:b].to(mask.device), True)  # the conditional rows (CFG halves share positions)
    recomputed = ran[:, buf:]
    return recomputed, ~recomputed


def position_counts(record: "StepRecord", branches: str = "both") -> dict:
    """Positions of one step over the batch's samples, by where their features came from:
    decoder outputs recomputed / served from the feature cache, encoder positions (buffer included)
    recomputed / read from cached K/V, and positions of the unconditional CFG branch rebuilt from the
    condition cache. Values may be 0-d device tensors (``int()`` them when reporting)."""
    b, seq_len = record.predicted.shape
    enc = record.encoder_runs[0]
    guided = record.rows == 2 * b
    return {
        "decoder_recomputed": record.recomputed.sum(),
        "decoder_from_cache": record.cached.sum() if record.cached is not None else 0,
        "encoder_recomputed": b * enc.queries,
        "encoder_from_cache": b * (enc.keys - enc.queries),
        "uncond_from_cond_cache": b * seq_len if guided and branches == "cond" else 0,
    }


def cache_hit_summary(steps: list[dict]) -> dict:
    """Run totals of the per-step ``positions`` counts (see :func:`position_counts`) and hit rates."""
    totals: dict[str, int] = {}
    for s in steps:
        for key, n in s["positions"].items():
            totals[key] = totals.get(key, 0) + int(n)

    def part(name: str) -> dict:
        fresh, hit = totals.get(f"{name}_recomputed", 0), totals.get(f"{name}_from_cache", 0)
        return {"recomputed": fresh, "from_cache": hit, "hit_rate": hit / (fresh + hit) if fresh + hit else 0.0}

    return {"decoder": part("decoder"), "encoder": part("encoder"),
            "uncond_from_cond_cache": totals.get("uncond_from_cond_cache", 0)}


#: head modules a chain cache reports row invocations of (``StepRecord.head_module_rows``)
HEAD_MODULES = ("time_embed", "cond_embed", "input_proj", "block_adaln", "block_mlp", "final")


@dataclass
class StepRecord:
    """What actually ran at one step (for accounting, reports and traces).

    Attributes:
        encoder_runs / decoder_runs: the transformer work executed (see :class:`TransformerRun`).
        rows: rows of the encoder/decoder batch (2B with CFG).
        head_rows_by_steps: ``{head steps: network rows per head step}`` (CFG pairs counted as 2).
        predicted: ``[B, L]`` positions predicted this step.
        recomputed: ``[B, L]`` positions whose decoder outputs were computed fresh this step (from
            the executed plan, see :func:`executed_positions`).
        cached: ``[B, L]`` positions whose decoder outputs were served from the feature cache
            (None: a full pass, nothing cached).
        owners: the plugin that last shaped each plan (``{"forward": ..., "head": ...}``).
    """

    step: int
    encoder_runs: list
    decoder_runs: list
    rows: int
    head_rows_by_steps: dict
    predicted: torch.Tensor
    recomputed: torch.Tensor
    cfg_scale: float
    owners: dict = field(default_factory=dict)
    cached: Optional[torch.Tensor] = None
    # with a chain cache: row invocations per head module over the step's chains (see
    # HEAD_MODULES); None = every head step ran the official network on every row
    head_module_rows: Optional[dict] = None
    extra_flops: Optional[dict] = None  # ForwardPlan.extra_flops of the step
