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


@pytest.fixture(scope="session")
def tiny_model():
    """A randomly initialised pixel-space MAR: 4x4 tokens of 16 dims, 10 classes."""
    torch.manual_seed(0)
    return marcache.create_model("mar_tiny").eval()


def make_tiny(grid: int = 4, seed: int = 0, **overrides):
    """A tiny MAR with a ``grid x grid`` token grid (4x4-pixel patches, 1 channel)."""
    torch.manual_seed(seed)
    return marcache.create_model("mar_tiny", img_size=4 * grid, **overrides).eval()
