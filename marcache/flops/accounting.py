"""Accumulation: the per-shape costs of :class:`~marcache.flops.costs.CostModel` multiplied by the
executed plans (:class:`~marcache.plans.StepRecord`), per step and per component."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

from marcache.plans import HEAD_MODULES

from .costs import CostModel
from .operators import total

CONVENTION = ("FLOPs = 2 x multiply-adds of matmuls/linears/convs and attention (QK^T + AV); "
              "element-wise ops (norms, activations, softmax, adds) not counted; "
              "head at the official per-step cost (time MLP + cond_embed + trunk per row per head step); "
              "CFG rows counted; VAE decode reported separately, excluded from totals")
COMPONENTS = ("encoder", "decoder", "head")


@dataclass
class StepFlops:
    step: int
    encoder: int = 0
    decoder: int = 0
    head: int = 0
    head_executed: int = 0

    @property
    def total(self) -> int:
        return self.encoder + self.decoder + self.head


@dataclass(frozen=True)
class ExecutedShapes:
    """The plain shapes of a :class:`~marcache.plans.StepRecord` (no ``[B, L]`` masks): what an
    observer keeps per step so that pricing can happen at report time, outside the timed loop."""

    step: int
    encoder_runs: tuple
    decoder_runs: tuple
    head_rows_by_steps: dict
    head_module_rows: Optional[dict] = None
    extra_flops: Optional[dict] = None  # plugin work beside the runs (ForwardPlan.extra_flops)

    @classmethod
    def of(cls, record) -> "ExecutedShapes":
        modules, extra = record.head_module_rows, record.extra_flops
        return cls(int(record.step), tuple(record.encoder_runs), tuple(record.decoder_runs),
                   {int(k): int(v) for k, v in record.head_rows_by_steps.items()}, dict(modules) if modules else None,
                   dict(extra) if extra else None)


def _transformer_flops(costs: CostModel, record, ops: dict[str, Counter]) -> None:
    for part in ("encoder", "decoder"):
        runs = list(getattr(record, f"{part}_runs"))
        for run in runs:
            for op, n in costs.block(part, run.queries, run.keys, run.mlp_queries).items():
                ops[part][op] += n * run.rows * run.layers
        if not runs:
            continue
        rows = max(r.rows for r in runs)
        if part == "encoder":
            stem = costs.encoder_stem()
        else:
            enc_runs = list(record.encoder_runs)
            enc_out = enc_runs[-1].queries if enc_runs else runs[0].keys - costs.seq_len
            stem = costs.decoder_stem(max(enc_out, 1))
        for op, n in stem.items():
            ops[part][op] += n * rows


def _head_flops(costs: CostModel, record, ops: dict[str, Counter]) -> int:
    """Adds the head's official-cost FLOPs to ``ops``; returns the FLOPs marcache executed."""
    cond, temb = total(costs.cond_embed()), total(costs.time_embed())
    module_rows = record.head_module_rows
    if module_rows:  # a chain cache ran: price what each head module actually processed
        for name in HEAD_MODULES:
            for op, n in costs.head_module(name).items():
                ops["head"][op] += n * int(module_rows.get(name, 0))
        return (total(ops["head"]) - module_rows.get("cond_embed", 0) * cond - module_rows.get("time_embed", 0) * temb
                + module_rows.get("executed_cond_embed", 0) * cond + module_rows.get("executed_time_embed", 0) * temb)
    head, trunk, executed = costs.head_step(), total(costs.head_trunk()), 0
    for steps, rows in record.head_rows_by_steps.items():
        for op, n in head.items():
            ops["head"][op] += n * rows * int(steps)
        executed += rows * (int(steps) * trunk + cond) + int(steps) * temb
    return executed


def record_flops(costs: CostModel, record) -> tuple[StepFlops, dict[str, Counter]]:
    """FLOPs of one executed step (whole batch) by component, and by component and operator."""
    ops: dict[str, Counter] = defaultdict(Counter)
    _transformer_flops(costs, record, ops)
    out = StepFlops(step=int(record.step))
    out.head_executed = _head_flops(costs, record, ops)
    for (part, op), n in (getattr(record, "extra_flops", None) or {}).items():
        ops[part][op] += int(n)  # already FLOPs of the whole batch (e.g. drift_refresh's measuring)
    out.encoder, out.decoder, out.head = (total(ops[p]) for p in COMPONENTS)
    return out, ops


class FlopAccumulator:
    """Sums :func:`record_flops` over the steps of one or more batches."""

    def __init__(self, costs: CostModel):
        self.costs = costs
        self.images = 0
        self.steps: list[StepFlops] = []
        self.ops: dict[str, Counter] = defaultdict(Counter)
        self.head_executed = 0

    def add_images(self, n: int) -> None:
        self.images += int(n)

    def add(self, record) -> StepFlops:
        step, ops = record_flops(self.costs, record)
        self.steps.append(step)
        for part, c in ops.items():
            self.ops[part].update(c)
        self.head_executed += step.head_executed
        return step

    def totals(self) -> dict[str, int]:
        return {p: total(self.ops[p]) for p in COMPONENTS}

    def summary(self, per_step: bool = False) -> dict:
        """JSON-serialisable report: totals and per-image figures per component."""
        images = max(self.images, 1)
        totals = self.totals()
        grand = sum(totals.values())
        vae = total(self.costs.vae_decode())
        out = {
            "convention": CONVENTION,
            "images": self.images,
            "total_flops": grand,
            "flops_per_image": grand / images,
            "tflops_per_image": grand / images / 1e12,
            "components": {
                p: {"flops": totals[p], "tflops_per_image": totals[p] / images / 1e12,
                    "share": totals[p] / grand if grand else 0.0,
                    "by_operator": {op.replace("aten::", ""): n for op, n in sorted(self.ops[p].items())}}
                for p in COMPONENTS
            },
            "head_executed_tflops_per_image": self.head_executed / images / 1e12,
            "vae_decode_tflops_per_image": vae / 1e12 if self.costs.uses_vae else None,
            "shapes_priced": self.costs.shapes_priced,
        }
        if per_step:
            # per-step figures summed over batches, per image (steps of the same index merged)
            merged: dict[int, Counter] = defaultdict(Counter)
            for s in self.steps:
                merged[s.step].update({"encoder": s.encoder, "decoder": s.decoder, "head": s.head})
            out["per_step"] = [{"step": i, **{p: merged[i][p] / images / 1e12 for p in COMPONENTS},
                                "total": sum(merged[i].values()) / images / 1e12} for i in sorted(merged)]
        return out
