"""FTS (frequency-weighted token selection, GtR §FTS): more head steps for detail-rich tokens.

Each token predicted in the reconstruction stage is scored by the frequency-weighted magnitude
spectrum of its head condition ``z`` along the channel axis,
``s = sum_{n=1}^{floor(D/2)} |DFT(z)|(n) * (1 + n / floor(D/2))`` (DC excluded); the top ``beta``
fraction of each image's tokens at the step get ``detail_steps`` DDPM steps, the others keep their
planned budget. Open details of the paper are parameters (methods.md §2.4): the scope of the top-beta
(per image and step), which stage it applies to, and whether ``z`` is normalised first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from marcache.errors import ConfigError
from marcache.hookspecs import hookimpl
from marcache.plans import require_head_steps
from marcache.plugin import Plugin, register_plugin
from marcache.search_space import Float, Int


def fts_scores(z: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``z [..., D]`` -> frequency-weighted spectral magnitude ``[...]`` (DC excluded)."""
    z = z.float()
    if normalize:
        z = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
    half = z.shape[-1] // 2
    amplitude = torch.fft.rfft(z, dim=-1).abs()[..., 1 : half + 1]
    weights = 1 + torch.arange(1, half + 1, device=z.device, dtype=torch.float32) / half
    return (amplitude * weights).sum(-1)


@dataclass
class FTSConfig:
    beta: float = 0.10  # fraction of each image's tokens (at the step) that get the detail budget
    detail_steps: int = 50  # T_detail
    apply_to: str = "reconstruction"  # "reconstruction" (needs gtr_schedule) or "all" steps
    normalize: bool = False  # score raw z (default) or per-token standardised z

    def __post_init__(self):
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"beta={self.beta}: must be in (0, 1]")
        require_head_steps("detail_steps", self.detail_steps)
        if self.apply_to not in ("reconstruction", "all"):
            raise ValueError(f"apply_to={self.apply_to!r}: must be 'reconstruction' or 'all'")


@register_plugin
class FTS(Plugin):
    name = "fts"
    families = frozenset({"head"})
    Config = FTSConfig
    search_space = {"beta": Float(0.02, 0.5, log=True), "detail_steps": Int(10, 100, log=True)}
    description = "FTS: top-beta tokens by frequency-weighted spectrum of z get detail_steps head steps"

    @hookimpl
    def marcache_configure(self, policy, model):
        if self.config.apply_to == "reconstruction" and "gtr_schedule" not in {p.name for p in policy.plugins}:
            raise ConfigError("fts.apply_to=reconstruction needs the gtr_schedule plugin in the policy (or set fts.apply_to=all)")

    # trylast: FTS raises budgets after whichever plugins set them (gtr_schedule, recap), whatever
    # the policy order
    @hookimpl(trylast=True)
    def marcache_head_plan(self, step, plan, z):
        if self.config.apply_to == "reconstruction":
            stages = step.store.get("gtr_schedule", "stage_of_step")
            if stages is None or stages[step.step] != max(stages):
                return
        b, k = plan.steps.shape
        n_detail = max(1, round(self.config.beta * k))
        # per image: indices of its top-scoring tokens among those predicted now
        top = fts_scores(z, self.config.normalize).topk(n_detail, dim=1).indices.cpu()
        plan.raise_to(self.name, top, self.config.detail_steps)
        self.engagement["detail_tokens"] += b * n_detail
        self.engagement["steps_applied"] += 1
