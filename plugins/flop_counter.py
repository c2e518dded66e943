"""Built-in accounting: every run report carries the FLOPs of what actually executed.

Adds a ``flops`` section to the report (``report["engagement"]["flops"]``): totals and per image,
per component (encoder, decoder, head; VAE decode separately), by operator, with the convention
(FLOPs = 2 x multiply-adds). Costs per execution shape come from fvcore (see :mod:`marcache.flops`);
pricing happens when the report is built, outside the timed generation. Drop it with
``disable: [flop_counter]``.
"""

from __future__ import annotations

from typing import Optional

from marcache.flops.accounting import ExecutedShapes, FlopAccumulator
from marcache.flops.costs import cost_model_for
from marcache.plugin import Plugin, register_plugin


class FlopObserver(Plugin):
    """Accumulates the FLOPs of every executed step; the summary covers what ran since the last report.

    Not registered itself: :class:`FlopCounter` is the built-in instance every policy carries (report
    section ``flops``); :func:`marcache.flops.policy_flops` adds a private probe.
    """

    name = "flops_probe"
    families = frozenset({"accounting"})
    builtin = True  # an observer: never listed as "never engaged"
    description = "FLOPs of the executed plans (2 x MAC; see marcache.flops)"
    section = "flops_probe"
    per_step = False  # include per-step figures in the summary

    def __init__(self, config=None):
        super().__init__(config)
        self.model = None
        self._pending: list[ExecutedShapes] = []
        self._images = 0
        self.last_summary: Optional[dict] = None

    def marcache_configure(self, policy, model):
        self.model = model

    def marcache_generation_start(self, gen):
        self._images += gen.batch_size

    def marcache_step_end(self, step, record):
        # keep only the plain shapes (records hold [B, L] masks); pricing happens at report time,
        # outside the timed generation
        self._pending.append(ExecutedShapes.of(record))

    def summary(self, per_step: bool = False) -> dict:
        acc = FlopAccumulator(cost_model_for(self.model))
        for rec in self._pending:
            acc.add(rec)
        acc.add_images(self._images)
        return acc.summary(per_step=per_step)

    def reset(self) -> None:
        self._pending, self._images = [], 0

    def marcache_report(self):
        if self.model is None or not self._pending:
            return None
        self.last_summary = self.summary(per_step=self.per_step)
        self.reset()
        return {self.section: self.last_summary}


@register_plugin
class FlopCounter(FlopObserver):
    name = "flop_counter"
    families = frozenset({"accounting"})
    builtin = True
    section = "flops"
    description = "FLOPs of the executed plans per component in the report (2 x MAC, fvcore per-shape costs)"
