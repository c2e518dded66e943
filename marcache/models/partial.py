"""Partial MAR forward passes over cached per-layer features: the one mechanism feature caches use.

A :class:`FeatureCache` holds, for every position of the ``buffer + L`` sequence, each layer's keys and
values (encoder and decoder), the decoder inputs, the selection layer's values from the previous pass
and the final pre-norm decoder states. A pass computes only its *query* positions: at every layer
their fresh K/V are written into the cache, and attention runs over the K/V of all *present*
positions (fresh for queries, cached for the others). With every present position a query this is the
ordinary forward (same keys in the same order). LazyMAR (incremental encoder, similarity-selected
decoder tokens) and ReCAP (local steps on a group) are both plans for :func:`cached_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .mar import gather_positions, mask_positions


@dataclass
class TokenSelection:
    """Mid-decoder selection (LazyMAR): after the attention of decoder layer ``layer`` every row keeps
    the ``keep`` positions whose values changed most since the previous pass (mean over heads of
    cos(V_now, V_prev), ascending); ``forced`` positions ``[R, P]`` are always kept."""

    layer: int
    keep: int
    forced: torch.Tensor  # [B, P] bool
    # score given to forced positions before the ascending sort: below any cosine (-2) guarantees
    # they are kept; the released code's 0 lets a negative-cosine position displace one
    forced_score: float = -2.0
    # positions not kept leave zeros as their final states (the released unpruning), instead of the
    # cached states of the previous pass; only a displaced forced position is ever read
    zero_unselected: bool = False


@dataclass
class CachedPass:
    """What one partial pass computes. Positions index the ``buffer + L`` sequence and are given per
    sample (``[B, q]``, sorted); both CFG halves of a sample use the same positions.

    Attributes:
        encoder_queries: positions recomputed in the encoder (None: every visible one).
        decoder_queries: positions recomputed in the decoder from layer 0 (None: all).
        selection: optional mid-decoder narrowing of the decoder queries.
    """

    encoder_queries: Optional[torch.Tensor] = None
    decoder_queries: Optional[torch.Tensor] = None
    selection: Optional[TokenSelection] = None


@dataclass
class FeatureCache:
    """Per-position features of every row of the batch (allocated on the first pass)."""

    dtype: torch.dtype = torch.float32
    # attention uses the fresh K/V of the query positions at full precision; False: as stored in the
    # cache (rounded to ``dtype``, as under the released LazyMAR's fp16 autocast)
    exact_fresh_kv: bool = True
    enc_k: Optional[torch.Tensor] = None  # [layers, R, H, P, hd]
    enc_v: Optional[torch.Tensor] = None
    dec_k: Optional[torch.Tensor] = None
    dec_v: Optional[torch.Tensor] = None
    dec_in: Optional[torch.Tensor] = None  # [R, P, D] decoder inputs (embed + mask tokens + pos)
    prenorm: Optional[torch.Tensor] = None  # [R, P, D] last decoder states before decoder_norm
    sel_v: Optional[torch.Tensor] = None  # [R, H, P, hd] values at the selection layer, previous pass
    # [R, q] positions the last pass carried through the final decoder layer (its fresh outputs)
    last_decoder_positions: Optional[torch.Tensor] = None

    def allocate(self, model, rows: int, device) -> None:
        p = model.buffer_size + model.seq_len
        enc, dec = model.encoder_blocks, model.decoder_blocks
        he, hd_e = enc[0].attn.num_heads, enc[0].attn.head_dim
        hd, hd_d = dec[0].attn.num_heads, dec[0].attn.head_dim
        kw = dict(device=device, dtype=self.dtype)
        self.enc_k = torch.zeros(len(enc), rows, he, p, hd_e, **kw)
        self.enc_v = torch.zeros_like(self.enc_k)
        self.dec_k = torch.zeros(len(dec), rows, hd, p, hd_d, **kw)
        self.dec_v = torch.zeros_like(self.dec_k)
        width = model.decoder_embed.out_features
        self.dec_in = torch.zeros(rows, p, width, device=device)
        self.prenorm = torch.zeros(rows, p, width, device=device)

    @property
    def ready(self) -> bool:
        return self.enc_k is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.enc_k, self.enc_v, self.dec_k, self.dec_v,
                                                          self.dec_in, self.prenorm, self.sel_v) if t is not None)


def _scatter_positions(x: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> None:
    x.scatter_(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]), values.to(x.dtype))


def _kv_index(pos: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return pos[:, None, :, None].expand(-1, heads, -1, head_dim)


def _layer(block, x, q_pos, present, cache_k, cache_v, stop_after_attention=False, exact_fresh=True):
    """One block on query rows ``x [R, q, D]`` at positions ``q_pos``, attending over ``present``.

    ``q_pos=None``: the queries are all positions in order; ``present=None``: attend over all positions
    (then the cache is read as it is, without a gather: a full pass costs what the plain model costs).
    """
    attn = block.attn
    q, k, v = attn.project_qkv(block.norm1(x))
    if q_pos is None:
        cache_k.copy_(k)
        cache_v.copy_(v)
    else:
        idx = _kv_index(q_pos, attn.num_heads, attn.head_dim)
        cache_k.scatter_(2, idx, k.to(cache_k.dtype))
        cache_v.scatter_(2, idx, v.to(cache_v.dtype))
    # the fresh K/V are used exactly at the query positions unless exact_fresh is off (the cache may hold
    # them at lower precision)
    lossy = cache_k.dtype != q.dtype
    rounded = not exact_fresh and lossy
    if present is q_pos:  # every attended position is a query (both None: all positions)
        keys, vals = (k.to(cache_k.dtype).to(q.dtype), v.to(cache_v.dtype).to(q.dtype)) if rounded else (k, v)
    else:
        if present is None:
            keys, vals = cache_k.to(q.dtype), cache_v.to(q.dtype)
        else:
            kidx = _kv_index(present, attn.num_heads, attn.head_dim)
            keys = torch.gather(cache_k, 2, kidx).to(q.dtype)
            vals = torch.gather(cache_v, 2, kidx).to(q.dtype)
        if exact_fresh and lossy:
            slots = _kv_index(q_pos, attn.num_heads, attn.head_dim) if present is None else _query_slots(present, q_pos, attn)
            keys, vals = keys.scatter(2, slots, k), vals.scatter(2, slots, v)
    out = F.scaled_dot_product_attention(q, keys, vals)
    b, n, c = x.shape
    x = x + attn.proj(out.transpose(1, 2).reshape(b, n, c))
    if stop_after_attention:
        return x, v
    return block.mlp_residual(x), v


def _query_slots(present, q_pos, attn):
    """Index of each query position inside ``present`` (both sorted per row), as a K/V index."""
    slots = torch.searchsorted(present.contiguous(), q_pos.contiguous())
    return _kv_index(slots, attn.num_heads, attn.head_dim)


def _per_row(pos: Optional[torch.Tensor], r: int) -> Optional[torch.Tensor]:
    """Per-sample positions ``[B, q]`` -> per-row ``[R, q]`` (CFG halves share positions)."""
    if pos is None:
        return None
    return pos.repeat(r // pos.shape[0], *([1] * (pos.dim() - 1))).contiguous()


def cached_forward(model, tokens, mask, class_embedding, cache: FeatureCache, spec: CachedPass, rows: slice,
                   num_masked: int) -> torch.Tensor:
    """Run the encoder and decoder as ``spec`` says, reading and updating ``cache``.

    ``tokens [R, L, C]``, ``mask [R, L]`` (1 = masked, ``num_masked`` per row) and
    ``class_embedding [R, D]`` are the rows ``rows`` of the (CFG-doubled) batch. Returns the final
    decoder states before ``decoder_norm``, ``[R, P, D]``, exact at the decoder's query positions
    (other positions hold cached states).
    """
    r = tokens.shape[0]
    device = tokens.device
    visible = model.with_buffer(mask) == 0  # [R, P]
    p = visible.shape[1]
    present = mask_positions(visible, p - num_masked)

    # ---------------------------------------------------------------- encoder
    enc_in = model.encoder_input(tokens, class_embedding)  # position-wise, all positions
    q_pos = present if spec.encoder_queries is None else _per_row(spec.encoder_queries, r)
    x = gather_positions(enc_in, q_pos)
    for i, block in enumerate(model.encoder_blocks):
        x, _ = _layer(block, x, q_pos, present, cache.enc_k[i, rows], cache.enc_v[i, rows], exact_fresh=cache.exact_fresh_kv)
    x = model.encoder_norm(x)

    # ---------------------------------------------------------------- decoder inputs
    # encoded positions get fresh inputs; other visible ones keep their cached inputs (LazyMAR's
    # decoder-input cache); masked positions hold the mask token
    dec_in = cache.dec_in[rows]
    _scatter_positions(dec_in, q_pos, model.decoder_embed(x) + model.decoder_pos_embed_learned[0, q_pos])
    masked_input = (model.mask_token + model.decoder_pos_embed_learned).expand(r, -1, -1)
    dec_in.copy_(torch.where(visible.unsqueeze(-1), dec_in, masked_input))

    # ---------------------------------------------------------------- decoder
    # every decoder query attends over all positions (present=None); ``full`` while the queries are all of them
    full = spec.decoder_queries is None
    d_pos = torch.arange(p, device=device).expand(r, -1) if full else _per_row(spec.decoder_queries, r)
    x = dec_in.clone() if full else gather_positions(dec_in, d_pos)
    sel = spec.selection
    forced = _per_row(sel.forced, r) if sel is not None else None
    for i, block in enumerate(model.decoder_blocks):
        queries = None if full else d_pos
        if sel is not None and i == sel.layer:
            x, v_now = _layer(block, x, queries, None, cache.dec_k[i, rows], cache.dec_v[i, rows], stop_after_attention=True,
                              exact_fresh=cache.exact_fresh_kv)
            keep = _select(v_now, d_pos, cache, rows, sel.keep, forced, sel.forced_score)
            x = gather_positions(x, torch.searchsorted(d_pos.contiguous(), keep))
            d_pos, full = keep, False
            x = block.mlp_residual(x)
        else:
            x, _ = _layer(block, x, queries, None, cache.dec_k[i, rows], cache.dec_v[i, rows], exact_fresh=cache.exact_fresh_kv)
    prenorm = cache.prenorm[rows]
    if sel is not None and sel.zero_unselected:
        prenorm.zero_()
    _scatter_positions(prenorm, d_pos, x)
    cache.last_decoder_positions = d_pos
    return prenorm


def _select(v_now, d_pos, cache: FeatureCache, rows, keep: int, forced: torch.Tensor, forced_score: float = -2.0) -> torch.Tensor:
    """Positions kept after the selection layer, sorted per row."""
    r, heads, q, hd = v_now.shape
    p = cache.dec_k.shape[3]
    full_v = torch.zeros(r, heads, p, hd, device=v_now.device, dtype=v_now.dtype)
    full_v.scatter_(2, _kv_index(d_pos, heads, hd), v_now)
    if cache.sel_v is None:
        cache.sel_v = torch.zeros(cache.dec_k.shape[1], heads, p, hd, device=v_now.device, dtype=v_now.dtype)
    prev = cache.sel_v[rows]
    score = F.cosine_similarity(full_v, prev.to(full_v.dtype), dim=-1).mean(dim=1)  # [R, P]
    # forced positions get ``forced_score`` (default below any cosine), then the most-changed ones
    score = torch.where(forced, torch.full_like(score, forced_score), score)
    keep = min(keep, p)
    chosen = score.topk(keep, dim=1, largest=False).indices.sort(dim=1).values
    cache.sel_v[rows] = full_v.to(cache.sel_v.dtype)
    return chosen
