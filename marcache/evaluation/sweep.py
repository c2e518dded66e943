"""Evaluate one policy at several sampler settings, each with several seeds (resumable shards)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .spread import combine_seeds


def sweep(model, settings: Sequence[tuple[str, list[str]]], seeds: Sequence[int], num_samples: int, out,
          batch_size: int = 100, policy: str = "baseline", cache_root=None, progress: bool = True) -> dict:
    """``{label: combined result}`` for each ``(label, overrides)``; shards under ``OUT/<label>-s<seed>/``.

    Each setting's result is :func:`.spread.combine_seeds` of its seeds (mean, per seed, spread); with one
    seed, that seed's result with ``fid_per_seed`` / ``fid_spread`` (0) filled in the same shape.
    """
    from .runner import evaluate

    results = {}
    for label, overrides in settings:
        per_seed = []
        for seed in seeds:
            r = evaluate(model, policy, num_samples, seed, batch_size, overrides=overrides,
                         out_dir=str(Path(out) / f"{label}-s{seed}"), cache_root=cache_root, progress=progress)
            per_seed.append(r)
            print(f"{label} seed {seed}: FID {r['fid']:.2f}, accuracy {r['class_accuracy']:.3f}", file=sys.stderr)
        results[label] = combine_seeds(per_seed) if len(per_seed) > 1 else dict(
            per_seed[0], fid_per_seed=[per_seed[0]["fid"]], fid_spread=0.0, seeds=list(seeds))
    return results
