"""Fidelity to a reference policy: the same seeds and labels through two policies, compared image by image.

FID compares distributions and needs thousands of samples to see a few percent; a caching method that
keeps the token order and the randomness (LazyMAR, ReCAP, head caches) should instead reproduce the
baseline's images themselves, which per-image metrics see with tens of samples. Per image:

- ``psnr``: peak signal-to-noise ratio in pixel space (data range 1 after ``uint8 / 255``), torchmetrics;
  ``inf`` for identical images.
- ``ssim``: structural similarity (torchmetrics' Gaussian-window SSIM, kernel 11, sigma 1.5).
- ``feature_cosine_distance``: ``1 - cos`` of the MNIST classifier's 128-d features (the FID space of
  ``marcache eval``); only for 28x28 grey images, else ``None``.

Each is summarised as ``mean``, ``median`` and ``p5`` (5th percentile; for the distance, where larger is
worse, the 95th percentile is reported as ``p95`` instead), plus ``identical_fraction``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

#: the metrics and the direction in which they get worse
METRICS = {"psnr": "lower", "ssim": "lower", "feature_cosine_distance": "higher"}


def _to_float(images_uint8: np.ndarray) -> torch.Tensor:
    """``[N, H, W, C]`` uint8 -> ``[N, C, H, W]`` float64 in [0, 1] (float64: exact PSNR of tiny errors)."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).double() / 255.0


def summarize(values: np.ndarray, worse: str = "lower") -> dict:
    """Mean, median and the tail percentile on the bad side (5th for PSNR/SSIM, 95th for distances)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # mean of [inf, inf] is inf, not a warning
        mean = float(np.mean(values))
    # no interpolation: it turns two infinite PSNRs (identical images) into NaN; take the sample on the bad side
    tail = ({"p5": float(np.percentile(values, 5, method="lower"))} if worse == "lower"
            else {"p95": float(np.percentile(values, 95, method="higher"))})
    return {"mean": mean, "median": float(np.median(values)), **tail}


#: images compared at once (every metric is per image, so chunks change no value); comparing 5000 MNIST
#: images at once peaked at 19.5 GB of RSS, in chunks of 500 at 2.8 GB
CHUNK = 500


def per_image(images_uint8: np.ndarray, reference_uint8: np.ndarray, classifier=None) -> dict[str, Optional[np.ndarray]]:
    """Per-image PSNR, SSIM and classifier-feature cosine distance of ``images`` against ``reference``."""
    if images_uint8.shape != reference_uint8.shape:
        raise ValueError(f"fidelity needs images of one shape, got {images_uint8.shape} and {reference_uint8.shape}")
    if images_uint8.shape[1:] == (28, 28, 1):  # MNIST digits: also the classifier's feature distance
        from .classifier import load_classifier

        classifier = classifier or load_classifier()
    else:
        classifier = None
    chunks = [_per_image_chunk(images_uint8[i:i + CHUNK], reference_uint8[i:i + CHUNK], classifier)
              for i in range(0, len(images_uint8), CHUNK)]
    return {name: None if chunks[0][name] is None else np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def _per_image_chunk(images_uint8: np.ndarray, reference_uint8: np.ndarray, classifier) -> dict[str, Optional[np.ndarray]]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = _to_float(images_uint8), _to_float(reference_uint8)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    out = {"psnr": psnr.numpy(), "ssim": ssim.numpy(), "feature_cosine_distance": None}
    if classifier is not None:
        from .classifier import predict

        fa, _ = predict(classifier, images_uint8[..., 0])
        fb, _ = predict(classifier, reference_uint8[..., 0])
        out["feature_cosine_distance"] = (1.0 - torch.nn.functional.cosine_similarity(fa, fb, dim=1)).clamp_min(0).numpy()
    return out


def compare_images(images_uint8: np.ndarray, reference_uint8: np.ndarray, classifier=None) -> dict:
    """Summaries of :func:`per_image` (``None`` for a metric that does not apply) and ``identical_fraction``."""
    values = per_image(images_uint8, reference_uint8, classifier)
    result = {name: None if v is None else summarize(v, METRICS[name]) for name, v in values.items()}
    same = (images_uint8.reshape(len(images_uint8), -1) == reference_uint8.reshape(len(reference_uint8), -1)).all(1)
    result["identical_fraction"] = float(same.mean())
    result["num_samples"] = int(len(images_uint8))
    return result


def against_policy(against, evaluated, overrides: Optional[list[str]] = None):
    """The reference policy of ``--against``: ``against`` (name, path or resolved policy) with every sampler
    setting it leaves null taken from the evaluated policy, then ``overrides`` applied.

    So the default, the baseline, runs with the evaluated policy's steps, CFG and temperature.
    """
    from ..policy import ResolvedPolicy, load_policy

    if isinstance(against, ResolvedPolicy):
        return against
    base = load_policy(against, overrides)
    inherited = [f"sampler.{key}={_override_value(value)}"
                 for key, value in vars(evaluated.config.sampler).items()
                 if value is not None and getattr(base.config.sampler, key) is None]
    return load_policy(against, inherited + list(overrides or []))


def _override_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
