import os

import pytest
import torch
from hypothesis import settings

import marcache

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# tiny models gain nothing from intra-op threads, and threads stall when the 2 cores are shared
torch.set_num_threads(1)


def perturb(model, seed: int = 0, scale: float = 0.02):
    """Add noise to every parameter: the official init zeroes the head's adaLN and output layers, so
    an untouched random model's head ignores its condition z and plugins would look exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """A random pixel-space MAR (4x4 tokens of 16 dims, 10 classes) whose head depends on z."""
    return make_tiny(4)


def make_tiny(grid: int = 4, seed: int = 0, **overrides):
    """A tiny MAR with a ``grid x grid`` token grid (4x4-pixel patches, 1 channel), perturbed."""
    torch.manual_seed(seed)
    return perturb(marcache.create_model("mar_tiny", img_size=4 * grid, **overrides).eval(), seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the scale of ``b`` (random heads make chains reach ~1e4)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
