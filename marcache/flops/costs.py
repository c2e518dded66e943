"""The cost model: FLOPs of each execution shape of one MAR, priced once with fvcore and cached.

Components (per network row):

* ``encoder``: encoder blocks (per ``TransformerRun``), plus the per-step stem: ``z_proj`` on all L
  tokens (``encoder_norm`` is element-wise; the class embedding is a lookup, 0 FLOPs);
* ``decoder``: ``decoder_embed`` on the encoder outputs and the decoder blocks;
* ``head``: one full ``SimpleMLPAdaLN`` pass (time-embedding MLP, ``cond_embed``, trunk) per row per
  head step, the official per-step cost; the pieces marcache actually executes (trunk, hoisted
  ``cond_embed`` and time MLP, per-module rows of a chain cache) are priced separately;
* ``vae``: one KL-16 decode per image for latent models (reported apart from the totals).

Modules are traced as meta-device copies, so pricing costs no arithmetic and no memory.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Optional

import torch
from torch import nn

from marcache.plans import HEAD_MODULES

from .operators import Traced, flop_counter_mode, fvcore_flops


def _meta(module: nn.Module) -> nn.Module:
    """A meta-device copy of ``module`` (the module itself when already on meta)."""
    params = list(module.parameters()) + list(module.buffers())
    if params and all(p.is_meta for p in params):
        return module
    return copy.deepcopy(module).to("meta")


def _zeros(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device="meta")


def model_signature(model) -> tuple:
    """Hashable structure of a MAR: parameter names and shapes plus the sequence layout."""
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    heads = tuple(b.attn.num_heads for b in list(model.encoder_blocks)[:1] + list(model.decoder_blocks)[:1])
    return (type(model).__name__, model.seq_len, model.buffer_size, heads, shapes)


class CostModel:
    """FLOPs (2 x MAC) of each execution shape of one MAR, priced once with fvcore and cached.

    All costs are per network row (per sequence); every counted op is linear in the row count.
    """

    def __init__(self, model, vae: Optional[nn.Module] = None):
        self.seq_len = model.seq_len
        self.buffer_size = model.buffer_size
        self.token_dim = model.token_embed_dim
        self.latent_shape = (model.vae_embed_dim, model.seq_h * model.patch_size, model.seq_w * model.patch_size)
        self.uses_vae = model.vae_stride > 1
        self.enc_dim = model.z_proj.out_features
        self.dec_dim = model.decoder_embed.out_features
        self.z_dim = model.diffloss.net.cond_embed.in_features
        self._blocks = {"encoder": _meta(model.encoder_blocks[0]) if len(model.encoder_blocks) else None,
                        "decoder": _meta(model.decoder_blocks[0]) if len(model.decoder_blocks) else None}
        self._z_proj = _meta(model.z_proj)
        self._decoder_embed = _meta(model.decoder_embed)
        self._net = _meta(model.diffloss.net)
        self._vae = _meta(vae) if vae is not None else None
        self._cache: dict[tuple, Counter] = {}

    def _priced(self, key: tuple, fn) -> Counter:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def shapes_priced(self) -> int:
        return len(self._cache)

    # ---------------------------------------------------------------- transformer
    def block(self, part: str, queries: int, keys: int, mlp_queries: Optional[int] = None) -> Counter:
        """One encoder/decoder block on one row: ``queries`` fresh tokens attending over ``keys`` keys
        (``keys - queries`` of them cached K/V), then ``mlp_queries`` (default ``queries``) of them
        through the MLP half (a block narrowed between its halves, LazyMAR)."""
        if part not in self._blocks:
            raise ValueError(f"part must be encoder or decoder, got {part!r}")
        m = queries if mlp_queries is None else mlp_queries
        if not 1 <= queries <= keys or not 0 <= m <= queries:
            raise ValueError(f"a transformer run needs 1 <= queries <= keys and 0 <= mlp_queries <= queries, "
                             f"got queries={queries}, keys={keys}, mlp_queries={mlp_queries}")
        return self.attention_half(part, queries, keys) + self.mlp_half(part, m)

    def _width(self, part: str) -> int:
        return self.enc_dim if part == "encoder" else self.dec_dim

    def attention_half(self, part: str, queries: int, keys: int) -> Counter:
        """``x + attn(norm1(x))`` on one row (qkv and output projections, QK^T and AV)."""
        from marcache.models.blocks import KV

        block, dim = self._blocks[part], self._width(part)

        def price():
            x = _zeros(1, queries, dim)
            if queries == keys:
                return fvcore_flops(Traced(block, lambda b, x: b.attention_residual(x)), (x,))
            heads = block.attn.num_heads
            past = _zeros(1, heads, keys - queries, dim // heads)
            return fvcore_flops(Traced(block, lambda b, x, k, v: b.attention_residual(x, past_kv=KV(k, v))), (x, past, past))

        return self._priced((part, "attention", queries, keys), price)

    def mlp_half(self, part: str, tokens: int) -> Counter:
        """``x + mlp(norm2(x))`` on ``tokens`` tokens of one row."""
        if tokens == 0:
            return Counter()
        block, dim = self._blocks[part], self._width(part)
        return self._priced((part, "mlp", tokens),
                            lambda: fvcore_flops(Traced(block, lambda b, x: b.mlp_residual(x)), (_zeros(1, tokens, dim),)))

    def encoder_stem(self) -> Counter:
        """Per row and step: ``z_proj`` on all L tokens (``encoder_norm`` is element-wise)."""
        return self._priced(("encoder_stem",), lambda: fvcore_flops(self._z_proj, (_zeros(1, self.seq_len, self.token_dim),)))

    def decoder_stem(self, in_tokens: int) -> Counter:
        """Per row and step: ``decoder_embed`` on the encoder's ``in_tokens`` outputs."""
        return self._priced(("decoder_stem", in_tokens),
                            lambda: fvcore_flops(self._decoder_embed, (_zeros(1, in_tokens, self.enc_dim),)))

    # ---------------------------------------------------------------- head
    def head_step(self) -> Counter:
        """One official head pass on one row: time MLP + cond_embed + trunk."""
        args = (_zeros(1, self.token_dim), _zeros(1, dtype=torch.long), _zeros(1, self.z_dim))
        return self._priced(("head",), lambda: fvcore_flops(self._net, args))

    def head_trunk(self) -> Counter:
        """The trunk only (``forward_embedded``), what marcache runs per row per head step."""
        args = (_zeros(1, self.token_dim), _zeros(1, self._net.model_channels))
        return self._priced(("head_trunk",), lambda: fvcore_flops(Traced(self._net, lambda n, x, y: n.forward_embedded(x, y)), args))

    def head_module(self, name: str) -> Counter:
        """One row through one head module (``HEAD_MODULES``); the modules of an official head pass
        sum to :meth:`head_step` (blocks counted once each)."""
        net, row = self._net, _zeros(1, self._net.model_channels)
        calls = {
            "time_embed": lambda: fvcore_flops(net.time_embed, (_zeros(1, dtype=torch.long),)),
            "cond_embed": lambda: fvcore_flops(net.cond_embed, (_zeros(1, self.z_dim),)),
            "input_proj": lambda: fvcore_flops(net.input_proj, (_zeros(1, self.token_dim),)),
            "block_adaln": lambda: fvcore_flops(net.res_blocks[0].adaLN_modulation, (row,)),
            # a ResBlock's LayerNorm + MLP (its adaLN is priced separately)
            "block_mlp": lambda: fvcore_flops(Traced(net.res_blocks[0], lambda b, x: b.mlp(b.in_ln(x))), (row,)),
            "final": lambda: fvcore_flops(Traced(net.final_layer, lambda f, x, y: f(x, y)), (row, row)),
        }
        if name not in calls:
            raise ValueError(f"unknown head module {name!r}; known: {', '.join(HEAD_MODULES)}")
        return self._priced(("head_module", name), calls[name])

    def cond_embed(self) -> Counter:
        return self.head_module("cond_embed")

    def time_embed(self) -> Counter:
        return self.head_module("time_embed")

    # ---------------------------------------------------------------- VAE
    def vae_decode(self) -> Counter:
        """One image's VAE decode (empty for pixel-space models or when no VAE was given)."""
        if self._vae is None:
            return Counter()
        return self._priced(("vae",), self._price_vae)

    def _price_vae(self) -> Counter:
        # fvcore's jit trace cannot run meta-device convolutions (shape checks on traced ints), and a
        # real KL-16 decode costs ~0.1 TMAC of CPU time; FlopCounterMode prices it on meta instead
        # (the same 2-per-MAC convention; documented in docs/flops.md).
        z = _zeros(1, *self.latent_shape)
        with flop_counter_mode() as counter, torch.no_grad():
            self._vae.decode(z)
        return Counter({str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items() if n})


_COST_MODELS: dict[tuple, CostModel] = {}


def cost_model_for(model, with_vae: bool = True) -> CostModel:
    """The (process-wide cached) cost model of a MAR's structure; the VAE is the KL-16 one for
    latent models (built on meta, no weights needed)."""
    key = (model_signature(model), with_vae)
    if key not in _COST_MODELS:
        vae = None
        if with_vae and model.vae_stride > 1:
            from marcache.models.vae import AutoencoderKL

            with torch.device("meta"):
                vae = AutoencoderKL(embed_dim=model.vae_embed_dim)
        _COST_MODELS[key] = CostModel(model, vae)
    return _COST_MODELS[key]
