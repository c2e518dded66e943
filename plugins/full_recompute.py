"""Official feature computation: encoder and decoder recomputed from scratch at every step."""

from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin, register_plugin


@register_plugin
class FullRecompute(Plugin):
    name = "full_recompute"
    families = frozenset({"features"})
    builtin = True
    description = "encoder + decoder on every position, both CFG branches, every step (official)"

    # tryfirst: the baseline plan is laid down before any accelerator refines it
    @hookimpl(tryfirst=True)
    def marcache_forward_plan(self, step, plan):
        plan.mode = "full"
        plan.owner = self.name
        self.engagement["full_steps"] += 1
