"""Checks of what plugins hand back to the loop, each failure naming the plugin and the sample.

The scheduler calls the order, schedule, guidance and plan hooks one implementation at a time (in
pluggy's order, see :func:`marcache.plugin.hook_calls`) and checks the result right after the
plugin that produced it, so an error blames the plugin at fault, not the one that laid the plan down.
Every failure is one :class:`~marcache.errors.PluginError` line.
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import PluginError
from .plans import HEAD_STEPS_MAX, HEAD_STEPS_MIN

FORWARD_MODES = ("full", "cached")


def head_steps_problem(value) -> str | None:
    """Why ``value`` is not a valid number of DDPM head steps (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return f"{value!r} is not an integer"
    if not HEAD_STEPS_MIN <= value <= HEAD_STEPS_MAX:
        return f"{value} is outside [{HEAD_STEPS_MIN}, {HEAD_STEPS_MAX}]"
    return None


def _integer_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def _type_name(x) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def _first_bad_row(bad_rows: torch.Tensor) -> int:
    return int(bad_rows.nonzero()[0, 0])


def checked_order(orders, plugin: str, gen) -> torch.Tensor:
    """``[B, L]`` int64 permutations per sample, or one line naming ``plugin`` and the sample."""
    b, seq_len = gen.batch_size, gen.seq_len
    where = f"token order from plugin {plugin!r}"
    if not _integer_tensor(orders):
        raise PluginError(f"{where}: got {_type_name(orders)}; return a [{b}, {seq_len}] integer tensor (torch.long)")
    if tuple(orders.shape) != (b, seq_len):
        raise PluginError(f"{where}: shape {tuple(orders.shape)}; expected [{b}, {seq_len}] (one permutation per sample)")
    expected = torch.arange(seq_len, device=orders.device)
    bad = ~(orders.sort(dim=1).values == expected).all(dim=1)
    if bool(bad.any()):
        row = _first_bad_row(bad)
        raise PluginError(f"{where}: the order of sample {int(gen.sample_ids[row])} is not a permutation of 0..{seq_len - 1}")
    return orders.long()


def checked_schedule(counts, plugin: str, seq_len: int) -> list[int]:
    """Positive integer token counts summing to ``seq_len``, or one line naming ``plugin``."""
    where = f"step schedule from plugin {plugin!r}"
    if not isinstance(counts, (list, tuple)) or not counts:
        raise PluginError(f"{where}: got {_type_name(counts) if counts is not None else 'None'}; "
                          f"return a non-empty list of ints summing to {seq_len}")
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise PluginError(f"{where}: entry {i} is {n!r} ({type(n).__name__}); token counts must be ints")
        if n < 1:
            raise PluginError(f"{where}: step {i} reveals {n} tokens; every step must reveal >= 1")
    if sum(counts) != seq_len:
        raise PluginError(f"{where}: counts sum to {sum(counts)}, not to the {seq_len} tokens of the sequence")
    return [int(n) for n in counts]


def checked_cfg_scale(scale, plugin: str, step) -> float:
    """A finite real guidance scale, or one line naming ``plugin`` and the step."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise PluginError(f"guidance scale from plugin {plugin!r} at step {step.step}: got {scale!r}; return a finite float")
    return float(scale)


def check_forward_plan(plan, plugin: str, step) -> None:
    """The forward plan after ``plugin`` refined it."""
    if plan.mode and plan.mode not in FORWARD_MODES:
        raise PluginError(f"forward plan after plugin {plugin!r} at step {step.step}: mode {plan.mode!r}; "
                          f"known modes: {', '.join(FORWARD_MODES)}")


def check_head_plan(plan, plugin: str, step) -> None:
    """The head plan after ``plugin`` refined it: ``[B, k]`` integer budgets in the head-step range."""
    b, k = step.gen.batch_size, step.tokens_this_step
    where = f"head plan after plugin {plugin!r} at step {step.step}"
    steps = plan.steps
    if not _integer_tensor(steps):
        raise PluginError(f"{where}: steps is {_type_name(steps) if steps is not None else 'None'}; "
                          f"it must be a [{b}, {k}] integer tensor of DDPM step counts")
    if tuple(steps.shape) != (b, k):
        raise PluginError(f"{where}: steps has shape {tuple(steps.shape)}; expected [{b}, {k}] (samples x tokens predicted)")
    bad = (steps < HEAD_STEPS_MIN) | (steps > HEAD_STEPS_MAX)
    if bool(bad.any()):
        row = _first_bad_row(bad.any(dim=1))
        value = int(steps[row][bad[row]][0])
        raise PluginError(f"{where}: a token of sample {int(step.gen.sample_ids[row])} gets {value} DDPM steps; "
                          f"head plans need {HEAD_STEPS_MIN}..{HEAD_STEPS_MAX}")
    if isinstance(plan.temperature, bool) or not isinstance(plan.temperature, numbers.Real) or not plan.temperature > 0:
        raise PluginError(f"{where}: temperature {plan.temperature!r}; it must be a float > 0")
    # the budget rule (HeadPlan): laid down, then caps by min, then raises; nothing written directly
    if plan.base is None or not torch.equal(steps, plan.composed()):
        raise PluginError(f"{where}: budgets were written directly; propose them with HeadPlan.cap() / raise_to() "
                          "(budgets combine by min, then raises; docs/composition.md#head-budgets)")
