"""Official step schedule: MaskGIT cosine with MAR's clamp."""

import math

from marcache.errors import ConfigError
from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin, register_plugin


def cosine_tokens_per_step(seq_len: int, num_iter: int) -> list[int]:
    """Tokens revealed per step by ``MAR.sample_tokens``.

    ``mask_len = floor(L * cos(pi/2 * (s+1) / T))`` clamped to ``[1, masked_now - 1]``; the last step
    reveals everything left.
    """
    if not 1 <= num_iter <= seq_len:
        raise ConfigError(f"sampler.num_iter={num_iter}: must be between 1 and the model's {seq_len} tokens")
    counts, masked = [], seq_len
    for step in range(num_iter):
        if step == num_iter - 1:
            counts.append(masked)
            break
        mask_len = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(masked - 1, mask_len))
        counts.append(masked - mask_len)
        masked = mask_len
    return counts


@register_plugin
class CosineSchedule(Plugin):
    name = "cosine_schedule"
    families = frozenset({"schedule"})
    builtin = True
    description = "cosine masking schedule with MAR's clamp (official)"

    @hookimpl(trylast=True)
    def marcache_step_schedule(self, gen):
        self.engagement["schedules"] += 1
        return cosine_tokens_per_step(gen.seq_len, gen.num_iter)
