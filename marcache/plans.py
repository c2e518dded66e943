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


@dataclass
class HeadPlan:
    """How the diffusion head samples the tokens predicted at this step.

    Attributes:
        steps: ``[B, k]`` int64, DDPM head steps for each predicted token (row order = the sample's
            predicted positions in ascending order). Rows with different counts run as separate
            chains, grouped by count (no per-token loop).
        temperature: scales only the per-step noise.
        owner: plugin that last changed the budgets.
        chain_cache: optional per-head-step caching inside each chain (LazyMAR's head caches): an
            object with ``sample(diffloss, z, noise, temperature, cfg, steps, clip_denoised) -> [N, C]``
            executed by the backend in place of the plain chain; ``None`` = the official chain.
        clip_denoised: clamp each predicted x_0 to [-1, 1] (the sampler setting; pixel-space models).
    """

    steps: torch.Tensor
    temperature: float = 1.0
    owner: str = "ddpm_head"
    chain_cache: Optional[object] = None
    clip_denoised: bool = False

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
        recomputed: ``[B, L]`` positions whose decoder features were computed fresh this step.
        cached: ``[B, L]`` positions whose features were served from a cache (None: none).
        owners: which plugin owned each plan (``{"forward": ..., "head": ..., "cfg": ...}``).
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
