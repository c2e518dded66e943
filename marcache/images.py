"""From tokens to pictures: unpatchify, the VAE (latent models) or identity (pixel-space models),
uint8 conversion as the reference evaluation does, PNG files and grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError
from .fileio import write_image_atomic


def uses_vae(model) -> bool:
    """Latent models (``vae_stride > 1``) need the KL-16 VAE; pixel-space models (stride 1) do not."""
    return model.vae_stride > 1


@torch.no_grad()
def tokens_to_images(model, tokens: torch.Tensor, vae=None, batch_size: int = 16) -> torch.Tensor:
    """``[N, L, C]`` tokens -> ``[N, channels, H, W]`` float images in about [-1, 1]."""
    latents = model.unpatchify(tokens.to(next(model.parameters()).device))
    if not uses_vae(model):
        return latents.float().cpu()
    if vae is None:
        raise ConfigError("this model produces KL-16 latents: pass --vae kl16.ckpt (or --vae random for shape checks)")
    from .models.vae import decode_tokens

    return torch.cat([decode_tokens(vae, latents[i : i + batch_size]).float().cpu() for i in range(0, len(latents), batch_size)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(x + 1) / 2``, clip to [0, 1], round(x * 255) -> ``[N, H, W, C]`` uint8 (reference eval)."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    return torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_pngs(images: np.ndarray, out_dir: Path, names: list[str]) -> list[Path]:
    """One PNG per image, each written atomically (a temporary name, then a rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for array, name in zip(images, names):
        paths.append(write_image_atomic(out_dir / name, _pil(array)))
    return paths


def make_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """Tile ``[N, H, W, C]`` uint8 images into one array with ``pad`` pixels of white between."""
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_grid(images: np.ndarray, path: Path, ncols: Optional[int] = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image_atomic(path, _pil(make_grid(images, ncols)))
