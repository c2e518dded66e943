"""The interface every execution backend implements.

The scheduler owns the loop and the decisions; a backend owns the tensor math of one step: it runs
the encoder/decoder as a :class:`~marcache.plans.ForwardPlan` says and the diffusion head as a
:class:`~marcache.plans.HeadPlan` says. A faster backend (CUDA graphs, static caches) implements the
same two methods and must agree with the reference backend within the dtype's tolerance.

Backends are registered like plugins: ``@register_backend`` on the class; built-in modules of
``marcache.backends`` are discovered on first use, third-party ones through the
``marcache.backends`` entry-point group (``name = "package.module:MyBackend"``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from abc import ABC, abstractmethod

import torch

from marcache.errors import ConfigError

ENTRY_POINT_GROUP = "marcache.backends"


class Backend(ABC):
    """Executes plans for one model on one device."""

    name: str = ""

    def __init__(self, device: torch.device, dtype: str = "float32"):
        self.device = torch.device(device)
        self.dtype = dtype

    def prepare(self, model) -> None:
        """Called once before generating with ``model`` (move weights, build static buffers)."""
        model.to(self.device)

    @abstractmethod
    def run_forward(self, step, plan) -> torch.Tensor:
        """Encoder + decoder for ``step``; returns the head conditions of the predicted tokens,
        ``[R, k, D]`` float32 with R = B (or 2B under CFG: conditional rows first)."""

    @abstractmethod
    def run_head(self, step, z: torch.Tensor, plan, noise: torch.Tensor) -> torch.Tensor:
        """Sample the predicted tokens: ``z [R, k, D]``, ``noise [B, k, T_max + 1, C]`` (the per-sample
        Gaussian draws), returns ``[B, k, C]`` float32 token values."""

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a host tensor the scheduler built (the per-sample head noise) to the device."""
        return tensor.to(self.device)

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "dtype": self.dtype}


_REGISTRY: dict[str, type[Backend]] = {}
_DISCOVERED = False


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register an execution backend class under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"{cls!r} is not a subclass of marcache.backends.Backend")
    if not cls.name or not cls.name.isidentifier() or cls.name == "auto":
        raise ConfigError(f"backend class {cls.__name__}: name {cls.name!r} must be a Python identifier other than 'auto'")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ConfigError(f"backend {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_backends() -> dict[str, type[Backend]]:
    """Registered backend classes by name: built-ins (every module of ``marcache.backends``), then
    entry points."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        import marcache.backends as package

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{info.name}")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = ep.load()
            except Exception as exc:  # a broken third-party package must name itself
                raise ConfigError(f"backend entry point {ep.name!r} ({ep.value}) failed to import: {exc}") from None
            if getattr(cls, "name", None) not in _REGISTRY:
                register_backend(cls)
    return dict(_REGISTRY)
