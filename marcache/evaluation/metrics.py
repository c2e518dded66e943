"""FID, KID, precision/recall and Inception Score through torch-fidelity, in the feature space of the
MNIST classifier, plus the class accuracy of class-conditional samples.

Always CPU-safe settings: ``cuda`` only when a GPU is present, ``save_cpu_ram=True`` (no DataLoader
workers), the feature extractor named explicitly (no download of Inception/VGG weights).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from . import features, reference


def class_accuracy(images_uint8: np.ndarray, labels: Sequence[int], classifier=None) -> float:
    """Fraction of samples the classifier assigns to the class they were generated for."""
    from .classifier import load_classifier, predict

    net = classifier or load_classifier()
    _, logits = predict(net, images_uint8)
    return float((logits.argmax(1).numpy() == np.asarray(labels)).mean())


def score_images(images_uint8: np.ndarray, labels: Optional[Sequence[int]] = None, *, cache_root=None,
                 classifier_path: Optional[str | os.PathLike] = None, kid_subset_size: int = 1000,
                 isc_splits: int = 10, reference_images: Optional[np.ndarray] = None, verbose: bool = False) -> dict:
    """Score uint8 samples ``[N, 28, 28]`` (or ``[N, H, W, C]``) against the MNIST test set.

    ``reference_images`` replaces the MNIST test set (then nothing is cached). Returns fid, kid, kid_std,
    precision, recall, f_score, inception_score, inception_score_std and (with ``labels``) class_accuracy.
    """
    import torch_fidelity

    images_uint8 = np.asarray(images_uint8)
    n = len(images_uint8)
    if n < 2:
        raise ConfigError("--num-samples must be >= 2 to compute metrics")
    name = features.register()
    kwargs = dict(input1=reference.UInt8Images(images_uint8), fid=True, kid=True, prc=True, isc=True,
                  feature_extractor=name, cuda=torch.cuda.is_available(), save_cpu_ram=True, verbose=verbose,
                  batch_size=500, kid_subset_size=min(kid_subset_size, n), isc_splits=min(isc_splits, n),
                  samples_find_deep=False)
    if classifier_path is not None:
        kwargs["feature_extractor_weights_path"] = os.fspath(classifier_path)
    if reference_images is None:
        ref = reference.reference_dataset()
        kwargs.update(input2=ref, input2_cache_name=reference.reference_name(classifier_path),
                      cache_root=os.fspath(reference.cache_root(cache_root)), cache=True)
    else:
        ref = reference.UInt8Images(np.asarray(reference_images))
        kwargs.update(input2=ref, cache=False)
    kwargs["kid_subset_size"] = min(kwargs["kid_subset_size"], len(ref))
    m = torch_fidelity.calculate_metrics(**kwargs)
    out = {
        "fid": float(m["frechet_inception_distance"]),
        "kid": float(m["kernel_inception_distance_mean"]),
        "kid_std": float(m["kernel_inception_distance_std"]),
        "precision": float(m["precision"]),
        "recall": float(m["recall"]),
        "f_score": float(m["f_score"]),
        "inception_score": float(m["inception_score_mean"]),
        "inception_score_std": float(m["inception_score_std"]),
    }
    if labels is not None:
        from .classifier import load_classifier

        out["class_accuracy"] = class_accuracy(images_uint8, labels, load_classifier(classifier_path))
    return out
