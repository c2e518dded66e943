"""Plans: what plugins decide for a step and the backend executes.

Plans are plain data (tensors, ints, strings) built once per step outside the tensor math. Each plan
records the plugin that last shaped it (``owner``) so reports and traces can attribute work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ForwardPlan:
    """How the encoder and decoder run at this step.

    ``mode="full"``: the official path: the encoder runs on the buffer and every known token, the
    decoder on all buffer + L positions, for every row of the (CFG-doubled) batch.
    """

    mode: str = "full"
    owner: str = "full_recompute"


@dataclass
class HeadPlan:
    """How the diffusion head samples the tokens predicted at this step.

    Attributes:
        steps: ``[B, k]`` int64, DDPM head steps for each predicted token (row order = the sample's
            predicted positions in ascending order). Rows with different counts run as separate
            chains, grouped by count (no per-token loop).
        temperature: scales only the per-step noise.
        owner: plugin that last changed the budgets.
    """

    steps: torch.Tensor
    temperature: float = 1.0
    owner: str = "ddpm_head"

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """``[(count, flat row indices into the [B*k] rows), ...]`` in ascending count."""
        flat = self.steps.reshape(-1)
        return [(int(c), (flat == c).nonzero(as_tuple=True)[0]) for c in torch.unique(flat).tolist()]


@dataclass
class StepRecord:
    """What actually ran at one step (for accounting, reports and traces).

    Attributes:
        encoder_tokens: tokens the encoder processed per row (buffer included).
        decoder_tokens: tokens the decoder processed per row (buffer included).
        rows: rows of the encoder/decoder batch (2B with CFG).
        head_rows_by_steps: ``{head steps: network rows per head step}`` (CFG pairs counted as 2).
        predicted: ``[B, L]`` positions predicted this step.
        recomputed: ``[B, L]`` positions whose decoder features were computed fresh this step.
        cached: ``[B, L]`` positions whose features were served from a cache (None: none).
        owners: which plugin owned each plan (``{"forward": ..., "head": ..., "cfg": ...}``).
    """

    step: int
    encoder_tokens: int
    decoder_tokens: int
    rows: int
    head_rows_by_steps: dict
    predicted: torch.Tensor
    recomputed: torch.Tensor
    cfg_scale: float
    owners: dict = field(default_factory=dict)
    cached: Optional[torch.Tensor] = None
    extra: Optional[dict] = None
