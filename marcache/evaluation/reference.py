"""Reference data for the metrics: the 10,000 MNIST test images, whose features and FID statistics
torch-fidelity computes on first use and caches (``input2_cache_name`` + ``cache_root``), or
user-supplied FID statistics (:func:`load_reference_stats`, e.g. LTH14/mar ``adm_in256_stats.npz``).

The cache name embeds a digest of the classifier weights, so new weights never reuse stale statistics.
Cache folder: ``$MARCACHE_CACHE/fidelity`` if set, else ``~/.cache/marcache/fidelity``.

``$MARCACHE_REFERENCE_SIZE=K`` scores against the first K test images instead of all 10,000 (quick
checks and the test suite: precision/recall cost grows with the square of the reference size). Numbers
measured that way are not comparable with full-reference ones; the cache name says which was used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .features import EXTRACTOR_NAME


class UInt8Images(Dataset):
    """uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` as torch-fidelity wants them: ``[3, H, W]`` uint8 tensors."""

    def __init__(self, images: np.ndarray | torch.Tensor):
        x = torch.as_tensor(np.asarray(images))
        if x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {x.dtype}")
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [N, H, W] or [N, H, W, 1|3], got {tuple(x.shape)}")
        self.images = x.permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def cache_root(root: Optional[str | os.PathLike] = None) -> Path:
    if root is not None:
        return Path(root)
    base = os.environ.get("MARCACHE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "marcache") / "fidelity"


#: images in the MNIST test set (the full reference)
TEST_SET_SIZE = 10_000


def reference_size() -> int:
    """How many MNIST test images the reference holds: ``$MARCACHE_REFERENCE_SIZE``, else all of them."""
    raw = os.environ.get("MARCACHE_REFERENCE_SIZE", "").strip()
    if not raw:
        return TEST_SET_SIZE
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if not 2 <= size <= TEST_SET_SIZE:
        raise ConfigError(f"MARCACHE_REFERENCE_SIZE={raw!r}: an integer from 2 to {TEST_SET_SIZE} "
                          "(or unset for the full test set)")
    return size


def _size_suffix() -> str:
    size = reference_size()
    return "" if size == TEST_SET_SIZE else f"-first{size}"


def mnist_reference_label() -> str:
    """How reports name the built-in reference: ``mnist-test``, or ``mnist-test-first<K>`` for a subset."""
    return f"mnist-test{_size_suffix()}"


def reference_name(classifier_path: Optional[str | os.PathLike] = None) -> str:
    """Cache name of the MNIST test-set reference in the given classifier's feature space."""
    from ..weights import classifier_path as shipped
    from .classifier import weights_digest

    return f"mnist-test{_size_suffix()}-{weights_digest(classifier_path or shipped())}"


def inception_reference_name() -> str:
    """Cache name of the MNIST test-set reference in the converted FID Inception space."""
    from .inception import SOURCE_SHA1

    return f"mnist-test{_size_suffix()}-fidinception-{SOURCE_SHA1[:8]}"


def reference_dataset() -> UInt8Images:
    """The reference images: the MNIST test set, or its first ``$MARCACHE_REFERENCE_SIZE`` images."""
    from ..data import load_mnist

    return UInt8Images(load_mnist("test")[0][:reference_size()])


def reference_files(root: Optional[str | os.PathLike] = None, classifier_path=None) -> list[Path]:
    """The cache files torch-fidelity writes for the reference (features of both layers, FID statistics)."""
    name, folder = reference_name(classifier_path), cache_root(root)
    return [folder / f"{name}-{EXTRACTOR_NAME}-features-feat.pt", folder / f"{name}-{EXTRACTOR_NAME}-features-logits.pt",
            folder / f"{name}-{EXTRACTOR_NAME}-stat-fid-feat.pt"]


# --------------------------------------------------------------------------- user-supplied statistics
@dataclass(frozen=True)
class ReferenceStats:
    """FID statistics of a reference set: mean ``mu`` (float32 ``[D]``) and covariance ``sigma``
    (float64 ``[D, D]``), the dtypes torch-fidelity computes for a sample set and asserts are equal."""

    mu: np.ndarray
    sigma: np.ndarray
    source: str

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def _stats_hint(dim: Optional[int], space: str) -> str:
    d = "D" if dim is None else str(dim)
    example = " (e.g. LTH14/mar fid_stats/adm_in256_stats.npz)" if dim == 2048 else ""
    return (f"pass an .npz with arrays 'mu' [{d}] and 'sigma' [{d}, {d}] (or a torch-fidelity stat .pt) "
            f"computed in the {space} feature space{example}")


def _numpy_safe_globals() -> list:
    """The numpy globals a torch-fidelity stat file (``torch.save`` of numpy arrays) needs under
    ``weights_only=True``, under both numpy-2 and numpy-1 names."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    rebuild = multiarray._reconstruct
    return [(rebuild, "numpy._core.multiarray._reconstruct"), (rebuild, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, *(type(np.dtype(t)) for t in ("float16", "float32", "float64"))]


def _read_stats_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if not hasattr(z, "files"):
                    raise ValueError("not an .npz archive")
                return {k: z[k] for k in z.files}
        except ValueError as exc:
            if "pickle" in str(exc):  # numpy's wording suggests allow_pickle=True: never done here
                raise ValueError("not an .npz archive of plain arrays; pickled data is never loaded") from None
            raise
    if suffix in (".pt", ".pth"):
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError(f"holds a {type(obj).__name__}, not a dict")
        return {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in obj.items()}
    raise ValueError(f"unknown suffix {suffix or '(none)'!r}: expected .npz or .pt")


def load_reference_stats(path: str | os.PathLike, dim: Optional[int] = None,
                         space: str = "chosen") -> ReferenceStats:
    """Read and check FID reference statistics (``mu``, ``sigma``) from an ``.npz`` (LTH14/mar's
    ``fid_stats/*.npz`` format; read with ``allow_pickle=False``) or a torch-fidelity stat ``.pt``
    (read with ``weights_only=True``). ``dim``: the width of the feature space they must match.

    Every problem is one :class:`ConfigError` line naming the file and the fix.
    """
    p = Path(path)
    hint = _stats_hint(dim, space)
    if not p.is_file():
        raise ConfigError(f"--reference-stats {p}: no such file; {hint}")
    try:
        data = _read_stats_file(p)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"--reference-stats {p}: unreadable ({reason}); {hint}") from None
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise ConfigError(f"--reference-stats {p}: no {' or '.join(repr(k) for k in missing)} "
                          f"(found {sorted(data) or 'nothing'}); {hint}")
    mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise ConfigError(f"--reference-stats {p}: 'mu'/'sigma' are not numeric ({mu.dtype}, {sigma.dtype}); {hint}")
    mu = mu.reshape(-1) if mu.ndim == 2 and 1 in mu.shape else mu
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d):
        raise ConfigError(f"--reference-stats {p}: 'mu' {tuple(mu.shape)} and 'sigma' {tuple(sigma.shape)} "
                          f"are not [D] and [D, D]; {hint}")
    if dim is not None and d != dim:
        extra = " (2048-d statistics are Inception pool features: add --features inception)" if d == 2048 else ""
        raise ConfigError(f"--reference-stats {p}: {d}-d statistics, but the {space} feature space is {dim}-d{extra}; "
                          f"{hint}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"--reference-stats {p}: 'mu'/'sigma' contain NaN or infinity; {hint}")
    return ReferenceStats(mu.astype(np.float32), sigma.astype(np.float64), str(p))


def write_stats_cache_entry(folder: str | os.PathLike, name: str, extractor: str, layer: str,
                            stats: ReferenceStats) -> Path:
    """Write ``stats`` where torch-fidelity looks up the cached FID statistics of an input named
    ``name`` (``input2_cache_name``): ``<folder>/<name>-<extractor>-stat-fid-<layer>.pt``."""
    path = Path(folder) / f"{name}-{extractor}-stat-fid-{layer}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"mu": stats.mu.astype(np.float32), "sigma": stats.sigma.astype(np.float64)}, tmp)
    os.replace(tmp, path)
    return path
