"""The shape-only backend of ``marcache flops``: the real scheduler and plugins, no tensor math.

Not an execution backend (it is not in the backend registry and cannot be picked with
``--backend``): its "images" are meaningless. It exists so a policy's FLOPs can be counted on
models too large to run (the model may live on the meta device).
"""

from __future__ import annotations

import torch

from marcache.plans import transformer_runs

from .base import Backend


class ShapeOnlyBackend(Backend):
    """``run_forward`` returns seeded random head conditions of the right shape, ``run_head`` zeros.

    The plans (hence the StepRecords) are the real ones for every plugin whose decisions do not
    depend on feature values; a plugin that scores features (e.g. token similarity) sees random
    features, so its FLOPs are indicative only (use ``marcache flops --execute`` on models small
    enough to run)."""

    name = "shape_only"

    def __init__(self, seed: int = 0):
        super().__init__(torch.device("cpu"))
        self._gen = torch.Generator().manual_seed(seed)

    def prepare(self, model) -> None:  # nothing to move
        self.model = model

    def run_forward(self, step, plan) -> torch.Tensor:
        transformer_runs(step, plan)  # the plan must be one the accounting understands
        gen = step.gen
        cache = plan.cache
        if cache is not None and hasattr(cache, "allocate") and not cache.ready:
            # plugins read the feature cache's decoder states (zeros here); the K/V stay shape-only
            total = 2 * gen.batch_size if gen.guided else gen.batch_size
            cache.allocate(gen.model, total, torch.device("meta"))
            positions, width = gen.model.buffer_size + gen.seq_len, gen.model.decoder_embed.out_features
            cache.dec_in = torch.zeros(total, positions, width)
            cache.prenorm = torch.zeros(total, positions, width)
        rows = 2 * gen.batch_size if gen.guided else gen.batch_size
        width = gen.model.decoder_embed.out_features
        return torch.randn(rows, step.tokens_this_step, width, generator=self._gen)

    def run_head(self, step, z, plan, noise) -> torch.Tensor:
        return torch.zeros(step.gen.batch_size, z.shape[1], step.gen.model.token_embed_dim)
