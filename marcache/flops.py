"""FLOP accounting of what actually ran.

Convention (the one of the MAR acceleration papers and of ``torch.utils.flop_counter``):
**FLOPs = 2 x multiply-adds** of the matrix products (``linear``, ``matmul``, ``bmm``, ``addmm``,
``einsum``), the convolutions and the attention (``scaled_dot_product_attention``: QK^T plus AV).
Element-wise work (norms, GELU/SiLU, softmax, residual adds, the DDPM update) is **not** counted;
it is < 0.1 % of a MAR step and no published MAR count includes it.

How: the scheduler hands every plugin a :class:`~marcache.plans.StepRecord` per step saying what
executed (transformer runs ``(rows, queries, keys, layers)``, head rows per head-step count). A
:class:`CostModel` prices each distinct *execution shape* once with fvcore's ``FlopCountAnalysis``
(traced on meta-device copies of single modules, so pricing costs no arithmetic and no memory) and
caches it; :class:`FlopAccumulator` multiplies those per-shape costs by the recorded plans, per step
and per component:

* ``encoder``: encoder blocks (per ``TransformerRun``), plus the per-step stem: ``z_proj`` on all L
  tokens and ``encoder_norm`` on the encoder outputs (class embedding: a lookup, 0 FLOPs);
* ``decoder``: ``decoder_embed`` on the encoder outputs, the decoder blocks (``decoder_norm`` and the
  positional embeddings are element-wise);
* ``head``: one full ``SimpleMLPAdaLN`` pass (time-embedding MLP, ``cond_embed``, trunk) per network
  row per head step (CFG rows counted), the official per-step cost. marcache's implementation hoists
  ``cond_embed`` out of the chain (once per row) and the time MLP (once per chain step, 1 row); the
  executed figure is reported as ``head_executed`` next to it, never in the totals;
* ``vae``: one KL-16 decode per image for latent models, reported separately and excluded from the
  totals by default (as the papers do).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from marcache.backends.base import Backend
from marcache.errors import ConfigError
from marcache.plans import HEAD_MODULES, transformer_runs
from marcache.plugin import Plugin

FLOPS_PER_MAC = 2
CONVENTION = ("FLOPs = 2 x multiply-adds of matmuls/linears/convs and attention (QK^T + AV); "
              "element-wise ops (norms, activations, softmax, adds) not counted; "
              "head at the official per-step cost (time MLP + cond_embed + trunk per row per head step); "
              "CFG rows counted; VAE decode reported separately, excluded from totals")
COMPONENTS = ("encoder", "decoder", "head")

#: operators counted (fvcore's ``by_operator`` names); everything else fvcore reports is dropped
COUNTED_OPERATORS = frozenset({"addmm", "bmm", "conv", "einsum", "matmul", "mm", "linear", "scaled_dot_product_attention"})

# --------------------------------------------------------------------------- op handles
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


# --------------------------------------------------------------------------- per-shape costs
def _meta(module: nn.Module) -> nn.Module:
    """A meta-device copy of ``module`` (the module itself when already on meta)."""
    params = list(module.parameters()) + list(module.buffers())
    if params and all(p.is_meta for p in params):
        return module
    return copy.deepcopy(module).to("meta")


class _AttentionHalf(nn.Module):
    """Trace wrapper: a block's attention residual, optionally over cached keys/values ``k, v``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, k=None, v=None):
        from marcache.models.blocks import KV

        return self.block.attention_residual(x, past_kv=None if k is None else KV(k, v))


class _MlpHalf(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.mlp_residual(x)


class _HeadStep(nn.Module):
    """Trace wrapper: one official head-network pass ``net(x_t, t, c)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, c):
        return self.net(x, t, c)


class _BlockMLP(nn.Module):
    """A head ResBlock's LayerNorm + MLP (its adaLN is priced separately)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.mlp(self.block.in_ln(x))


class _FinalLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, y):
        return self.layer(x, y)




