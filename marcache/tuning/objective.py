"""What a trial measures: the exact FLOPs ratio (shape-only counter), then fidelity to the baseline on a
small calibration set (fixed seeds and labels) and the measured images/s.

The baseline's calibration images are generated once and cached under ``--out`` (keyed by the model's
weights, the seed, the sample count and the baseline's settings), so every trial, every rerun and every
worker sharing the folder compares against the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConfigError

#: ``--quality`` choices: the fidelity summary each minimises (0 = the baseline's own images)
QUALITY_METRICS = {
    "feature": "mean classifier-feature cosine distance to the baseline (MNIST-sized images)",
    "ssim": "1 - mean SSIM to the baseline",
}


def quality_drop(fidelity: dict, metric: str) -> float:
    """The minimised quality objective from :func:`marcache.evaluation.fidelity.compare_images`'s summary."""
    if metric == "feature":
        return float(fidelity["feature_cosine_distance"]["mean"])
    return 1.0 - float(fidelity["ssim"]["mean"])


def resolve_quality(metric: str, model) -> str:
    """``auto``: the classifier-feature distance where it applies (28x28 grey images), else SSIM."""
    feature_ok = model.num_classes == 10 and model.img_size == 28 and getattr(model, "vae_embed_dim", None) == 1
    if metric == "auto":
        return "feature" if feature_ok else "ssim"
    if metric == "feature" and not feature_ok:
        raise ConfigError("--quality feature needs 28x28 grey images (the MNIST classifier's features); use --quality ssim")
    return metric


@dataclass
class Calibration:
    """The fixed calibration set: sample ``i`` has label ``i % classes`` and randomness ``(seed, i)``."""

    model: object
    model_name: str
    num_samples: int
    seed: int
    batch_size: int
    quality: str
    vae: object = None
    baseline_overrides: tuple = ()  # KEY=VALUE overrides of the baseline policy (``--baseline-set``)
    baseline_images: Optional[np.ndarray] = None
    baseline_images_per_second: Optional[float] = None
    baseline_tflops: Optional[float] = None

    @property
    def labels(self) -> list[int]:
        return [i % self.model.num_classes for i in range(self.num_samples)]

    def generate(self, policy) -> tuple[np.ndarray, float]:
        """uint8 images ``[N, H, W, C]`` of ``policy`` and the images/s of the generation (decoding included)."""
        from ..images import to_uint8, tokens_to_images
        from ..scheduler import Sampler

        start = time.perf_counter()
        result = Sampler(self.model, policy).generate(labels=self.labels, seed=self.seed, batch_size=self.batch_size)
        images = to_uint8(tokens_to_images(self.model, result.tokens, self.vae))
        return images, self.num_samples / (time.perf_counter() - start)

    def prepare(self, out: Path) -> None:
        """Load or make the baseline's calibration images and FLOPs (cached in ``out/calibration``)."""
        from ..evaluation.runner import model_fingerprint
        from ..policy import load_policy

        baseline = load_policy("baseline", list(self.baseline_overrides))
        self.baseline_tflops = tflops(self.model_name, baseline)
        key = json.dumps({"weights": model_fingerprint(self.model), "n": self.num_samples, "seed": self.seed,
                          "policy": baseline.to_dict()}, sort_keys=True, default=str)
        path = out / "calibration" / f"baseline-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
        if path.is_file():
            data = np.load(path)
            self.baseline_images, self.baseline_images_per_second = data["images"], float(data["images_per_second"])
            return
        self.baseline_images, self.baseline_images_per_second = self.generate(baseline)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # atomic: a second worker never reads half a file
        np.savez(tmp, images=self.baseline_images, images_per_second=self.baseline_images_per_second)
        os.replace(tmp, path)

    def measure(self, policy) -> dict:
        """Fidelity to the baseline, quality drop and speed of ``policy`` on the calibration set."""
        from ..evaluation.fidelity import compare_images, per_image

        images, ips = self.generate(policy)
        fidelity = compare_images(images, self.baseline_images)
        values = per_image(images, self.baseline_images)
        drops = values["feature_cosine_distance"] if self.quality == "feature" else 1.0 - values["ssim"]
        return {"quality_drop": quality_drop(fidelity, self.quality),
                # standard error of the mean drop over the calibration images: the spread ties are judged by
                "quality_drop_se": float(np.std(drops, ddof=1) / np.sqrt(len(drops))),
                "psnr_mean": fidelity["psnr"]["mean"], "ssim_mean": fidelity["ssim"]["mean"],
                "feature_distance_mean": (fidelity["feature_cosine_distance"] or {}).get("mean"),
                "identical_fraction": fidelity["identical_fraction"],
                "images_per_second": ips, "speedup": ips / self.baseline_images_per_second}


def tflops(model_name: str, policy) -> float:
    """Exact TFLOPs per image of ``policy`` from the shape-only counter (raises on an invalid combination)."""
    from ..flops import policy_flops
    from ..models import meta_model

    return policy_flops(meta_model(model_name), policy, num_images=1)["tflops_per_image"]
