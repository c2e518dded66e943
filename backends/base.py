"""The interface every execution backend implements.

The scheduler owns the loop and the decisions; a backend owns the tensor math of one step: it runs
the encoder/decoder as a :class:`~marcache.plans.ForwardPlan` says and the diffusion head as a
:class:`~marcache.plans.HeadPlan` says. A faster backend (CUDA graphs, static caches) implements the
same two methods and must agree with the reference backend within the dtype's tolerance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


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