class _HeadTrunk(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        return self.net.forward_embedded(x, y)


class _VaeDecode(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z)


def model_signature(model) -> tuple:
    """Hashable structure of a MAR: parameter names and shapes plus the sequence layout."""
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    heads = tuple(b.attn.num_heads for b in list(model.encoder_blocks)[:1] + list(model.decoder_blocks)[:1])
    return (type(model).__name__, model.seq_len, model.buffer_size, heads, shapes)


class CostModel:
    """FLOPs (2 x MAC) of each execution shape of one MAR, priced once with fvcore and cached.

    All costs are per network row (per sequence); every counted op is linear in the row count.
    """

    def __init__(self, model, vae: Optional[nn.Module] = None):
        self.seq_len = model.seq_len
        self.buffer_size = model.buffer_size
        self.token_dim = model.token_embed_dim
        self.latent_shape = (model.vae_embed_dim, model.seq_h * model.patch_size, model.seq_w * model.patch_size)
        self.uses_vae = model.vae_stride > 1
        self.enc_dim = model.z_proj.out_features
        self.dec_dim = model.decoder_embed.out_features
        self.z_dim = model.diffloss.net.cond_embed.in_features
        self._enc_block = _meta(model.encoder_blocks[0]) if len(model.encoder_blocks) else None
        self._dec_block = _meta(model.decoder_blocks[0]) if len(model.decoder_blocks) else None
        self._z_proj = _meta(model.z_proj)
        self._decoder_embed = _meta(model.decoder_embed)
        self._net = _meta(model.diffloss.net)
        self._vae = _meta(vae) if vae is not None else None
        self._cache: dict[tuple, Counter] = {}

    def _priced(self, key: tuple, fn) -> Counter:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def shapes_priced(self) -> int:
        return len(self._cache)

    # ---------------------------------------------------------------- transformer
    def block(self, part: str, queries: int, keys: int, mlp_queries: Optional[int] = None) -> Counter:
        """One encoder/decoder block on one row: ``queries`` fresh tokens attending over ``keys`` keys
        (``keys - queries`` of them cached K/V), then ``mlp_queries`` (default ``queries``) of them
        through the MLP half (a block narrowed between its halves, LazyMAR)."""
        if part not in ("encoder", "decoder"):
            raise ValueError(f"part must be encoder or decoder, got {part!r}")
        m = queries if mlp_queries is None else mlp_queries
        if not 1 <= queries <= keys or not 0 <= m <= queries:
            raise ValueError(f"a transformer run needs 1 <= queries <= keys and 0 <= mlp_queries <= queries, "
                             f"got queries={queries}, keys={keys}, mlp_queries={mlp_queries}")
        return self.attention_half(part, queries, keys) + self.mlp_half(part, m)

    def _block(self, part: str):
        return self._enc_block if part == "encoder" else self._dec_block

    def _width(self, part: str) -> int:
        return self.enc_dim if part == "encoder" else self.dec_dim

    def attention_half(self, part: str, queries: int, keys: int) -> Counter:
        """``x + attn(norm1(x))`` on one row (qkv and output projections, QK^T and AV)."""
        block, dim = self._block(part), self._width(part)

        def price():
            x = torch.zeros(1, queries, dim, device="meta")
            if queries == keys:
                return fvcore_flops(_AttentionHalf(block), (x,))
            heads = block.attn.num_heads
            past = torch.zeros(1, heads, keys - queries, dim // heads, device="meta")
            return fvcore_flops(_AttentionHalf(block), (x, past, past))

        return self._priced((part, "attention", queries, keys), price)

    def mlp_half(self, part: str, tokens: int) -> Counter:
        """``x + mlp(norm2(x))`` on ``tokens`` tokens of one row."""
        if tokens == 0:
            return Counter()
        block, dim = self._block(part), self._width(part)
        return self._priced((part, "mlp", tokens), lambda: fvcore_flops(_MlpHalf(block), (torch.zeros(1, tokens, dim, device="meta"),)))

    def encoder_stem(self) -> Counter:
        """Per row and step: ``z_proj`` on all L tokens (``encoder_norm`` is element-wise)."""
        return self._priced(("encoder_stem",), lambda: fvcore_flops(self._z_proj, (torch.zeros(1, self.seq_len, self.token_dim, device="meta"),)))

    def decoder_stem(self, in_tokens: int) -> Counter:
        """Per row and step: ``decoder_embed`` on the encoder's ``in_tokens`` outputs."""
        return self._priced(("decoder_stem", in_tokens),
                            lambda: fvcore_flops(self._decoder_embed, (torch.zeros(1, in_tokens, self.enc_dim, device="meta"),)))

    # ---------------------------------------------------------------- head
    def head_step(self) -> Counter:
        """One official head pass on one row: time MLP + cond_embed + trunk."""

        def price():
            x = torch.zeros(1, self.token_dim, device="meta")
            t = torch.zeros(1, dtype=torch.long, device="meta")
            c = torch.zeros(1, self.z_dim, device="meta")
            return fvcore_flops(_HeadStep(self._net), (x, t, c))

        return self._priced(("head",), price)

    def head_trunk(self) -> Counter:
        """The trunk only (``forward_embedded``), what marcache runs per row per head step."""

        def price():
            width = self._net.model_channels
            return fvcore_flops(_HeadTrunk(self._net), (torch.zeros(1, self.token_dim, device="meta"), torch.zeros(1, width, device="meta")))

        return self._priced(("head_trunk",), price)

    def head_module(self, name: str) -> Counter:
        """One row through one head module (``HEAD_MODULES``); the modules of an official head pass
        sum to :meth:`head_step` (blocks counted once each)."""

        def price():
            net, w = self._net, self._net.model_channels
            row = torch.zeros(1, w, device="meta")
            if name == "time_embed":
                return fvcore_flops(net.time_embed, (torch.zeros(1, dtype=torch.long, device="meta"),))
            if name == "cond_embed":
                return fvcore_flops(net.cond_embed, (torch.zeros(1, self.z_dim, device="meta"),))
            if name == "input_proj":
                return fvcore_flops(net.input_proj, (torch.zeros(1, self.token_dim, device="meta"),))
            if name == "block_adaln":
                return fvcore_flops(net.res_blocks[0].adaLN_modulation, (row,))
            if name == "block_mlp":
                return fvcore_flops(_BlockMLP(net.res_blocks[0]), (row,))
            if name == "final":
                return fvcore_flops(_FinalLayer(net.final_layer), (row, row))
            raise ValueError(f"unknown head module {name!r}; known: {', '.join(HEAD_MODULES)}")

        return self._priced(("head_module", name), price)

    def cond_embed(self) -> Counter:
        return self._priced(("cond_embed",), lambda: fvcore_flops(self._net.cond_embed, (torch.zeros(1, self.z_dim, device="meta"),)))

    def time_embed(self) -> Counter:
        return self._priced(("time_embed",), lambda: fvcore_flops(self._net.time_embed, (torch.zeros(1, dtype=torch.long, device="meta"),)))

    # ---------------------------------------------------------------- VAE
    def vae_decode(self) -> Counter:
        """One image's VAE decode (empty for pixel-space models or when no VAE was given)."""
        if self._vae is None:
            return Counter()
        return self._priced(("vae",), self._price_vae)

    def _price_vae(self) -> Counter:
        # fvcore's jit trace cannot run meta-device convolutions (shape checks on traced ints), and a
        # real KL-16 decode costs ~0.1 TMAC of CPU time; FlopCounterMode prices it on meta instead
        # (the same 2-per-MAC convention; documented in docs/flops.md).
        z = torch.zeros(1, *self.latent_shape, device="meta")
        with flop_counter_mode() as counter, torch.no_grad():
            self._vae.decode(z)
        return Counter({str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items() if n})


_COST_MODELS: dict[tuple, CostModel] = {}


def cost_model_for(model, with_vae: bool = True) -> CostModel:
    """The (process-wide cached) cost model of a MAR's structure; the VAE is the KL-16 one for
    latent models (built on meta, no weights needed)."""
    key = (model_signature(model), with_vae)
    if key not in _COST_MODELS:
        vae = None
        if with_vae and model.vae_stride > 1:
            from marcache.models.vae import AutoencoderKL

            with torch.device("meta"):
                vae = AutoencoderKL(embed_dim=model.vae_embed_dim)
        _COST_MODELS[key] = CostModel(model, vae)
    return _COST_MODELS[key]


# --------------------------------------------------------------------------- accumulation
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


def _total(c: Counter) -> int:
    return int(sum(c.values()))


def record_flops(costs: CostModel, record) -> tuple[StepFlops, dict[str, Counter]]:
    """FLOPs of one executed step (whole batch) by component, and by component and operator."""
    ops: dict[str, Counter] = defaultdict(Counter)
    out = StepFlops(step=int(record.step))
    for part in ("encoder", "decoder"):
        runs = list(getattr(record, f"{part}_runs"))
        for run in runs:
            block = costs.block(part, run.queries, run.keys, getattr(run, "mlp_queries", None))
            for op, n in block.items():
                ops[part][op] += n * run.rows * run.layers
        if runs:
            rows = max(r.rows for r in runs)
            if part == "encoder":
                stem = costs.encoder_stem()
            else:
                enc_runs = list(record.encoder_runs)
                enc_out = enc_runs[-1].queries if enc_runs else runs[0].keys - costs.seq_len
                stem = costs.decoder_stem(max(enc_out, 1))
            for op, n in stem.items():
                ops[part][op] += n * rows
    head, trunk = costs.head_step(), _total(costs.head_trunk())
    cond, temb = _total(costs.cond_embed()), _total(costs.time_embed())
    executed = 0
    module_rows = getattr(record, "head_module_rows", None)
    if module_rows:  # a chain cache ran: price what each head module actually processed
        for name in HEAD_MODULES:
            for op, n in costs.head_module(name).items():
                ops["head"][op] += n * int(module_rows.get(name, 0))
        executed = (_total(ops["head"]) - module_rows.get("cond_embed", 0) * cond - module_rows.get("time_embed", 0) * temb
                    + module_rows.get("executed_cond_embed", 0) * cond + module_rows.get("executed_time_embed", 0) * temb)
    else:
        for steps, rows in record.head_rows_by_steps.items():
            for op, n in head.items():
                ops["head"][op] += n * rows * int(steps)
            executed += rows * (int(steps) * trunk + cond) + int(steps) * temb
    out.encoder, out.decoder, out.head = (_total(ops[p]) for p in COMPONENTS)
    out.head_executed = executed
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
        return {p: _total(self.ops[p]) for p in COMPONENTS}

    def summary(self, per_step: bool = False) -> dict:
        """JSON-serialisable report: totals and per-image figures per component."""
        images = max(self.images, 1)
        totals = self.totals()
        total = sum(totals.values())
        vae = _total(self.costs.vae_decode())
        out = {
            "convention": CONVENTION,
            "images": self.images,
            "total_flops": total,
            "flops_per_image": total / images,
            "tflops_per_image": total / images / 1e12,
            "components": {
                p: {"flops": totals[p], "tflops_per_image": totals[p] / images / 1e12,
                    "share": totals[p] / total if total else 0.0,
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


def flops_of_records(model, records: Iterable, images: int) -> dict:
    """Convenience: the summary of a list of StepRecords that generated ``images`` images."""
    acc = FlopAccumulator(cost_model_for(model))
    for r in records:
        acc.add(r)
    acc.add_images(images)
    return acc.summary()


# --------------------------------------------------------------------------- observer plugin


class FlopObserver(Plugin):
    """Accumulates the FLOPs of every executed step; the summary covers what ran since the last report.

    Not registered itself: :mod:`marcache.plugins.flop_counter` registers the built-in instance that
    every policy carries (report section ``flops``); :func:`policy_flops` adds a private probe.
    """

    name = "flops_probe"
    families = frozenset({"accounting"})
    builtin = True
    description = "FLOPs of the executed plans (2 x MAC; see marcache.flops)"
    section = "flops_probe"
    per_step = False  # include per-step figures in the summary

    def __init__(self, config=None):
        super().__init__(config)
        self.model = None
        self._pending: list[tuple] = []
        self._images = 0
        self.last_summary: Optional[dict] = None

    def marcache_configure(self, policy, model):
        self.model = model

    def marcache_generation_start(self, gen):
        self._images += gen.batch_size

    def marcache_step_end(self, step, record):
        # keep only the plain shapes (records hold [B, L] masks); pricing happens at report time,
        # outside the timed generation
        self._pending.append(_compact(record))

    def summary(self, per_step: bool = False) -> dict:
        acc = FlopAccumulator(cost_model_for(self.model))
        for rec in self._pending:
            acc.add(rec)
        acc.add_images(self._images)
        return acc.summary(per_step=per_step)

    def reset(self) -> None:
        self._pending, self._images = [], 0

    def marcache_report(self):
        if self.model is None or not self._pending:
            return None
        self.last_summary = self.summary(per_step=self.per_step)
        self.reset()
        return {self.section: self.last_summary}


@dataclass(frozen=True)
class _CompactRecord:
    step: int
    encoder_runs: tuple
    decoder_runs: tuple
    head_rows_by_steps: dict
    head_module_rows: Optional[dict] = None


def _compact(record) -> _CompactRecord:
    modules = getattr(record, "head_module_rows", None)
    return _CompactRecord(int(record.step), tuple(record.encoder_runs), tuple(record.decoder_runs),
                          {int(k): int(v) for k, v in record.head_rows_by_steps.items()},
                          dict(modules) if modules else None)


# --------------------------------------------------------------------------- shape-only execution


class ShapeOnlyBackend(Backend):
    """Runs the real scheduler and plugins without the tensor math: ``run_forward`` returns seeded
    random head conditions of the right shape, ``run_head`` zeros. The plans (hence the StepRecords)
    are the real ones for every plugin whose decisions do not depend on feature values; a plugin that
    scores features (e.g. token similarity) sees random features, so its FLOPs are indicative only
    (use ``marcache flops --execute`` on models small enough to run).

    The model may live on the meta device. Kept here on purpose: it is not an execution backend."""

    name = "shape_only"

    def __init__(self, seed: int = 0):
        super().__init__(torch.device("cpu"))
        self._gen = torch.Generator().manual_seed(seed)

    def prepare(self, model) -> None:  # nothing to move
        self.model = model

    def run_forward(self, step, plan) -> torch.Tensor:
        transformer_runs(step, plan)  # the plan must be one the accounting understands
        gen = step.gen
        cache = getattr(plan, "cache", None)
        if cache is not None and hasattr(cache, "allocate") and not cache.ready:
            # plugins read the feature cache's decoder states (zeros here); the K/V stay shape-only
            total = 2 * gen.batch_size if gen.guided else gen.batch_size
            cache.allocate(gen.model, total, torch.device("meta"))
            positions, width = gen.model.buffer_size + gen.seq_len, gen.model.decoder_embed.out_features
            cache.dec_in = torch.zeros(total, positions, width)
            cache.prenorm = torch.zeros(total, positions, width)
        rows = 2 * gen.batch_size if gen.guided else gen.batch_size
        width = gen.model.decoder_embed.out_features
        return torch.randn(rows, step.tokens_this_step, width, generator=self._gen)

    def run_head(self, step, z, plan, noise) -> torch.Tensor:
        return torch.zeros(step.gen.batch_size, z.shape[1], step.gen.model.token_embed_dim)


def policy_flops(model, policy, num_images: int = 1, seed: int = 0, batch_size: int = 64, execute: bool = False,
                 per_step: bool = False) -> dict:
    """FLOPs summary of generating ``num_images`` with ``policy`` (a ResolvedPolicy) on ``model``.

    ``execute=False``: the shape-only backend (``model`` may be on meta). ``execute=True``: the
    policy's real backend runs the model (random or loaded weights)."""
    from marcache.scheduler import Sampler

    probe = FlopObserver()
    probe.per_step = per_step
    backend = None if execute else ShapeOnlyBackend(seed)
    sampler = Sampler(model, policy, backend=backend, extra_plugins=[probe])
    labels = [i % model.num_classes for i in range(num_images)]
    result = sampler.generate(labels=labels, num_images=num_images, seed=seed, batch_size=batch_size)
    summary = probe.last_summary
    summary["sampler"] = dict(sampler.settings)
    summary["num_steps"] = result.report.get("num_steps")
    return summary


# --------------------------------------------------------------------------- `marcache flops`
def add_parser(subparsers) -> None:
    from marcache.cli import _add_policy_args

    p = subparsers.add_parser("flops", help="FLOPs per image of a policy vs the baseline (per component)",
                              description="Runs the real scheduler and plugins on a shape-only backend (no checkpoint, "
                                          "meta-device model) and prices what executed with fvcore; FLOPs = 2 x multiply-adds.")
    p.set_defaults(func=run)
    p.add_argument("--model", required=True, help="registered model name (mar_base, mar_large, mar_huge, mar_tiny, ...)")
    _add_policy_args(p)
    p.add_argument("--num-iter", type=int, help="AR steps for the policy and the baseline (default: the model's, 64)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's); 1.0 = no CFG (half the rows)")
    p.add_argument("--head-steps", type=int, help="DDPM head steps (default: the model's, 100)")
    p.add_argument("--num-images", type=int, default=1, help="images to plan (FLOPs are per image; default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--execute", action="store_true",
                   help="run the real model (random weights) on the policy's backend instead of the shape-only backend")
    p.add_argument("--per-step", action="store_true", help="also print/emit per-step FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _sampler_overrides(args) -> list[str]:
    out = []
    if args.num_iter is not None:
        if args.num_iter < 1:
            raise ConfigError("--num-iter must be >= 1")
        out.append(f"sampler.num_iter={args.num_iter}")
    if args.cfg is not None:
        if args.cfg < 1.0:
            raise ConfigError("--cfg must be >= 1.0 (1.0 disables guidance)")
        out.append(f"sampler.cfg={args.cfg}")
    if args.head_steps is not None:  # range checked by the policy schema
        out.append(f"sampler.head_steps={args.head_steps}")
    return out


def build_for_counting(name: str, execute: bool = False):
    """A registered model on meta (shape-only) or randomly initialised on CPU (``execute``)."""
    from marcache.models import create_model, list_models, meta_model

    if name not in list_models():
        raise ConfigError(f"--model {name!r}: not a registered model (registered: {', '.join(list_models())})")
    return create_model(name) if execute else meta_model(name)


def compare_with_baseline(model, policy, baseline, **kwargs) -> dict:
    """Both summaries and the ratio ``baseline / policy`` (> 1: the policy saves FLOPs)."""
    ours = policy_flops(model, policy, **kwargs)
    base = policy_flops(model, baseline, **kwargs)
    return {
        "tflops_per_image": ours["tflops_per_image"],
        "baseline_tflops_per_image": base["tflops_per_image"],
        "flops_ratio": base["tflops_per_image"] / ours["tflops_per_image"] if ours["tflops_per_image"] else None,
        "policy_flops": ours,
        "baseline_flops": base,
    }


def run(args) -> int:
    import json
    import time

    from marcache.policy import load_policy

    if args.num_images < 1:
        raise ConfigError("--num-images must be >= 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    sampler_over = _sampler_overrides(args)
    policy = load_policy(args.policy, list(args.overrides) + sampler_over)
    baseline = load_policy("baseline", sampler_over)
    start = time.perf_counter()
    model = build_for_counting(args.model, args.execute)
    cmp = compare_with_baseline(model, policy, baseline, num_images=args.num_images, seed=args.seed,
                                batch_size=args.batch_size, execute=args.execute, per_step=args.per_step)
    ours, base = cmp["policy_flops"], cmp["baseline_flops"]
    out = {
        "model": args.model,
        "policy": policy.config.name,
        "policy_source": policy.source,
        "sampler": ours["sampler"],
        "baseline_sampler": base["sampler"],
        "num_steps": ours["num_steps"],
        "tflops_per_image": cmp["tflops_per_image"],
        "baseline_tflops_per_image": cmp["baseline_tflops_per_image"],
        "flops_ratio": cmp["flops_ratio"],
        "components": {p: dict(ours["components"][p], baseline_tflops_per_image=base["components"][p]["tflops_per_image"])
                       for p in COMPONENTS},
        "head_executed_tflops_per_image": ours["head_executed_tflops_per_image"],
        "vae_decode_tflops_per_image": ours["vae_decode_tflops_per_image"],
        "convention": CONVENTION,
        "mode": "execute" if args.execute else "shape_only",
        "num_images": args.num_images,
        "seconds": time.perf_counter() - start,
    }
    if args.per_step:
        out["per_step"] = ours["per_step"]
        out["baseline_per_step"] = base["per_step"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    s = out["sampler"]
    scale, unit = (1.0, "TFLOPs") if out["baseline_tflops_per_image"] >= 0.1 else (1e3, "GFLOPs")
    print(f"{args.model} | policy {out['policy']} | {out['num_steps']} AR steps, cfg {s['cfg']} ({s['cfg_schedule']}), "
          f"{s['head_steps']} head steps | {out['mode']}, {args.num_images} image(s)")
    print(f"{'component':<22}{unit + '/image':>14}{'share':>8}{'baseline':>12}{'ratio':>9}")
    for p in COMPONENTS:
        c = out["components"][p]
        ratio = c["baseline_tflops_per_image"] / c["tflops_per_image"] if c["tflops_per_image"] else float("inf")
        print(f"{p:<22}{c['tflops_per_image'] * scale:>14.3f}{c['share']:>8.1%}{c['baseline_tflops_per_image'] * scale:>12.3f}{ratio:>8.2f}x")
    print(f"{'total':<22}{out['tflops_per_image'] * scale:>14.3f}{'':>8}{out['baseline_tflops_per_image'] * scale:>12.3f}{out['flops_ratio']:>8.2f}x")
    print(f"{'head as executed':<22}{out['head_executed_tflops_per_image'] * scale:>14.3f}   (cond_embed/time MLP hoisted out of the chain; not in totals)")
    if out["vae_decode_tflops_per_image"] is not None:
        print(f"{'VAE decode':<22}{out['vae_decode_tflops_per_image'] * scale:>14.3f}   (per image; excluded from totals)")
    if args.per_step:
        print(f"step  encoder  decoder     head    total  ({unit}/image)")
        for r in out["per_step"]:
            print(f"{r['step']:>4} {r['encoder'] * scale:>8.4f} {r['decoder'] * scale:>8.4f} {r['head'] * scale:>8.4f} {r['total'] * scale:>8.4f}")
    print(f"FLOPs ratio (baseline / policy): {out['flops_ratio']:.3f}x")
    print(f"convention: {CONVENTION}")
    return 0
