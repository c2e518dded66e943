"""The MNIST classifier as a torch-fidelity feature extractor (registered once per process).

torch-fidelity hands the extractor uint8 ``[B, 3, H, W]`` batches; they are averaged to grey, resized
to 28x28 if needed, scaled to [-1, 1] and passed through :class:`~.classifier.MnistNet`. Features:
``feat`` (128-d penultimate layer, FID/KID/precision-recall) and ``logits`` (10 classes, Inception Score).
"""

from __future__ import annotations

import threading

import torch

EXTRACTOR_NAME = "marcache-mnist-cnn"
_LOCK = threading.Lock()
_REGISTERED = False


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    from .classifier import load_classifier, uint8_to_input

    class MnistFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            # ``feature_extractor_weights_path`` (a calculate_metrics kwarg) selects other classifier weights
            self.net = load_classifier(kwargs.get("feature_extractor_weights_path"))

        @staticmethod
        def get_provided_features_list():
            return ("feat", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

        def forward(self, x):
            feats, logits = self.net.features_and_logits(uint8_to_input(x))
            out = {"feat": feats, "logits": logits}
            return tuple(out[name] for name in self.features_list)

    return MnistFeatureExtractor


def register() -> str:
    """Register the extractor with torch-fidelity (idempotent); returns its name."""
    global _REGISTERED
    with _LOCK:
        if not _REGISTERED:
            from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

            if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
                register_feature_extractor(EXTRACTOR_NAME, _extractor_class())
            _REGISTERED = True
    return EXTRACTOR_NAME
