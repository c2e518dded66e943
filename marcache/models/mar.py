"""MAR (Li et al., 2024): masked autoregressive transformer over continuous tokens + diffusion head.

Parameter names, shapes, initialisation and the semantics of every public method follow LTH14/mar
(``models/mar.py`` at fe470ac), so official checkpoints load with ``strict=True``. Sampling (the
reference's ``sample_tokens``) lives in :mod:`marcache.scheduler`, the hooked loop; the model knows
nothing of it.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import Block
from .diffloss import DiffLoss

DEFAULT_NORM_LAYER = functools.partial(nn.LayerNorm, eps=1e-6)


def _truncnorm_ppf(u: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inverse CDF of the standard normal truncated to [a, b] (scipy's truncnorm without scipy)."""
    from statistics import NormalDist

    nd = NormalDist()
    lo, hi = nd.cdf(a), nd.cdf(b)
    return np.array([nd.inv_cdf(lo + float(x) * (hi - lo)) for x in np.atleast_1d(u)])


def mask_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of each row of ``mask [R, P]`` in ascending order, ``[R, count]``,
    when every row has exactly ``count`` of them. Same result as ``mask.nonzero()`` per row, but the
    size comes from the host, so no device sync (a stable sort puts the True entries first)."""
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :count]


def gather_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x [R, P, D]``, ``pos [R, q]`` -> ``[R, q, D]``."""
    return torch.gather(x, 1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MAR(nn.Module):
    """The MAR encoder/decoder with its diffusion head. Constructor = the official one."""

    def __init__(
        self,
        img_size: int = 256,
        vae_stride: int = 16,
        patch_size: int = 1,
        encoder_embed_dim: int = 1024,
        encoder_depth: int = 16,
        encoder_num_heads: int = 16,
        decoder_embed_dim: int = 1024,
        decoder_depth: int = 16,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        vae_embed_dim: int = 16,
        mask_ratio_min: float = 0.7,
        label_drop_prob: float = 0.1,
        class_num: int = 1000,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        buffer_size: int = 64,
        diffloss_d: int = 3,
        diffloss_w: int = 1024,
        num_sampling_steps: str = "100",
        diffusion_batch_mul: int = 4,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.vae_embed_dim = vae_embed_dim
        self.img_size = img_size
        self.vae_stride = vae_stride
        self.patch_size = patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size**2
        self.grad_checkpointing = grad_checkpointing
        self.num_classes = class_num
        self.buffer_size = buffer_size
        self.label_drop_prob = label_drop_prob
        self.mask_ratio_min = mask_ratio_min
        self.diffusion_batch_mul = diffusion_batch_mul

        # class embedding; fake_latent is the learned "null class" used for CFG and label dropout
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))

        # encoder
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim, bias=True)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList(
            [Block(encoder_embed_dim, encoder_num_heads, mlp_ratio, norm_layer, proj_dropout, attn_dropout) for _ in range(encoder_depth)]
        )
        self.encoder_norm = norm_layer(encoder_embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer, proj_dropout, attn_dropout) for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.initialize_weights()

        self.diffloss = DiffLoss(
            target_channels=self.token_embed_dim,
            z_channels=decoder_embed_dim,
            width=diffloss_w,
            depth=diffloss_d,
            num_sampling_steps=num_sampling_steps,
            grad_checkpointing=grad_checkpointing,
        )

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if m.weight is not None:
                    nn.init.ones_(m.weight)

    # ------------------------------------------------------------ tokens
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` latents -> ``[B, (H/p)(W/p), C p p]`` tokens (raster order, channel-major)."""
        bsz, c, h, w = x.shape
        p = self.patch_size
        h_, w_ = h // p, w // p
        x = x.reshape(bsz, c, h_, p, w_, p)
        x = torch.einsum("nchpwq->nhwcpq", x)
        return x.reshape(bsz, h_ * w_, c * p**2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        bsz = x.shape[0]
        p = self.patch_size
        x = x.reshape(bsz, self.seq_h, self.seq_w, self.vae_embed_dim, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(bsz, self.vae_embed_dim, self.seq_h * p, self.seq_w * p)

    # ------------------------------------------------------------ encoder
    def encoder_input(self, x: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L, C]`` -> ``[B, buffer + L, D]`` encoder inputs of *all* positions.

        ``z_proj``, class embedding written into every buffer slot, positional embedding, then
        ``z_proj_ln`` (LayerNorm after the positional embedding, as the reference).
        """
        x = self.z_proj(x)
        bsz, _, dim = x.shape
        x = torch.cat([torch.zeros(bsz, self.buffer_size, dim, device=x.device, dtype=x.dtype), x], dim=1)
        x[:, : self.buffer_size] = class_embedding.unsqueeze(1).to(x.dtype)
        x = x + self.encoder_pos_embed_learned
        return self.z_proj_ln(x)

    def with_buffer(self, mask: torch.Tensor) -> torch.Tensor:
        """Prepend the (never masked) buffer positions to a ``[B, L]`` mask."""
        return torch.cat([torch.zeros(mask.shape[0], self.buffer_size, device=mask.device, dtype=mask.dtype), mask], dim=1)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def visible_positions(self, mask: torch.Tensor, num_masked: int) -> torch.Tensor:
        """``[B, buffer + L - num_masked]`` positions (buffer included) of the visible tokens, ascending."""
        return mask_positions(self.with_buffer(mask) == 0, self.buffer_size + self.seq_len - num_masked)

    def forward_mae_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                            num_masked: Optional[int] = None) -> torch.Tensor:
        """Encode the visible tokens. ``mask [B, L]``: 1 = masked (dropped); equal count per row.

        With ``num_masked`` (the per-row count, known on the host) the visible tokens are gathered by
        position instead of boolean indexing: the same values, no device sync.
        """
        bsz = x.shape[0]
        if self.training:
            # label dropout: replace the class embedding by the null class with prob label_drop_prob
            drop = (torch.rand(bsz, device=x.device) < self.label_drop_prob).unsqueeze(-1).to(x.dtype)
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
        x = self.encoder_input(x, class_embedding)
        if num_masked is None:
            keep = (1 - self.with_buffer(mask)).nonzero(as_tuple=True)
            x = x[keep].reshape(bsz, -1, x.shape[-1])
        else:
            x = gather_positions(x, self.visible_positions(mask, num_masked))
        x = self._run_blocks(self.encoder_blocks, x)
        return self.encoder_norm(x)

    # ------------------------------------------------------------ decoder
    def decoder_input(self, x: torch.Tensor, mask: torch.Tensor, num_masked: Optional[int] = None) -> torch.Tensor:
        """Encoder output of the visible positions -> ``[B, buffer + L, D]`` decoder inputs.

        ``decoder_embed``, masked positions filled with ``mask_token``, positional embedding
        (``num_masked``: as in :meth:`forward_mae_encoder`).
        """
        x = self.decoder_embed(x)
        mask_with_buffer = self.with_buffer(mask)
        padded = self.mask_token.repeat(mask_with_buffer.shape[0], mask_with_buffer.shape[1], 1).to(x.dtype)
        if num_masked is None:
            padded[(1 - mask_with_buffer).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[2])
        else:
            pos = self.visible_positions(mask, num_masked)
            padded.scatter_(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        return padded + self.decoder_pos_embed_learned

    def decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """Final decoder hidden states (before ``decoder_norm``) -> head conditions ``z [B, L, D]``."""
        x = self.decoder_norm(x)[:, self.buffer_size :]
        return x + self.diffusion_pos_embed_learned

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor, num_masked: Optional[int] = None) -> torch.Tensor:
        """Decode all positions; returns ``z [B, L, D]`` (buffer removed, diffusion pos-embed added)."""
        x = self._run_blocks(self.decoder_blocks, self.decoder_input(x, mask, num_masked))
        return self.decoder_output(x)

    # ------------------------------------------------------------ training
    def sample_orders(self, bsz: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One random permutation of the token positions per sample, ``[B, L]`` int64."""
        device = self.fake_latent.device
        return torch.stack([torch.randperm(self.seq_len, generator=generator) for _ in range(bsz)]).to(device)

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training mask: one rate per batch from truncnorm on [mask_ratio_min, 1] (loc 1, scale 0.25)."""
        bsz, seq_len, _ = x.shape
        u = torch.rand(1, generator=generator).item()
        rate = 1.0 + 0.25 * float(_truncnorm_ppf(np.array([u]), (self.mask_ratio_min - 1.0) / 0.25, 0.0)[0])
        num_masked = int(np.ceil(seq_len * rate))
        mask = torch.zeros(bsz, seq_len, device=x.device)
        return torch.scatter(mask, -1, orders[:, :num_masked], torch.ones(bsz, seq_len, device=x.device))

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = target.shape
        target = target.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        z = z.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        mask = mask.reshape(bsz * seq_len).repeat(self.diffusion_batch_mul)
        return self.diffloss(z=z, target=target, mask=mask)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss on latents ``imgs [B, vae_embed_dim, h, w]`` with class ``labels [B]``."""
        class_embedding = self.class_emb(labels)
        x = self.patchify(imgs)
        gt = x.clone().detach()
        orders = self.sample_orders(x.size(0))
        mask = self.random_masking(x, orders)
        x = self.forward_mae_encoder(x, mask, class_embedding)
        z = self.forward_mae_decoder(x, mask)
        return self.forward_loss(z=z, target=gt, mask=mask)
