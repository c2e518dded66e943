import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from marcache.testing import make_tiny, perturb, rel_err  # noqa: F401  (re-exported to the tests)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# score against the first 1,000 MNIST test images, not all 10,000: precision/recall cost grows with the
# square of the reference size (about 12 s per evaluation on this CPU). Subprocesses inherit it; the
# full reference keeps one test of its own (test_mnist_eval.py).
os.environ.setdefault("MARCACHE_REFERENCE_SIZE", "1000")

# tiny models gain nothing from intra-op threads, and threads stall when the 2 cores are shared
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    """A random pixel-space MAR (4x4 tokens of 16 dims, 10 classes) whose head depends on z."""
    return make_tiny(4)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one); benchmarks/gpu_check.py runs them")


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (benchmark scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
