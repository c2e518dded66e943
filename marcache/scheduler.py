"""The sampling loop. It lives here and nowhere else.

Per batch: ``generation_start`` -> ``token_order`` -> ``step_schedule`` -> ``refine_order``; per step:
masks from the order and the schedule -> ``cfg_scale`` -> ``forward_plan`` -> backend encoder/decoder ->
``head_plan`` -> backend head -> write tokens -> ``step_end``; then ``generation_end`` and the report.

With only the built-in plugins this is LTH14/mar's ``MAR.sample_tokens``. The one deliberate
difference is randomness: instead of numpy's and torch's global generators, every sample owns a
``torch.Generator`` seeded from ``(seed, sample index)``. It draws the sample's order, then at each
step one ``[k, T + 1, C]`` block of head noise (index 0: initial ``x_T``; 1..T: the per-step draws).
Hence the same seed gives the same images, and a batch of N equals N batches of one.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .checks import check_forward_plan, check_head_plan, checked_cfg_scale, checked_order, checked_schedule
from .errors import ConfigError, PluginError
from .plans import (ForwardPlan, HeadPlan, StepRecord, cache_hit_summary, executed_positions, position_counts,
                    transformer_runs)
from .plugin import Plugin, build_plugin_manager, hook_calls
from .policy import ResolvedPolicy, load_policy
from .state import GenerationState, StepState


def sample_seed(seed: int, index: int) -> int:
    """64-bit seed of sample ``index`` under the global ``seed`` (independent of batching and rank)."""
    digest = hashlib.sha256(f"marcache:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generators(seed: int, sample_ids: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in sample_ids]


@dataclass
class GenerationResult:
    """Tokens ``[N, L, C]`` of the generated samples, their labels and ids, and the run report."""

    tokens: torch.Tensor
    labels: Optional[torch.Tensor]
    sample_ids: torch.Tensor
    report: dict = field(default_factory=dict)


class Sampler:
    """A model + a policy + a backend, ready to generate.

    ``extra_plugins`` are plugin instances added after the policy's (e.g. the tracer).
    """

    def __init__(self, model, policy: ResolvedPolicy | str | None = "baseline", backend=None,
                 extra_plugins: Sequence[Plugin] = (), overrides: Optional[list[str]] = None):
        from marcache.backends import get_backend

        self.model = model.eval()
        self.policy = policy if isinstance(policy, ResolvedPolicy) else load_policy(policy, overrides)
        bcfg = self.policy.config.backend
        self.backend = backend or get_backend(bcfg.name, bcfg.device, bcfg.dtype)
        self.backend.prepare(self.model)
        self.plugins = self.policy.instantiate() + list(extra_plugins)
        self.pm = build_plugin_manager(self.plugins)
        # the hooks whose results the loop checks are called one implementation at a time
        self._calls = {h: hook_calls(self.pm, h) for h in ("marcache_token_order", "marcache_step_schedule",
                                                             "marcache_cfg_scale", "marcache_forward_plan", "marcache_head_plan")}
        self.settings = self.policy.sampler_settings(self.model)
        self.pm.hook.marcache_configure.call_historic(kwargs=dict(policy=self.policy.config, model=self.model))
        self.step_log: list[dict] = []

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, labels: Optional[Sequence[int] | torch.Tensor] = None, num_images: Optional[int] = None,
                 seed: int = 0, batch_size: int = 64, sample_offset: int = 0, progress: bool = False) -> GenerationResult:
        """Generate ``num_images`` samples (or one per label). Sample ``i`` uses ids ``sample_offset + i``."""
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            num_images = len(labels) if num_images is None else num_images
            if len(labels) != num_images:
                raise ConfigError(f"--labels has {len(labels)} entries but --num-images is {num_images}")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.model.num_classes):
                raise ConfigError(f"--labels: class ids must be in [0, {self.model.num_classes - 1}]")
        if not num_images or num_images < 1:
            raise ConfigError("--num-images must be >= 1")
        if batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        ids = torch.arange(sample_offset, sample_offset + num_images)
        start = time.perf_counter()
        self.step_log = []
        chunks = []
        batches = range(0, num_images, batch_size)
        for self._batch_index, lo in enumerate(tqdm(batches, desc="batches", disable=not progress or len(batches) == 1, leave=False)):
            hi = min(lo + batch_size, num_images)
            chunks.append(self._generate_batch(None if labels is None else labels[lo:hi], ids[lo:hi], seed, progress))
        tokens = torch.cat(chunks)
        report = self._report(num_images, time.perf_counter() - start)
        return GenerationResult(tokens, labels, ids, report)

    # ------------------------------------------------------------------ the loop
    def _generate_batch(self, labels, ids, seed, progress) -> torch.Tensor:
        model, hook, s = self.model, self.pm.hook, self.settings
        device = self.backend.device
        gen = GenerationState(
            model=model, labels=None if labels is None else labels.to(device), sample_ids=ids,
            generators=sample_generators(seed, ids.tolist()), num_iter=int(s["num_iter"]), cfg=float(s["cfg"]),
            cfg_schedule=s["cfg_schedule"], temperature=float(s["temperature"]), head_steps=int(s["head_steps"]),
            device=device,
        )
        b, seq_len, c = gen.batch_size, model.seq_len, model.token_embed_dim
        hook.marcache_generation_start(gen=gen)
        orders, plugin = self._first_result("marcache_token_order", gen=gen)
        gen.orders = checked_order(orders, plugin, gen)
        counts, plugin = self._first_result("marcache_step_schedule", gen=gen)
        gen.tokens_per_step = checked_schedule(counts, plugin, seq_len)
        if hook.marcache_refine_order.get_hookimpls():  # checked only when some plugin may have permuted it
            gen.orders = gen.orders.clone()  # refined in place: never write through a plugin's own tensor
            hook.marcache_refine_order(gen=gen, orders=gen.orders)
            refiners = ", ".join(impl.plugin_name for impl in hook.marcache_refine_order.get_hookimpls())
            gen.orders = checked_order(gen.orders, f"refine_order: {refiners}", gen)

        tokens = torch.zeros(b, seq_len, c, device=device)
        mask = torch.ones(b, seq_len, dtype=torch.bool, device=device)
        prev = torch.zeros_like(mask)
        masked = seq_len
        steps = tqdm(gen.tokens_per_step, desc="steps", disable=not progress, leave=False)
        for index, count in enumerate(steps):
            masked_after = masked - count
            # tokens are revealed from the tail of each order: the first masked_after stay masked
            mask_next = torch.zeros_like(mask).scatter_(1, gen.orders[:, :masked_after], True)
            step = StepState(gen=gen, step=index, tokens=tokens, mask=mask, mask_to_pred=mask & ~mask_next,
                             mask_next=mask_next, prev_mask_to_pred=prev, num_masked_after=masked_after)
            step.cfg_scale = self._cfg_scale(step)
            forward = ForwardPlan(mode="", owner="")
            self._refine("marcache_forward_plan", lambda p: check_forward_plan(forward, p, step), step=step, plan=forward)
            if not forward.mode:
                raise PluginError("no plugin planned the forward pass (is 'full_recompute' disabled without a replacement?)")
            z = self.backend.run_forward(step, forward)
            head = HeadPlan(steps=None, temperature=gen.temperature, owner="", clip_denoised=s["clip_denoised"])
            self._refine("marcache_head_plan", lambda p: check_head_plan(head, p, step), step=step, plan=head, z=z[:b])
            noise = self.backend.upload(self._head_noise(gen, head.steps, c))
            new_tokens = self.backend.run_head(step, z, head, noise)
            # row-major fill of the predicted positions (no boolean indexing: no device sync)
            tokens = tokens.masked_scatter(step.mask_to_pred.unsqueeze(-1), new_tokens.to(tokens.dtype))
            record = self._record(step, forward, head, z.shape[0])
            hook.marcache_step_end(step=step, record=record)
            self._log_step(record, head, forward.branches)
            prev, mask, masked = step.mask_to_pred, mask_next, masked_after
            gen.store.note_peak()
        hook.marcache_generation_end(gen=gen, tokens=tokens)
        self._cache_peak = dict(gen.store.peak_bytes)
        gen.store.clear()
        return tokens.cpu()

    # ------------------------------------------------------------------ helpers
    def _cfg_scale(self, step: StepState) -> float:
        if not step.gen.guided:
            return 1.0
        scale, plugin = self._first_result("marcache_cfg_scale", step=step)
        if scale is None:
            raise ConfigError(f"sampler.cfg_schedule={step.gen.cfg_schedule!r}: no plugin implements it (built-in: linear, constant)")
        return checked_cfg_scale(scale, plugin, step)

    def _first_result(self, hook: str, **kwargs):
        """``(result, plugin)`` of a firstresult hook: pluggy's order, first non-None answer wins."""
        for plugin, function, argnames in self._calls[hook]:
            result = function(*(kwargs[a] for a in argnames))
            if result is not None:
                return result, plugin
        return None, None

    def _refine(self, hook: str, check, **kwargs) -> None:
        """Call a refine hook's implementations in pluggy's order, checking the plan after each."""
        for plugin, function, argnames in self._calls[hook]:
            function(*(kwargs[a] for a in argnames))
            check(plugin)

    @staticmethod
    def _head_noise(gen: GenerationState, steps: torch.Tensor, channels: int) -> torch.Tensor:
        """``[B, k, T_max + 1, C]``: each sample draws ``[k, T_sample + 1, C]`` from its own generator."""
        b, k = steps.shape
        t_max = int(steps.max())
        noise = torch.zeros(b, k, t_max + 1, channels)
        for i, g in enumerate(gen.generators):
            t = int(steps[i].max())
            noise[i, :, : t + 1] = torch.randn(k, t + 1, channels, generator=g)
        return noise

    @staticmethod
    def _record(step: StepState, forward: ForwardPlan, head: HeadPlan, rows: int) -> StepRecord:
        gen = step.gen
        encoder_runs, decoder_runs = transformer_runs(step, forward)
        recomputed, cached = executed_positions(step, forward)
        head_rows, modules = Counter(), Counter()
        guided = gen.guided and step.cfg_scale != 1.0
        for count, idx in head.groups():
            # the chain length that runs (a timestep cap merges respaced steps: DiSA's release)
            steps = count if head.timestep_cap is None else gen.model.diffloss.schedule(head.spec(count)).num_timesteps
            head_rows[steps] += (2 if guided else 1) * len(idx)
            if head.chain_cache is not None:
                modules.update(head.chain_cache.module_rows(steps, len(idx), guided, gen.model.diffloss.net.num_res_blocks))
        return StepRecord(
            step=step.step, encoder_runs=encoder_runs, decoder_runs=decoder_runs, rows=rows,
            head_rows_by_steps=dict(head_rows),
            predicted=step.mask_to_pred, recomputed=recomputed, cached=cached, cfg_scale=step.cfg_scale,
            owners={"forward": forward.owner, "head": head.owner},
            head_module_rows=dict(modules) if head.chain_cache is not None else None,
            extra_flops=dict(forward.extra_flops) or None,
        )

    def _log_step(self, record: StepRecord, head: HeadPlan, forward_branches: str) -> None:
        self.step_log.append({
            "batch": self._batch_index, "step": record.step, "tokens": int(head.steps.shape[1]), "cfg_scale": record.cfg_scale,
            "encoder": [vars(r) for r in record.encoder_runs], "decoder": [vars(r) for r in record.decoder_runs],
            "rows": record.rows,
            "head_rows_by_steps": {str(k): v for k, v in sorted(record.head_rows_by_steps.items())},
            "owners": record.owners,
            # resolved to ints when the report is built (counting here would sync the device)
            "positions": position_counts(record, forward_branches),
            "head_budget": head.budget_summary(),
        })

    def _report(self, num_images: int, seconds: float) -> dict:
        engagement: dict = {}
        for section in self.pm.hook.marcache_report():
            if section:
                engagement.update(section)
        silent = [p.name for p in self.plugins if not p.builtin and not p.engagement]
        flops = engagement.get("flops")  # also at top level: every report carries the FLOPs of the run
        for entry in self.step_log:
            entry["positions"] = {k: int(v) for k, v in entry["positions"].items()}
        return {
            "flops": flops,
            "policy": self.policy.to_dict(),
            "policy_source": self.policy.source,
            "sampler": self.settings,
            "backend": self.backend.describe(),
            "num_images": num_images,
            "seconds": seconds,
            "images_per_second": num_images / seconds if seconds > 0 else None,
            "num_steps": 1 + max((s["step"] for s in self.step_log), default=-1),
            "steps": self.step_log,
            "engagement": engagement,
            "never_engaged": silent,
            # the effective head budget per step (first batch): min of the laid-down budget and every
            # plugin's cap, then raises (HeadPlan; docs/composition.md)
            "head_budget_per_step": [s["head_budget"] for s in self.step_log if s["batch"] == 0],
            "cache_peak_bytes": getattr(self, "_cache_peak", {}),
            "cache_hits": cache_hit_summary(self.step_log),
        }


