"""Execution backends (installed as ``marcache.backends``).

``reference``: eager PyTorch on CPU or CUDA (float32, or bf16/fp16 autocast), the executable
definition of every plan. ``cuda``: the same plans with captured head graphs, static buffers and no
per-step host sync (:mod:`marcache.backends.cuda`). ``auto`` picks ``cuda`` on a CUDA device and
``reference`` elsewhere. Backends implement :class:`~marcache.backends.base.Backend` and register
with :func:`register_backend` (third parties through the ``marcache.backends`` entry-point group).
``shape_only`` (:mod:`marcache.backends.shape_only`) is not registered: it only serves
``marcache flops``.
"""

from __future__ import annotations

import torch

from marcache.errors import ConfigError

from .base import Backend, available_backends, register_backend
from .cuda import CudaBackend
from .reference import ReferenceBackend


def auto_backend_name(device: torch.device) -> str:
    """The backend ``auto`` resolves to on ``device``."""
    return "cuda" if device.type == "cuda" else "reference"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"backend.device={device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"backend.device={device!r}: CUDA is not available on this machine; use cpu or auto")
    return dev


def get_backend(name: str = "auto", device: str = "auto", dtype: str = "float32") -> Backend:
    """Instantiate a backend by name (``auto`` = the best one available for the device)."""
    dev = resolve_device(device)
    if name == "auto":
        name = auto_backend_name(dev)
    backends = available_backends()
    if name not in backends:
        raise ConfigError(f"backend.name={name!r}: unknown backend; available: auto, {', '.join(backends)}")
    if dtype != "float32" and dev.type == "cpu" and dtype == "float16":
        raise ConfigError("backend.dtype=float16 needs CUDA; on CPU use bfloat16 or float32")
    return backends[name](dev, dtype)


__all__ = ["Backend", "ReferenceBackend", "CudaBackend", "auto_backend_name", "available_backends", "get_backend",
           "register_backend", "resolve_device"]
