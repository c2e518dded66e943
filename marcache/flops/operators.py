"""Counting the FLOPs of one module call: fvcore's trace, the SDPA formula, the counted operators.

Convention: **FLOPs = 2 x multiply-adds** of the matrix products, the convolutions and the attention
(``scaled_dot_product_attention``: QK^T plus AV); element-wise work is not counted.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from typing import Callable

import torch
from torch import nn

FLOPS_PER_MAC = 2

#: operators counted (fvcore's ``by_operator`` names); everything else fvcore reports is dropped
COUNTED_OPERATORS = frozenset({"addmm", "bmm", "conv", "einsum", "matmul", "mm", "linear", "scaled_dot_product_attention"})


def sdpa_macs(q_shape, k_shape, v_shape) -> int:
    """Multiply-adds of ``softmax(Q K^T) V``: ``batch * heads * L * S * (E + E_v)``."""
    *batch, length, e = q_shape
    s, ev = k_shape[-2], v_shape[-1]
    return math.prod(batch) * length * s * (e + ev)


def _fvcore_sdpa(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    return sdpa_macs(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(inputs[2]))


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return FLOPS_PER_MAC * sdpa_macs(query, key, value)


def flop_counter_mode(**kwargs):
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts SDPA on CPU (torch has no formula
    for ``_scaled_dot_product_flash_attention_for_cpu``). Counts 2 per multiply-add, ignores norms."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flops
    kwargs.setdefault("display", False)
    return FlopCounterMode(custom_mapping=mapping, **kwargs)


class Traced(nn.Module):
    """The one trace wrapper: fvcore traces an ``nn.Module``'s ``forward``; this one calls
    ``fn(module, *inputs)``, so any method or part of a module (a block's attention half, the head
    trunk) is priced without a wrapper class per call site."""

    def __init__(self, module: nn.Module, fn: Callable):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(self.module, *inputs)


def fvcore_flops(module: nn.Module, inputs: tuple) -> Counter:
    """FLOPs (2 x MAC) of one call ``module(*inputs)`` by operator, from fvcore's trace.

    ``module`` and ``inputs`` may live on the meta device (nothing is computed)."""
    with warnings.catch_warnings():  # fvcore's import touches the deprecated torch.jit.script
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(module, inputs)
    fca.set_op_handle(**{"aten::scaled_dot_product_attention": _fvcore_sdpa})
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    fca.tracer_warnings("none")
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_op = fca.by_operator()
    finally:
        logger.setLevel(level)
    return Counter({op: FLOPS_PER_MAC * int(n) for op, n in by_op.items() if n and op in COUNTED_OPERATORS})


def total(c: Counter) -> int:
    """Sum of a per-operator counter."""
    return int(sum(c.values()))
