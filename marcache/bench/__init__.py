"""``marcache bench``: wall-clock next to FLOPs, against honest baselines.

For every policy given, the same process measures the baseline, the policy and a plain sampler with
*fewer steps at matched FLOPs* (fewer AR steps and/or fewer head steps), so a reader sees whether a
method beats simply running fewer steps. Runs are interleaved (round-robin, rotating the order each
repeat) after warm-up; medians and spread are reported with images/s, FLOPs per image (from the
``flop_counter`` accounting of what actually ran), achieved GFLOP/s next to a measured matmul
GFLOP/s of the device, and peak memory. ``--eval`` adds FID / class accuracy per row (from
:func:`marcache.evaluation.evaluate`); a PNG plots speed against FID (or FLOPs without ``--eval``).

Rooms: :mod:`.config` (the validated :class:`BenchConfig`), :mod:`.matching` (the plain sampler's
FLOPs grid), :mod:`.runner` (measurement and the JSON report), :mod:`.output` (table and plot),
:mod:`.command` (``marcache bench``).
"""

from .config import MATCH_MODES, BenchConfig, match_modes
from .matching import StepGrid
from .output import format_table, plot
from .runner import Row, executed_steps, matmul_gflops, run_bench

__all__ = ["MATCH_MODES", "BenchConfig", "Row", "StepGrid", "executed_steps", "format_table", "match_modes",
           "matmul_gflops", "plot", "run_bench"]
