"""Reference data for the MNIST metrics: the 10,000 MNIST test images, whose classifier features and
FID statistics torch-fidelity computes on first use and caches (``input2_cache_name`` + ``cache_root``).

The cache name embeds a digest of the classifier weights, so new weights never reuse stale statistics.
Cache folder: ``$MARCACHE_CACHE/fidelity`` if set, else ``~/.cache/marcache/fidelity``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .features import EXTRACTOR_NAME


class UInt8Images(Dataset):
    """uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` as torch-fidelity wants them: ``[3, H, W]`` uint8 tensors."""

    def __init__(self, images: np.ndarray | torch.Tensor):
        x = torch.as_tensor(np.asarray(images))
        if x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {x.dtype}")
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [N, H, W] or [N, H, W, 1|3], got {tuple(x.shape)}")
        self.images = x.permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def cache_root(root: Optional[str | os.PathLike] = None) -> Path:
    if root is not None:
        return Path(root)
    base = os.environ.get("MARCACHE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "marcache") / "fidelity"


def reference_name(classifier_path: Optional[str | os.PathLike] = None) -> str:
    """Cache name of the MNIST test-set reference in the given classifier's feature space."""
    from ..weights import classifier_path as shipped
    from .classifier import weights_digest

    return f"mnist-test-{weights_digest(classifier_path or shipped())}"


def reference_dataset() -> UInt8Images:
    from ..data import load_mnist

    return UInt8Images(load_mnist("test")[0])


def reference_files(root: Optional[str | os.PathLike] = None, classifier_path=None) -> list[Path]:
    """The cache files torch-fidelity writes for the reference (features of both layers, FID statistics)."""
    name, folder = reference_name(classifier_path), cache_root(root)
    return [folder / f"{name}-{EXTRACTOR_NAME}-features-feat.pt", folder / f"{name}-{EXTRACTOR_NAME}-features-logits.pt",
            folder / f"{name}-{EXTRACTOR_NAME}-stat-fid-feat.pt"]
