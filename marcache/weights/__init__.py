"""Weights shipped with marcache (safetensors): the MNIST MAR and the MNIST evaluation classifier."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from ..errors import CheckpointError

MAR_MNIST = "mar_mnist.safetensors"
MNIST_CLASSIFIER = "mnist_classifier.safetensors"


def shipped_path(filename: str) -> Path:
    """Path of a shipped weights file; one clear error if the installation lacks it."""
    path = Path(str(importlib.resources.files(__package__).joinpath(filename)))
    if not path.is_file():
        raise CheckpointError(f"shipped weights {filename} are missing from {path.parent}: reinstall marcache (pip install -e .)")
    return path


def mnist_path() -> Path:
    """The shipped EMA weights of ``mar_mnist``."""
    return shipped_path(MAR_MNIST)


def classifier_path() -> Path:
    """The shipped MNIST classifier (feature space of the MNIST metrics)."""
    return shipped_path(MNIST_CLASSIFIER)


def load_mar_mnist(device: str = "cpu"):
    """``mar_mnist`` with the shipped weights, in eval mode."""
    from ..loading import load_mar

    return load_mar("mar_mnist", mnist_path(), device=device)
