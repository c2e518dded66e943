"""Guards against numbers and inputs that would otherwise give garbage with exit status 0.

- :func:`check_weights`: a checkpoint's tensors are finite, of a floating dtype where the model's are,
  and below :data:`MAX_ABS_WEIGHT` (trained MAR weights stay below ~10; 1e30 overflows the first matmul).
- :func:`check_finite_fields`: every float (and list of floats) of a config dataclass is finite,
  so nothing non-finite reaches the sampler or ``report.json``.
- :func:`refuse_resolvers`: policy files may not call OmegaConf resolvers (``${oc.env:...}`` would copy
  environment values into the printed and stored policy).

Every refusal is a :class:`~marcache.errors.MarcacheError` subclass with one line naming what to fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Iterator, Mapping, Optional

import torch

from .errors import CheckpointError, ConfigError

#: largest |weight| accepted from a checkpoint (documented in docs/safety.md)
MAX_ABS_WEIGHT = 1e6


def check_weights(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str) -> None:
    """Refuse the first tensor of ``state`` that is non-floating where ``expected`` is floating, holds a
    NaN/inf, or a magnitude above :data:`MAX_ABS_WEIGHT`. One pass over the weights, at load time."""
    for key, tensor in state.items():
        ref = expected.get(key)
        if ref is not None and ref.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} is {str(tensor.dtype).replace('torch.', '')}, the model "
                                  f"expects floating point: the file is not a MAR checkpoint (re-export the weights)")
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor[~finite].flatten()[0].item()
            raise CheckpointError(f"{path}: tensor {key!r} holds non-finite values (first: {bad}); the checkpoint is "
                                  f"corrupt (a diverged run or a damaged file): use an earlier checkpoint")
        peak = float(tensor.abs().max())
        if peak > MAX_ABS_WEIGHT:
            raise CheckpointError(f"{path}: tensor {key!r} holds |values| up to {peak:.3g} (> {MAX_ABS_WEIGHT:.0e}, far "
                                  f"beyond trained weights); the checkpoint is corrupt: use an earlier checkpoint")


def _floats(value: Any, key: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, float):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _floats(item, f"{key}[{i}]")


def check_finite_fields(config: Any, where: str) -> None:
    """Raise ``ConfigError`` naming ``where.field`` if a float field (or list item) of a dataclass or
    mapping is NaN or infinite."""
    if dataclasses.is_dataclass(config):
        items = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]
    elif isinstance(config, Mapping):
        items = list(config.items())
    else:
        return
    for name, field_value in items:
        for key, value in _floats(field_value, str(name)):
            if not math.isfinite(value):
                raise ConfigError(f"{where}.{key}={value}: must be a finite number")


def check_range(value: Optional[float], key: str, low: float, high: float, low_open: bool = False) -> None:
    """``low <= value <= high`` (``low < value`` when ``low_open``) and finite; None passes (= default)."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{key}={value}: must be in {'(' if low_open else '['}{low:g}, {high:g}]")


#: an OmegaConf resolver call: ``${name:...}`` (``${key}`` node interpolations are allowed)
_RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield key, node
    elif isinstance(node, Mapping):
        for k, v in node.items():
            yield from _strings(k, key) if isinstance(k, str) and _RESOLVER.search(k) else iter(())
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")


def refuse_resolvers(raw: Any, source: str) -> None:
    """Refuse resolver interpolations (``${oc.env:HOME}``, ``${oc.decode:...}``, custom ones) anywhere in
    ``raw`` (a plain container, unresolved): a policy is data, it must not read the environment."""
    for key, text in _strings(raw):
        match = _RESOLVER.search(text)
        if match:
            call = text[match.start():].split("}")[0] + "}"
            raise ConfigError(f"{source}: {key or 'value'}: resolver interpolation {call} is not allowed in policies "
                              f"(they could read the environment); write the value itself")


def available_memory() -> int:
    """Bytes of memory the kernel reports as available (MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def check_run_size(count: int, flag: str, memory_per_item: int, disk_per_item: int, folder, hint: str) -> None:
    """Refuse ``count`` items up front when they could never fit: ``count * memory_per_item`` above the
    available memory or ``count * disk_per_item`` above the free space of ``folder`` (or its parent)."""
    from .fileio import free_bytes

    need_mem, need_disk = count * memory_per_item, count * disk_per_item
    mem = available_memory()
    if need_mem > mem:
        raise ConfigError(f"{flag} {count}: needs about {_human(need_mem)} of memory, {_human(mem)} is available; {hint}")
    free = free_bytes(folder)
    if need_disk > free:
        raise ConfigError(f"{flag} {count}: needs about {_human(need_disk)} in {folder}, {_human(free)} is free; {hint}")


def check_image_count(model, count: Optional[int], flag: str, folder, hint: str, resident: bool = True) -> None:
    """Refuse an image count the run could never hold in memory or write to ``folder``, before any
    per-image list is built (``--num-images 10**12`` would otherwise hang building labels)."""
    if count is None or count < 1:
        return
    channels = 3 if model.vae_stride > 1 else model.token_embed_dim // model.patch_size**2
    pixels = model.img_size * model.img_size * channels
    # generate holds the tokens (float32) and the images (float32, then uint8) of every sample until written;
    # eval streams shards to disk and holds the uint8 images (twice while concatenating) to score them
    per_image = model.seq_len * model.token_embed_dim * 4 + pixels * 5 if resident else pixels * 2
    check_run_size(count, flag, per_image, pixels + 64, folder, hint)
