"""Built-in guard: a batch whose tokens are not all finite is refused, never written as images.

Non-finite tokens (NaN/inf from corrupt weights that slipped through, or a plugin's bad arithmetic)
decode to black or noise images and a meaningless FID, with exit status 0. This plugin keeps each
step's predicted-position mask (no host sync during the loop) and checks the batch once at its end;
the error names the policy and the first step whose tokens are not finite. Drop it with
``disable: [finite_check]`` (not recommended).
"""

from __future__ import annotations

from marcache.errors import MarcacheError
from marcache.plugin import Plugin, register_plugin


class NonFiniteTokens(MarcacheError):
    """Generated tokens hold NaN or inf."""


@register_plugin
class FiniteCheck(Plugin):
    name = "finite_check"
    families = frozenset({"accounting"})
    builtin = True
    description = "refuse a batch whose generated tokens are not all finite (names the policy and the step)"

    def __init__(self, config=None):
        super().__init__(config)
        self._policy = "policy"
        self._predicted = []

    def marcache_configure(self, policy, model):
        self._policy = getattr(policy, "name", "policy")

    def marcache_generation_start(self, gen):
        self._predicted = []
        self._ids = gen.sample_ids

    def marcache_step_end(self, step, record):
        self._predicted.append(record.predicted)

    def marcache_generation_end(self, gen, tokens):
        bad = ~tokens.isfinite().all(dim=-1)  # [B, L]
        if not bool(bad.any()):  # the one host sync, once per batch
            return
        step = next((i for i, mask in enumerate(self._predicted) if bool((mask & bad).any())), None)
        ids = self._ids.tolist()
        where = f"step {step} of {len(self._predicted)}" if step is not None else "an unknown step"
        raise NonFiniteTokens(
            f"policy {self._policy!r} produced non-finite tokens (NaN/inf) at {where} for samples "
            f"{ids[0]}..{ids[-1]}; nothing was written: check the checkpoint and the policy's settings")

    def report_section(self) -> dict:
        return {}
