"""Pre-norm ViT blocks with the parameter names of timm 0.9.12 ``Block`` (as MAR uses them).

The attention is written so that acceleration plugins can run a block on a *subset* of query tokens
while attending to keys/values that were computed earlier (LazyMAR's token cache, ReCAP's local
steps): :meth:`Attention.forward` takes optional external K/V that are concatenated in front of the
fresh ones and can return the fresh K/V so the caller may cache them. MAR's attention is bidirectional
with no positional bias (positions enter through learned embeddings at the input), so the order of the
keys does not matter and cached K/V can be kept in any order.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


class KV(NamedTuple):
    """Keys and values of one attention layer, each ``[B, heads, S, head_dim]``."""

    k: torch.Tensor
    v: torch.Tensor


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (bias) and SDPA."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, N, D]`` -> q, k, v each ``[B, heads, N, head_dim]``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(
        self,
        x: torch.Tensor,
        past_kv: Optional[KV] = None,
        return_kv: bool = False,
    ):
        """Attend from the tokens ``x`` to themselves and, if given, to ``past_kv``.

        ``past_kv`` holds keys/values of other positions (computed earlier); they are prepended to
        the fresh keys/values of ``x``. With ``return_kv`` the fresh K/V of ``x`` are returned too.
        """
        b, n, c = x.shape
        q, k, v = self.project_qkv(x)
        fresh = KV(k, v)
        if past_kv is not None:
            k = torch.cat([past_kv.k.to(k.dtype), k], dim=2)
            v = torch.cat([past_kv.v.to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        return (out, fresh) if return_kv else out


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, timm names."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """timm-compatible pre-norm transformer block, split into its two residual halves.

    ``attention_residual`` and ``mlp_residual`` exist separately so a plugin can stop between them
    (LazyMAR selects tokens after the attention of one layer and runs that layer's MLP on a subset).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer, proj_drop: float, attn_drop: float):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def attention_residual(self, x: torch.Tensor, past_kv: Optional[KV] = None, return_kv: bool = False):
        """``x + attn(norm1(x))``; with ``return_kv`` also the fresh K/V of ``x``."""
        out = self.attn(self.norm1(x), past_kv=past_kv, return_kv=return_kv)
        if return_kv:
            out, kv = out
            return x + out, kv
        return x + out

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + mlp(norm2(x))``."""
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, past_kv: Optional[KV] = None, return_kv: bool = False):
        if return_kv:
            x, kv = self.attention_residual(x, past_kv, return_kv=True)
            return self.mlp_residual(x), kv
        return self.mlp_residual(self.attention_residual(x, past_kv))
