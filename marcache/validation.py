"""``marcache policy validate``: every check ``generate`` and ``flops`` would make, without computing.

Static checks alone (the YAML schema, plugin names and params) let through policies that fail later:
two order plugins, a declared conflict, a hook implementation with an argument the hookspec lacks, a
parameter that only breaks at the last AR step. So validation builds the run as ``generate`` does
(backend, plugin instances, plugin manager: conflicts, exclusive families, hook names and arguments,
each plugin's ``marcache_configure`` checks against the model) and then runs the real loop once on
the shape-only backend with a meta-device model: every order, schedule, guidance scale and plan of
every step passes the same checks as in a real run, for the sampler settings given. Nothing is
computed and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "mar_mnist"  # the model `marcache generate` uses without --model


@dataclass
class ValidationResult:
    """What the dry run covered."""

    model: str
    plugins: list
    num_steps: int
    samples: int
    head_steps: tuple  # (min, max) DDPM steps any token was planned

    def line(self, source: str) -> str:
        names = ", ".join(self.plugins) or "built-ins only"
        lo, hi = self.head_steps
        head = f"{lo}" if lo == hi else f"{lo}..{hi}"
        return (f"{source}: valid ({names}); dry run on {self.model}: {self.num_steps} steps, "
                f"{self.samples} samples, {head} head steps per token")


def validate_policy(policy, model_name: str = DEFAULT_MODEL, samples: int = 2) -> ValidationResult:
    """Raise :class:`~marcache.errors.MarcacheError` (one line) for anything ``generate`` would reject
    with ``policy`` on ``model_name``; return what was checked."""
    from marcache.backends import get_backend
    from marcache.backends.shape_only import ShapeOnlyBackend
    from marcache.flops import build_for_counting
    from marcache.scheduler import Sampler

    backend = policy.config.backend
    get_backend(backend.name, backend.device, backend.dtype)  # the backend generate would use exists here
    model = build_for_counting(model_name)  # meta device: nothing is computed
    sampler = Sampler(model, policy, backend=ShapeOnlyBackend(0))
    labels = [i % model.num_classes for i in range(samples)]
    result = sampler.generate(labels=labels, seed=0, batch_size=samples)
    counts = [int(c) for s in result.report["steps"] for c in s["head_rows_by_steps"]]
    return ValidationResult(model=model_name, plugins=[cls.name for cls, _ in policy.plugin_configs],
                            num_steps=result.report["num_steps"], samples=samples, head_steps=(min(counts), max(counts)))
