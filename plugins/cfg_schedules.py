"""Official guidance schedules: ``linear`` (Muse) and ``constant``.

Each plugin answers only for the ``sampler.cfg_schedule`` it implements, so a third-party schedule
is just another plugin answering for its own name.
"""

import torch

from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin, register_plugin


def linear_cfg_scale(cfg: float, seq_len: int, masked_after: int) -> float:
    """``1 + (cfg - 1) * (L - mask_len) / L`` evaluated in float32 as the reference does."""
    mask_len = torch.tensor(float(masked_after), dtype=torch.float32)
    return float(1 + (cfg - 1) * (seq_len - mask_len) / seq_len)


@register_plugin
class LinearCFG(Plugin):
    name = "linear_cfg"
    families = frozenset({"guidance"})
    builtin = True
    description = "cfg_schedule=linear: scale grows with the revealed fraction (official default)"

    @hookimpl(trylast=True)
    def marcache_cfg_scale(self, step):
        if step.gen.cfg_schedule != "linear":
            return None
        # the reference's mask_len is clamped to >= 1 (it reaches 0 only after the last step)
        return linear_cfg_scale(step.gen.cfg, step.gen.seq_len, max(step.num_masked_after, 1))


@register_plugin
class ConstantCFG(Plugin):
    name = "constant_cfg"
    families = frozenset({"guidance"})
    builtin = True
    description = "cfg_schedule=constant: the same scale at every step"

    @hookimpl(trylast=True)
    def marcache_cfg_scale(self, step):
        if step.gen.cfg_schedule != "constant":
            return None
        return float(step.gen.cfg)
