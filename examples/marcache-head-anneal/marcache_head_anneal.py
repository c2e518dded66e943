"""A third-party marcache plugin: anneal the diffusion-head steps linearly over the MAR steps.

DiSA (arXiv 2505.20297) observes that late tokens need far fewer head steps than early ones. This
plugin implements its linear variant: step ``s`` of ``S`` gives every token
``round(start + (end - start) * s / (S - 1))`` DDPM steps.

Install with ``pip install -e examples/marcache-head-anneal``; marcache finds it through the
``marcache`` entry-point group, and a policy enables it with::

    plugins:
      - name: head_anneal
        params: {start: 50, end: 5}
"""

from dataclasses import dataclass

from marcache.hookspecs import hookimpl
from marcache.plans import require_head_steps
from marcache.plugin import Plugin
from marcache.search_space import Int


@dataclass
class HeadAnnealConfig:
    start: int = 50  # head steps at the first MAR step
    end: int = 5  # head steps at the last MAR step

    def __post_init__(self):
        # a ValueError from a config reaches the user as one line naming the policy key
        require_head_steps("start", self.start)
        require_head_steps("end", self.end)


class HeadAnneal(Plugin):
    name = "head_anneal"
    families = frozenset({"head"})  # it refines the head plan
    Config = HeadAnnealConfig
    description = "linear head-step annealing over MAR steps (DiSA)"
    # tunable by `marcache tune` (checked at registration: both ends must pass HeadAnnealConfig)
    search_space = {"start": Int(10, 100, log=True), "end": Int(2, 20)}

    @hookimpl
    def marcache_head_plan(self, step, plan, z):
        last = max(step.num_steps - 1, 1)
        count = round(self.config.start + (self.config.end - self.config.start) * step.step / last)
        plan.cap(self.name, count)  # budgets combine by min with the sampler's and other plugins' budgets
        self.engagement["head_steps_total"] += count * plan.steps.numel()
