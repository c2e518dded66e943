"""FLOP accounting of what actually ran.

Convention (the one of the MAR acceleration papers and of ``torch.utils.flop_counter``):
**FLOPs = 2 x multiply-adds** of the matrix products (``linear``, ``matmul``, ``bmm``, ``addmm``,
``einsum``), the convolutions and the attention (``scaled_dot_product_attention``: QK^T plus AV).
Element-wise work (norms, GELU/SiLU, softmax, residual adds, the DDPM update) is **not** counted;
it is < 0.1 % of a MAR step and no published MAR count includes it.

How: the scheduler hands every plugin a :class:`~marcache.plans.StepRecord` per step saying what
executed. Rooms of this package:

* :mod:`.operators` counts one module call (fvcore's trace, the SDPA formula, one trace wrapper);
* :mod:`.costs` is the cost model: each distinct execution shape priced once and cached;
* :mod:`.accounting` multiplies per-shape costs by the executed plans, per step and component;
* :mod:`.measure` runs a policy (shape-only or executed) and prices it against the baseline;
* :mod:`.command` is ``marcache flops``.

The observer plugin that puts a ``flops`` section in every run report is
:mod:`marcache.plugins.flop_counter`; the shape-only backend is :mod:`marcache.backends.shape_only`.
"""

from .accounting import COMPONENTS, CONVENTION, ExecutedShapes, FlopAccumulator, StepFlops, record_flops
from .costs import CostModel, cost_model_for, model_signature
from .measure import build_for_counting, compare_with_baseline, policy_flops
from .operators import FLOPS_PER_MAC, flop_counter_mode, fvcore_flops, sdpa_macs

__all__ = [
    "COMPONENTS", "CONVENTION", "FLOPS_PER_MAC", "CostModel", "ExecutedShapes", "FlopAccumulator", "StepFlops",
    "build_for_counting", "compare_with_baseline", "cost_model_for", "flop_counter_mode", "fvcore_flops",
    "model_signature", "policy_flops", "record_flops", "sdpa_macs",
]
