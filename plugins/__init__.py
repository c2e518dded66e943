"""Built-in plugins (installed as ``marcache.plugins``).

The official MAR sampler is itself a set of plugins, registered by default in every policy:

==================  ==========  ===============================================================
plugin              family      behaviour
==================  ==========  ===============================================================
random_order        order       one uniform random permutation per sample
cosine_schedule     schedule    MaskGIT cosine schedule with MAR's clamp (>= 1 token per step)
linear_cfg          guidance    ``1 + (cfg - 1) * (L - masked_after) / L`` (Muse), cfg_schedule=linear
constant_cfg        guidance    ``cfg`` at every step, cfg_schedule=constant
full_recompute      features    encoder + decoder recomputed from scratch, both CFG branches
ddpm_head           head        every token sampled with the full N-step DDPM chain
==================  ==========  ===============================================================

A policy can drop one with ``disable: [name]`` and replace it with its own.

Accelerators (listed in a policy's ``plugins``): ``gtr_order``, ``gtr_schedule`` (GtR), ``fts`` (FTS),
``lazymar_token_cache``, ``lazymar_cond_cache``, ``lazymar_head`` (LazyMAR), ``recap`` (ReCAP).
"""

from . import cfg_schedules, cosine_schedule, ddpm_head, full_recompute, random_order  # noqa: F401  (register)
from . import fts, gtr, lazymar, recap  # noqa: F401  (register)
from . import lazymar_head  # noqa: F401  (register)
from . import flop_counter  # noqa: F401,E402  (FLOPs section of every report; marcache.flops)
from marcache import trace  # noqa: F401,E402  (the --trace recorder registers as "trace")

DEFAULT_PLUGINS = ("random_order", "cosine_schedule", "linear_cfg", "constant_cfg", "full_recompute", "ddpm_head", "flop_counter")
