"""Built-in plugins (installed as ``marcache.plugins``).

Every module of this package is imported by :func:`discover` (no hand-kept list): a module
registers its plugin classes with ``@register_plugin``. Classes with ``builtin = True`` are the
official sampler and run in every policy:

==================  ==========  ===============================================================
plugin              family      behaviour
==================  ==========  ===============================================================
random_order        order       one uniform random permutation per sample
cosine_schedule     schedule    MaskGIT cosine schedule with MAR's clamp (>= 1 token per step)
linear_cfg          guidance    ``1 + (cfg - 1) * (L - masked_after) / L`` (Muse), cfg_schedule=linear
constant_cfg        guidance    ``cfg`` at every step, cfg_schedule=constant
full_recompute      features    encoder + decoder recomputed from scratch, both CFG branches
ddpm_head           head        every token sampled with the full N-step DDPM chain
flop_counter        accounting  the FLOPs of what ran, in every report
finite_check        accounting  refuses a batch whose tokens are not all finite (policy + step named)
==================  ==========  ===============================================================

A policy can drop one with ``disable: [name]`` and replace it with its own. The others are listed
in a policy's ``plugins`` (``marcache plugins`` prints them all); ``trace`` is the ``--trace``
recorder.
"""

from __future__ import annotations

import importlib
import pkgutil

_DISCOVERED = False


def discover() -> None:
    """Import every module of this package once (each registers its plugins on import)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
