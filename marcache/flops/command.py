"""``marcache flops``: FLOPs per image of a policy next to the baseline's, per component."""

from __future__ import annotations

import json
import time

from marcache.errors import ConfigError

from .accounting import COMPONENTS, CONVENTION
from .measure import build_for_counting, compare_with_baseline


def add_parser(subparsers) -> None:
    from marcache.cli import add_policy_args

    p = subparsers.add_parser("flops", help="FLOPs per image of a policy vs the baseline (per component)",
                              description="Runs the real scheduler and plugins on a shape-only backend (no checkpoint, "
                                          "meta-device model) and prices what executed with fvcore; FLOPs = 2 x multiply-adds.")
    p.set_defaults(func=run)
    p.add_argument("--model", required=True, help="registered model name (mar_base, mar_large, mar_huge, mar_tiny, ...)")
    add_policy_args(p)
    p.add_argument("--num-iter", type=int, help="AR steps for the policy and the baseline (default: the model's, 64)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's); 1.0 = no CFG (half the rows)")
    p.add_argument("--head-steps", type=int, help="DDPM head steps (default: the model's, 100)")
    p.add_argument("--num-images", type=int, default=1, help="images to plan (FLOPs are per image; default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--execute", action="store_true",
                   help="run the real model (random weights) on the policy's backend instead of the shape-only backend")
    p.add_argument("--per-step", action="store_true", help="also print/emit per-step FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _sampler_overrides(args) -> list[str]:
    out = []
    if args.num_iter is not None:
        if args.num_iter < 1:
            raise ConfigError("--num-iter must be >= 1")
        out.append(f"sampler.num_iter={args.num_iter}")
    if args.cfg is not None:
        if args.cfg < 1.0:
            raise ConfigError("--cfg must be >= 1.0 (1.0 disables guidance)")
        out.append(f"sampler.cfg={args.cfg}")
    if args.head_steps is not None:  # range checked by the policy schema
        out.append(f"sampler.head_steps={args.head_steps}")
    return out


def run(args) -> int:
    from marcache.policy import load_policy

    if args.num_images < 1:
        raise ConfigError("--num-images must be >= 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    sampler_over = _sampler_overrides(args)
    policy = load_policy(args.policy, list(args.overrides) + sampler_over)
    baseline = load_policy("baseline", sampler_over)
    start = time.perf_counter()
    model = build_for_counting(args.model, args.execute)
    cmp = compare_with_baseline(model, policy, baseline, num_images=args.num_images, seed=args.seed,
                                batch_size=args.batch_size, execute=args.execute, per_step=args.per_step)
    ours, base = cmp["policy_flops"], cmp["baseline_flops"]
    out = {
        "model": args.model,
        "policy": policy.config.name,
        "policy_source": policy.source,
        "sampler": ours["sampler"],
        "baseline_sampler": base["sampler"],
        "num_steps": ours["num_steps"],
        "tflops_per_image": cmp["tflops_per_image"],
        "baseline_tflops_per_image": cmp["baseline_tflops_per_image"],
        "flops_ratio": cmp["flops_ratio"],
        "components": {p: dict(ours["components"][p], baseline_tflops_per_image=base["components"][p]["tflops_per_image"])
                       for p in COMPONENTS},
        "head_executed_tflops_per_image": ours["head_executed_tflops_per_image"],
        "vae_decode_tflops_per_image": ours["vae_decode_tflops_per_image"],
        "convention": CONVENTION,
        "mode": "execute" if args.execute else "shape_only",
        "num_images": args.num_images,
        "seconds": time.perf_counter() - start,
    }
    if args.per_step:
        out["per_step"] = ours["per_step"]
        out["baseline_per_step"] = base["per_step"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    s = out["sampler"]
    scale, unit = (1.0, "TFLOPs") if out["baseline_tflops_per_image"] >= 0.1 else (1e3, "GFLOPs")
    print(f"{args.model} | policy {out['policy']} | {out['num_steps']} AR steps, cfg {s['cfg']} ({s['cfg_schedule']}), "
          f"{s['head_steps']} head steps | {out['mode']}, {args.num_images} image(s)")
    print(f"{'component':<22}{unit + '/image':>14}{'share':>8}{'baseline':>12}{'ratio':>9}")
    for p in COMPONENTS:
        c = out["components"][p]
        ratio = c["baseline_tflops_per_image"] / c["tflops_per_image"] if c["tflops_per_image"] else float("inf")
        print(f"{p:<22}{c['tflops_per_image'] * scale:>14.3f}{c['share']:>8.1%}{c['baseline_tflops_per_image'] * scale:>12.3f}{ratio:>8.2f}x")
    print(f"{'total':<22}{out['tflops_per_image'] * scale:>14.3f}{'':>8}{out['baseline_tflops_per_image'] * scale:>12.3f}{out['flops_ratio']:>8.2f}x")
    print(f"{'head as executed':<22}{out['head_executed_tflops_per_image'] * scale:>14.3f}   (cond_embed/time MLP hoisted out of the chain; not in totals)")
    if out["vae_decode_tflops_per_image"] is not None:
        print(f"{'VAE decode':<22}{out['vae_decode_tflops_per_image'] * scale:>14.3f}   (per image; excluded from totals)")
    if args.per_step:
        print(f"step  encoder  decoder     head    total  ({unit}/image)")
        for r in out["per_step"]:
            print(f"{r['step']:>4} {r['encoder'] * scale:>8.4f} {r['decoder'] * scale:>8.4f} {r['head'] * scale:>8.4f} {r['total'] * scale:>8.4f}")
    print(f"FLOPs ratio (baseline / policy): {out['flops_ratio']:.3f}x")
    print(f"convention: {CONVENTION}")
    return 0
