"""Official token order: one uniform random permutation of the positions per sample."""

import torch

from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin, register_plugin


@register_plugin
class RandomOrder(Plugin):
    """``torch.randperm`` from each sample's own generator (the reference uses numpy's global RNG:
    same distribution, per-sample streams so batching does not change the images)."""

    name = "random_order"
    families = frozenset({"order"})
    builtin = True
    description = "uniform random permutation per sample (official)"

    @hookimpl(trylast=True)
    def marcache_token_order(self, gen):
        self.engagement["orders"] += gen.batch_size
        orders = [torch.randperm(gen.seq_len, generator=g) for g in gen.generators]
        return torch.stack(orders).to(gen.device)
