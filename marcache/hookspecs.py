"""Every hook of marcache's sampling loop, grouped by the phase in which it is called.

The loop (:mod:`marcache.scheduler`) calls each hook **once per generation or once per step, never per
layer or token**, outside the tensor math. Hooks take keyword arguments only; an implementation may
accept any subset of a spec's arguments, so adding an argument here breaks no plugin.

Three calling conventions are used, chosen per hook:

* **firstresult** (one answer wanted): the first implementation returning non-None wins. Built-in
  defaults are registered ``trylast`` so any plugin overrides them. Used where two answers cannot
  be merged (a token order, a step schedule, a guidance scale).
* **refine** (plain collected hook, return value ignored): every implementation receives the plan
  built so far and may change it in place; they run in pluggy order (LIFO registration adjusted by
  ``tryfirst``/``trylast``), so a policy's later plugins refine earlier ones' decisions (e.g. FTS
  raising some head budgets after GtR set the stage budget). Used for plans that compose.
* **observe** (plain collected hook): notifications at step/generation end for caches, accounting
  and reports; results are collected (``marcache_report`` merges the returned dicts).

Phases, in call order::

    configure            marcache_configure                      once per run
    generation start     marcache_generation_start               once per batch
                         marcache_token_order        firstresult
                         marcache_step_schedule      firstresult
                         marcache_refine_order       refine
    each step            marcache_cfg_scale          firstresult
                         marcache_forward_plan       refine      -> backend runs encoder/decoder
                         marcache_head_plan          refine      -> backend runs the DDPM head
                         marcache_step_end           observe
    generation end       marcache_generation_end     observe
                         marcache_report             observe (collected into the run report)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .plans import ForwardPlan, HeadPlan, StepRecord
    from .state import GenerationState, StepState

PROJECT = "marcache"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- configure
@hookspec(historic=True)
def marcache_configure(policy: Any, model: Any) -> None:
    """Called once after every plugin of a policy is registered, before any generation.

    ``policy`` is the resolved :class:`marcache.policy.PolicyConfig`; ``model`` the MAR. Validate
    what depends on the model here (e.g. a head cache that needs >= 5 head blocks) and raise
    :class:`marcache.errors.ConfigError` with one line naming the parameter. Historic: a plugin
    registered later still receives the call.
    """


# --------------------------------------------------------------------------- generation start
@hookspec
def marcache_generation_start(gen: "GenerationState") -> None:
    """A batch is about to be generated. Reset per-generation state here (caches belong in
    ``gen.store``, which the loop clears at generation end)."""


@hookspec(firstresult=True)
def marcache_token_order(gen: "GenerationState") -> Optional["torch.Tensor"]:
    """Return ``[B, L]`` int64: one permutation of the token positions per sample.

    Positions are revealed from the **tail** of the order (as the reference's ``mask_by_order``
    masks the first ``mask_len`` entries). Draw randomness only from ``gen.generators[i]`` for
    sample ``i`` so a batch equals its samples generated one by one. firstresult.
    """


@hookspec(firstresult=True)
def marcache_step_schedule(gen: "GenerationState") -> Optional[list]:
    """Return the number of tokens revealed at each step (a list of ints >= 1 summing to ``L``).

    Its length is the number of steps that run. The count is common to all samples of a batch
    (MAR's encoder needs equal visible counts per row); *which* tokens follows each sample's order.
    firstresult.
    """


@hookspec
def marcache_refine_order(gen: "GenerationState", orders: "torch.Tensor") -> None:
    """Refine the token order once the step schedule is known: permute ``orders [B, L]`` in place.

    Called after ``marcache_step_schedule`` with ``gen.tokens_per_step`` set, for plugins whose
    reveal order depends on the schedule (ReCAP decodes the targets of a group of steps in raster
    order). Keep each row a permutation (checked by the loop) and draw no randomness outside
    ``gen.generators``. refine.
    """


# --------------------------------------------------------------------------- each step
@hookspec(firstresult=True)
def marcache_cfg_scale(step: "StepState") -> Optional[float]:
    """Return the guidance scale handed to the head at this step (``gen.cfg_schedule`` names the
    schedule; a plugin returns None for schedules it does not implement). firstresult."""


@hookspec
def marcache_forward_plan(step: "StepState", plan: "ForwardPlan") -> None:
    """Refine how the encoder/decoder run at this step (feature caching, CFG-branch reuse).

    Called with the step's masks already known (``mask_to_pred``, ``prev_mask_to_pred``), before any
    network runs. Change ``plan`` in place and set ``plan.owner``. refine.
    """


@hookspec
def marcache_head_plan(step: "StepState", plan: "HeadPlan", z: "torch.Tensor") -> None:
    """Refine the per-token DDPM budgets and temperature of this step's head sampling.

    ``z`` holds the decoder outputs (head conditions) of the predicted tokens, ``[B, k, D]`` for the
    conditional rows, so plugins can score tokens (FTS). refine.
    """


@hookspec
def marcache_step_end(step: "StepState", record: "StepRecord") -> None:
    """The step ran; ``record`` says what actually executed (token counts, head rows per step
    count, recomputed positions). Update caches, counters and accounting here. observe."""


# --------------------------------------------------------------------------- generation end
@hookspec
def marcache_generation_end(gen: "GenerationState", tokens: "torch.Tensor") -> None:
    """The batch is complete (``tokens [B, L, C]``). ``gen.store`` is cleared right after. observe."""


@hookspec
def marcache_report() -> Optional[dict]:
    """Return ``{section: json-serialisable dict}`` for the run report (engagement counts, cache
    memory, effective parameters). Collected and merged. observe."""