def generate_tokens(model, labels=None, num_images: Optional[int] = None, num_iter: Optional[int] = None,
                    cfg: Optional[float] = None, cfg_schedule: Optional[str] = None, temperature: Optional[float] = None,
                    seed: int = 0, batch_size: int = 64, progress: bool = False, policy: str | ResolvedPolicy = "baseline",
                    head_steps: Optional[int] = None) -> GenerationResult:
    """Generate on the model's device with a policy (baseline by default).

    The sampler arguments (``num_iter``, ``cfg``, ``cfg_schedule``, ``temperature``, ``head_steps``)
    override the policy's settings when given, whether ``policy`` is a name, a path or a resolved
    policy; ``None`` keeps the policy's value (itself ``null`` = the model's default).
    """
    given = {k: v for k, v in dict(num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                                   head_steps=head_steps).items() if v is not None}
    if isinstance(policy, ResolvedPolicy):
        resolved = policy.with_sampler(**given)
    else:
        resolved = load_policy(policy, [f"sampler.{k}={v}" for k, v in given.items()])
    sampler = Sampler(model, resolved, backend=_backend_for(model))
    return sampler.generate(labels=labels, num_images=num_images, seed=seed, batch_size=batch_size, progress=progress)


def _backend_for(model):
    from marcache.backends import ReferenceBackend

    return ReferenceBackend(next(model.parameters()).device)
