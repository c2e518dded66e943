"""The explicit state handed to every hook: one :class:`GenerationState` per batch, one
:class:`StepState` per masked-decoding step, and the per-generation :class:`CacheStore`.

Plugins never infer anything from call order: which rows are conditional, which tokens are predicted
this step and last step, the CFG scale and the step index are all fields here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


class CacheStore:
    """Per-generation storage for plugin caches, namespaced by plugin name, cleared at generation end.

    ``store.put("lazymar", "enc_kv", tensors)``; :meth:`nbytes` reports the memory each plugin holds
    (the peak is kept for the run report).
    """

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = defaultdict(dict)
        self.peak_bytes: dict[str, int] = defaultdict(int)

    def put(self, plugin: str, key: str, value: Any) -> None:
        self._data[plugin][key] = value
        self.peak_bytes[plugin] = max(self.peak_bytes[plugin], self.nbytes(plugin))

    def get(self, plugin: str, key: str, default: Any = None) -> Any:
        return self._data.get(plugin, {}).get(key, default)

    def note_peak(self) -> None:
        """Record the current size of every namespace (caches allocated after ``put`` grow later)."""
        for name in list(self._data):
            self.peak_bytes[name] = max(self.peak_bytes[name], self.nbytes(name))

    def nbytes(self, plugin: Optional[str] = None) -> int:
        names = [plugin] if plugin is not None else list(self._data)
        return sum(_nbytes(v) for n in names for v in self._data.get(n, {}).values())

    def clear(self) -> None:
        self._data.clear()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if callable(getattr(value, "nbytes", None)):  # e.g. the FeatureCache of partial passes
        return int(value.nbytes())
    return 0


@dataclass
class GenerationState:
    """Everything fixed for one batch. Plugins may read all fields; they write only to ``store``,
    to their own engagement counters and, in ``marcache_refine_order``, to ``orders`` (in place).

    Attributes:
        model: the MAR being sampled.
        labels: ``[B]`` class labels, or ``None`` for unconditional generation (null class).
        sample_ids: ``[B]`` global sample indices; sample ``i`` depends only on ``(seed, i)``.
        generators: one CPU ``torch.Generator`` per sample (orders and head noise).
        num_iter: requested number of masked-decoding steps (the step-schedule plugin may plan a
            different count; ``num_steps`` is what runs).
        cfg / cfg_schedule / temperature: official sampler arguments.
        head_steps: default number of DDPM head steps per token (the model's ``num_sampling_steps``).
        guided: ``cfg != 1``: encoder/decoder/head run on ``[cond rows; uncond rows]``.
        orders: ``[B, L]`` per-sample permutations (set after ``marcache_token_order``).
        tokens_per_step: tokens revealed per step, common to all samples (after ``marcache_step_schedule``).
        store: the per-generation cache store.
    """

    model: Any
    labels: Optional[torch.Tensor]
    sample_ids: torch.Tensor
    generators: list
    num_iter: int
    cfg: float
    cfg_schedule: str
    temperature: float
    head_steps: int
    device: torch.device
    store: CacheStore = field(default_factory=CacheStore)
    orders: Optional[torch.Tensor] = None
    tokens_per_step: Optional[list] = None

    @property
    def batch_size(self) -> int:
        return int(self.sample_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return self.model.seq_len

    @property
    def grid(self) -> tuple[int, int]:
        return (self.model.seq_h, self.model.seq_w)

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0

    @property
    def num_steps(self) -> int:
        return len(self.tokens_per_step) if self.tokens_per_step is not None else self.num_iter


@dataclass
class StepState:
    """One masked-decoding step, as seen by the per-step hooks.

    Masks are ``[B, L]`` bool over token positions (no buffer), True = masked / selected.

    Attributes:
        step, num_steps: 0-based index and total.
        tokens: ``[B, L, C]`` current token values (predicted ones filled, others zero).
        mask: positions still masked *before* this step.
        mask_to_pred: positions predicted at this step (same count in every row).
        mask_next: positions still masked *after* this step (``mask & ~mask_to_pred``).
        prev_mask_to_pred: positions predicted at the previous step (all False at step 0).
        num_masked_after: count still masked after the step (0 after the last step; the reference's
            ``mask_len`` clamps it to >= 1, which ``linear_cfg`` reproduces).
        cfg_scale: the guidance scale handed to the head (set by ``marcache_cfg_scale``).
        cond_rows / uncond_rows: row slices of the doubled batch when ``gen.guided``.
    """

    gen: GenerationState
    step: int
    tokens: torch.Tensor
    mask: torch.Tensor
    mask_to_pred: torch.Tensor
    mask_next: torch.Tensor
    prev_mask_to_pred: torch.Tensor
    num_masked_after: int
    cfg_scale: float = 1.0

    @property
    def num_steps(self) -> int:
        return self.gen.num_steps

    @property
    def is_last(self) -> bool:
        return self.step == self.gen.num_steps - 1

    @property
    def progress(self) -> float:
        """Fraction of steps completed before this one, in [0, 1)."""
        return self.step / self.gen.num_steps

    # counts come from the host-side schedule: reading them never waits for the device
    @property
    def tokens_this_step(self) -> int:
        return self.gen.tokens_per_step[self.step]

    @property
    def tokens_prev_step(self) -> int:
        """Tokens predicted at the previous step (0 at the first)."""
        return self.gen.tokens_per_step[self.step - 1] if self.step > 0 else 0

    @property
    def num_masked(self) -> int:
        """Positions still masked before this step."""
        return sum(self.gen.tokens_per_step[self.step:])

    @property
    def cond_rows(self) -> slice:
        return slice(0, self.gen.batch_size)

    @property
    def uncond_rows(self) -> Optional[slice]:
        b = self.gen.batch_size
        return slice(b, 2 * b) if self.gen.guided else None

    @property
    def store(self) -> CacheStore:
        return self.gen.store
