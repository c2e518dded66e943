"""FLOPs of a policy: run the real scheduler and plugins (shape-only or executed) and price what ran."""

from __future__ import annotations

from marcache.errors import ConfigError


def policy_flops(model, policy, num_images: int = 1, seed: int = 0, batch_size: int = 64, execute: bool = False,
                 per_step: bool = False) -> dict:
    """FLOPs summary of generating ``num_images`` with ``policy`` (a ResolvedPolicy) on ``model``.

    ``execute=False``: the shape-only backend (``model`` may be on meta). ``execute=True``: the
    policy's real backend runs the model (random or loaded weights)."""
    from marcache.backends.shape_only import ShapeOnlyBackend
    from marcache.plugins.flop_counter import FlopObserver
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


def build_for_counting(name: str, execute: bool = False):
    """A registered model on meta (shape-only) or randomly initialised on CPU (``execute``)."""
    from marcache.models import create_model, list_models, meta_model

    if name not in list_models():
        raise ConfigError(f"--model {name!r}: not a registered model (registered: {', '.join(list_models())})")
    return create_model(name) if execute else meta_model(name)
