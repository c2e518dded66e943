"""How many samples does ``marcache eval`` need so that two seeds' FIDs differ by < 3 %? (issue 10)

    marcache eval --policy baseline --num-samples 5000 --seed 0 --out runs/fidn-s0 --generate-only
    marcache eval --policy baseline --num-samples 5000 --seed 1 --out runs/fidn-s1 --generate-only
    python benchmarks/fid_sample_size.py runs/fidn-s0 runs/fidn-s1 --sizes 500,1000,2000,2500,5000 --out docs/fid_sample_size.json

Sample ``i``'s randomness depends only on ``(seed, i)`` and its label is ``i % 10``, so consecutive
blocks of ``n`` samples of one run are independent, class-balanced evaluations of size ``n``, exactly as
runs with other seeds would be. For every ``n`` the script scores every disjoint block of every run
(whatever shards exist so far) and reports the FID spread: the relative difference
``|a - b| / mean(a, b)`` over all pairs of blocks, and over pairs from different seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import numpy as np

from marcache.evaluation import sharded
from marcache.evaluation.metrics import score_images


def load_run(folder: Path) -> dict:
    """Images and labels of the complete shards of a run, in sample order."""
    manifest = json.loads((folder / sharded.MANIFEST).read_text())
    shards = []
    for k in itertools.count():
        path = sharded.shard_path(folder, k)
        if not path.is_file():
            break
        shards.append(sharded._read_shard(path))
    if not shards:
        raise SystemExit(f"{folder}: no complete shard yet")
    return {"seed": manifest["description"]["seed"], "images": np.concatenate([s["images"] for s in shards]), "labels": np.concatenate([s["labels"] for s in shards])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="folders written by marcache eval --out (one per seed)")
    p.add_argument("--sizes", default="500,1000,2000,2500,5000")
    p.add_argument("--out", type=Path, help="JSON report")
    args = p.parse_args(argv)
    runs = [load_run(folder) for folder in args.runs]
    report = {"runs": [{"folder": str(f), "seed": r["seed"], "samples": len(r["images"])} for f, r in zip(args.runs, runs)],
              "sizes": {}}
    for n in [int(x) for x in args.sizes.split(",")]:
        blocks = []  # (seed, fid)
        for run in runs:
            for lo in range(0, len(run["images"]) - n + 1, n):
                m = score_images(run["images"][lo:lo + n], run["labels"][lo:lo + n], kid_subset_size=min(1000, n))
                blocks.append((run["seed"], m["fid"]))
        if len(blocks) < 2:
            continue
        pairs = [(a, b) for a, b in itertools.combinations(blocks, 2)]
        rel = [abs(a[1] - b[1]) / ((a[1] + b[1]) / 2) for a, b in pairs]
        cross = [r for (a, b), r in zip(pairs, rel) if a[0] != b[0]]
        fids = [f for _, f in blocks]
        report["sizes"][n] = {
            "blocks": len(blocks), "fids": fids, "mean": statistics.mean(fids),
            "std": statistics.stdev(fids) if len(fids) > 1 else None,
            "pair_rel_diff_max": max(rel), "pair_rel_diff_median": statistics.median(rel),
            "cross_seed_rel_diff_max": max(cross) if cross else None,
            "pairs_under_3pct": sum(r < 0.03 for r in rel) / len(rel),
        }
        s = report["sizes"][n]
        print(f"n={n:5d}  blocks={len(blocks):2d}  FID mean {s['mean']:.2f} std {s['std']:.2f}  pair diff median "
              f"{s['pair_rel_diff_median']:.1%} max {s['pair_rel_diff_max']:.1%}  cross-seed max "
              f"{'-' if s['cross_seed_rel_diff_max'] is None else format(s['cross_seed_rel_diff_max'], '.1%')}  "
              f"pairs < 3%: {s['pairs_under_3pct']:.0%}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
