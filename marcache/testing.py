"""Test helpers for plugin authors: the tiny model, the step recorder and the scheduling invariants.

A third-party plugin's tests reuse them instead of copying marcache's own test fixtures::

    from marcache.scheduler import Sampler
    from marcache.testing import StepRecorder, check_scheduling_invariants, make_tiny

    model = make_tiny(4)
    recorder = StepRecorder()
    result = Sampler(model, my_policy, extra_plugins=[recorder]).generate(labels=[1, 2], seed=0)
    check_scheduling_invariants(recorder, result)

Everything here runs on CPU in well under a second per generation.
"""

from __future__ import annotations

import torch

from marcache.caching import feature_cache_of
from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin


def perturb(model, seed: int = 0, scale: float = 0.02):
    """Add noise to every parameter: the official init zeroes the head's adaLN and output layers, so
    an untouched random model's head ignores its condition z and plugins would look exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def make_tiny(grid: int = 4, seed: int = 0, **overrides):
    """A random pixel-space ``mar_tiny`` with a ``grid x grid`` token grid (4x4-pixel patches, 1
    channel, 10 classes), perturbed so that its head depends on z. ``overrides`` go to the model
    constructor (e.g. ``decoder_depth=4, diffloss_d=6``)."""
    from marcache.models import create_model

    torch.manual_seed(seed)
    return perturb(create_model("mar_tiny", img_size=4 * grid, **overrides).eval(), seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the scale of ``b`` (random heads make chains reach ~1e4)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


class StepRecorder(Plugin):
    """Observer that keeps what every step saw, ``steps = [(StepState, StepRecord), ...]`` (all
    batches), the last :class:`~marcache.state.GenerationState` and, at every step that ran a cached
    pass, the number of positions read from the shared feature cache that were never written
    (``stale_reads``; 0 for a correct cache)."""

    name = "marcache_testing_recorder"
    families = frozenset({"accounting"})

    def __init__(self):
        super().__init__()
        self.steps: list[tuple] = []
        self.gen = None
        self.stale_reads = 0

    @hookimpl
    def marcache_generation_start(self, gen):
        self.gen = gen

    @hookimpl
    def marcache_step_end(self, step, record):
        self.steps.append((step, record))
        self.engagement["steps"] += 1
        self.stale_reads += stale_cache_reads(step, record)


class HeadChainCounter:
    """Counts the DDPM network rows x head steps the model's plain head chains actually ran (CFG rows
    counted), to compare with the records' ``head_rows_by_steps``. A context manager::

        with HeadChainCounter(model) as counter:
            sampler.generate(...)
        assert counter.rows_steps == sum(s * r for rec in records for s, r in rec.head_rows_by_steps.items())
    """

    def __init__(self, model):
        self.head = model.diffloss
        self.calls: list[tuple[int, int]] = []  # (network rows, head steps) per chain

    @property
    def rows_steps(self) -> int:
        return sum(rows * steps for rows, steps in self.calls)

    def __enter__(self) -> "HeadChainCounter":
        plain = type(self.head).sample_with_noise.__get__(self.head)

        def counted(z, noise, temperature=1.0, cfg=1.0, steps=None, **kwargs):
            # the steps that run (a timestep-capped spec such as "50@950" runs fewer than it names)
            sched = self.head.schedule(steps) if steps is not None else self.head.gen_diffusion
            self.calls.append((z.shape[0], sched.num_timesteps))
            return plain(z, noise, temperature, cfg, steps, **kwargs)

        self.head.sample_with_noise = counted
        return self

    def __exit__(self, *exc) -> None:
        del self.head.sample_with_noise  # back to the class method


def stale_cache_reads(step, record) -> int:
    """Positions a cached pass attended to (encoder: the visible ones; decoder: all) whose cached K/V
    were never computed in this generation."""
    cache = feature_cache_of(step.store)
    if cache is None or not cache.ready or record.owners["forward"] == "full_recompute" or cache.enc_k.is_meta:
        return 0
    rows = record.encoder_runs[0].rows
    present = (step.gen.model.with_buffer(step.mask.float()) == 0).repeat(rows // step.gen.batch_size, 1)
    written = cache.enc_k[:, :rows].abs().sum(dim=(0, 2, 4)) > 0  # [R, P]
    stale = int((present & ~written).sum())
    return stale + int((~(cache.dec_k[:, :rows].abs().sum(dim=(0, 2, 4)) > 0)).sum())


def check_scheduling_invariants(recorder: StepRecorder, result=None) -> None:
    """Assert what every policy must keep, over the last generation ``recorder`` saw (one batch):

    1. the orders are permutations of the positions;
    2. every token is predicted exactly once;
    3. every step predicts the same count (>= 1) in every sample, and the counts sum to L;
    4. a token stays masked until the last step;
    5. cached passes never read a position that was never computed;
    6. ``result``'s tokens (when given) are finite.

    Raises ``AssertionError`` naming the invariant."""
    gen = recorder.gen
    steps = [(s, r) for s, r in recorder.steps if s.gen is gen]
    assert gen is not None and steps, "the recorder saw no generation (pass it in extra_plugins)"
    b, seq_len = gen.batch_size, gen.seq_len
    expected = torch.arange(seq_len, device=gen.orders.device).expand(b, -1)
    assert torch.equal(gen.orders.sort(dim=1).values, expected), "1. an order is not a permutation"
    predicted = sum(s.mask_to_pred.long() for s, _ in steps)
    assert torch.equal(predicted, torch.ones_like(predicted)), "2. a token was predicted zero or several times"
    counts = [s.mask_to_pred.sum(dim=1) for s, _ in steps]
    assert all(int(c.min()) >= 1 and bool(torch.all(c == c[0])) for c in counts), "3. a step's counts differ or are 0"
    assert sum(int(c[0]) for c in counts) == seq_len, "3. the step counts do not sum to L"
    assert all(int(s.mask_next.sum(dim=1).min()) >= 1 for s, _ in steps[:-1]), "4. a sample ran out of masked tokens early"
    assert recorder.stale_reads == 0, f"5. {recorder.stale_reads} cached position(s) read before being computed"
    if result is not None:
        assert torch.isfinite(result.tokens).all(), "6. non-finite tokens"


class HostSyncGuard(Plugin):
    """Observer that makes any host sync between a step's forward plan and its end an error
    (``torch.cuda.set_sync_debug_mode("error")``); a sync-free backend generates through it unharmed.
    CUDA only: on other devices PyTorch has nothing to report. ``engagement["guarded_steps"]`` counts
    the steps it watched. Restore the mode with
    ``torch.cuda.set_sync_debug_mode("default")`` if a generation raises."""

    name = "marcache_testing_sync_guard"
    families = frozenset({"features"})  # it implements marcache_forward_plan (and changes no plan)

    @hookimpl(tryfirst=True)
    def marcache_forward_plan(self, step, plan):
        torch.cuda.set_sync_debug_mode("error")

    @hookimpl(trylast=True)
    def marcache_step_end(self, step, record):
        torch.cuda.set_sync_debug_mode("default")
        self.engagement["guarded_steps"] += 1  # proof that the guard was armed, not bypassed


def fake_distribution(folder, name: str, entry_points: dict[str, dict[str, str]]):
    """Make ``folder`` look like an installed distribution ``name`` with these entry points
    (``{group: {entry: "module:attr"}}``), so ``importlib.metadata`` discovers them once ``folder`` is on
    ``sys.path``: tests of plugin/backend discovery without installing anything. Returns the dist-info folder."""
    from pathlib import Path

    dist = Path(folder) / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {target}\n" for key, target in entries.items())
        for group, entries in entry_points.items()))
    return dist
