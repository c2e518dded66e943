"""KL-16 variational autoencoder used by MAR as its image tokenizer.

This module re-implements the convolutional KL autoencoder that MAR
(Li et al., "Autoregressive Image Generation without Vector Quantization")
uses to map 256x256 RGB images to a 16x16 grid of 16-channel continuous
tokens and back.  The architecture follows the CompVis latent-diffusion
KL autoencoder, with the MAR-specific configuration:

* base width ``ch=128`` with channel multipliers ``(1, 1, 2, 2, 4)``,
  i.e. four stride-2 downsamplings (256 -> 16);
* two residual blocks per encoder level, self-attention only at the 16x16
  encoder level, plus a (res, attn, res) middle section;
* a decoder with three residual blocks per level and *no* attention in the
  upsampling path (only in its middle section);
* ``double_z=True``: the encoder predicts a mean and a log-variance for each
  of the 16 latent channels.

The parameter names match the official ``kl16.ckpt`` checkpoint exactly, so
its ``model`` state dict loads with ``strict=True``.  Checkpoint loading
itself is deliberately not done here (see ``marcache.load_vae``).

MAR scales latents by :data:`LATENT_SCALE` (0.2325) before feeding them to
the generator; :func:`encode_to_tokens` and :func:`decode_tokens` apply and
undo that scaling.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LATENT_SCALE",
    "AttnBlock",
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussianDistribution",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "decode_tokens",
    "encode_to_tokens",
]

#: Scale factor MAR applies to VAE latents (tokens = latents * LATENT_SCALE).
LATENT_SCALE = 0.2325


def swish(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU non-linearity, ``x * sigmoid(x)``."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, eps 1e-6 and learnable affine parameters."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (norm, swish, conv3x3) x 2 + shortcut.

    When the channel count changes, the shortcut is a 1x1 convolution named
    ``nin_shortcut`` (the official naming); otherwise it is the identity.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels

        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections.

    Every spatial position attends to every other one; the attention logits
    are scaled by ``C ** -0.5``.  The result goes through ``proj_out`` and is
    added back to the input.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, C, H, W) -> (B, H*W, C)
            return t.reshape(b, c, height * width).transpose(1, 2)

        q, k, v = tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        out = F.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)
        out = out.transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: pad right/bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """Container for one resolution level (gives the ``block``/``attn`` names)."""


class Encoder(nn.Module):
    """Image -> latent moments (``2 * z_channels`` channels when ``double_z``)."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        in_channels: int = 3,
        resolution: int = 256,
        z_channels: int = 16,
        double_z: bool = True,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)

        res = resolution
        block_in = ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            stage = _Stage()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)

        self.mid = _Stage()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        self.norm_out = group_norm(block_in)
        out_channels = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image.

    ``up`` is indexed by resolution level like the encoder's ``down`` (``up.0``
    is the full-resolution level) but is executed from the last level to the
    first.  Each level has ``num_res_blocks + 1`` residual blocks; attention in
    the upsampling path is only created for resolutions in
    ``attn_resolutions``, which is empty for MAR's KL-16.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        out_ch: int = 3,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resolution: int = 256,
        z_channels: int = 16,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks

        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)

        self.mid = _Stage()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        stages = []
        for level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[level]
            stage = _Stage()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.append(stage)
        # Built from lowest to highest resolution; store highest-first.
        self.up = nn.ModuleList(reversed(stages))

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior parameterised by stacked (mean, logvar).

    ``parameters`` has ``2 * C`` channels on dim 1: the first ``C`` are the
    mean, the last ``C`` the log-variance, which is clamped to ``[-30, 20]``.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps`` with ``eps ~ N(0, I)``."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The distribution's mode (its mean)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over (C, H, W) per sample."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """MAR's KL autoencoder (KL-16 with the default arguments).

    Args:
        embed_dim: latent channels (16 for KL-16).
        ch_mult: channel multipliers per resolution level.
        ckpt_path: must be ``None``; weights are loaded by ``marcache.load_vae``.
    """

    def __init__(
        self,
        embed_dim: int = 16,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        ckpt_path: Optional[str] = None,
    ):
        super().__init__()
        if ckpt_path is not None:
            raise ValueError(
                "AutoencoderKL does not load checkpoints itself; "
                "use marcache.load_vae(...) to build a VAE from a checkpoint."
            )
        self.embed_dim = embed_dim
        self.encoder = Encoder(ch_mult=ch_mult, z_channels=embed_dim, double_z=True)
        self.decoder = Decoder(ch_mult=ch_mult, z_channels=embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Encode images in [-1, 1] of shape (B, 3, H, W) to a latent posterior."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode (unscaled) latents (B, embed_dim, h, w) to images (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, inputs: torch.Tensor, sample_posterior: bool = True
    ) -> Tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``inputs``; returns ``(reconstruction, posterior)``."""
        posterior = self.encode(inputs)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def encode_to_tokens(
    vae: AutoencoderKL, images: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Images -> MAR tokens: a posterior sample scaled by :data:`LATENT_SCALE`."""
    return vae.encode(images).sample(generator=generator) * LATENT_SCALE


def decode_tokens(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """MAR tokens -> images: undo :data:`LATENT_SCALE`, then decode."""
    return vae.decode(latents / LATENT_SCALE)
