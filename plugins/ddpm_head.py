"""Official head sampling: every token gets the full N-step DDPM chain with temperature."""

import torch

from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin, register_plugin


@register_plugin
class DDPMHead(Plugin):
    name = "ddpm_head"
    families = frozenset({"head"})
    builtin = True
    description = "N-step DDPM chain per token (N = sampler.head_steps or the model's num_sampling_steps)"

    @hookimpl(tryfirst=True)
    def marcache_head_plan(self, step, plan, z):
        b, k = z.shape[0], z.shape[1]
        plan.lay_down(self.name, torch.full((b, k), step.gen.head_steps, dtype=torch.long))
        plan.temperature = step.gen.temperature
        self.engagement["head_chains"] += b * k
