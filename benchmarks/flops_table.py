"""Regenerate the FLOP tables of docs/flops.md: baseline FLOPs per image of MAR-B/L/H at 64 steps with
CFG against the published counts, the counting conventions, and the fewer-steps grid (targets.md §4).

    .venv/bin/python benchmarks/flops_table.py [--models mar_base mar_large mar_huge] [--grid]

Shape-only (meta-device models, the real scheduler and plans): no checkpoint, about 20 s per model.
"""

from __future__ import annotations

import argparse

from marcache.bench import StepGrid
from marcache.flops import cost_model_for, policy_flops
from marcache.models import meta_model
from marcache.policy import load_policy

CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}
PUBLISHED = {  # TFLOPs per image, 64 steps, CFG, 100 head steps (targets.md §2.1)
    "mar_base": {"lazymar": 15.49, "gtr": None, "analytic": 14.63},
    "mar_large": {"lazymar": 35.05, "gtr": None, "analytic": 33.03},
    "mar_huge": {"lazymar": 69.06, "gtr": 64.52, "analytic": 65.11},
}


def _pct(ours: float, ref) -> str:
    return "–" if ref is None else f"{ref:.2f} ({ours / ref - 1:+.1%})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(CFG))
    ap.add_argument("--grid", action="store_true", help="also the fewer-steps grid (AR 64/48/32/24/16/8 x head 100/50/25)")
    args = ap.parse_args()

    print("| model | encoder | decoder | head | **total** | + VAE decode | head as executed (total) | trunk-only head (total) "
          "| LazyMAR | GtR | analytic |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = meta_model(name)
        s = policy_flops(model, load_policy("baseline", ["sampler.num_iter=64", f"sampler.cfg={CFG.get(name, 3.0)}"]))
        c = {p: v["tflops_per_image"] for p, v in s["components"].items()}
        total = s["tflops_per_image"]
        costs = cost_model_for(model)
        trunk_share = sum(costs.head_trunk().values()) / sum(costs.head_step().values())
        transformer = c["encoder"] + c["decoder"]
        pub = PUBLISHED.get(name, {})
        print(f"| {name} | {c['encoder']:.2f} | {c['decoder']:.2f} | {c['head']:.2f} | **{total:.2f}** "
              f"| {total + (s['vae_decode_tflops_per_image'] or 0):.2f} | {transformer + s['head_executed_tflops_per_image']:.2f} "
              f"| {transformer + c['head'] * trunk_share:.2f} | {_pct(total, pub.get('lazymar'))} | {_pct(total, pub.get('gtr'))} "
              f"| {_pct(total, pub.get('analytic'))} |")

    if args.grid:
        print("\n| model | AR steps | head 100 | head 50 | head 25 |")
        print("|---|---|---|---|---|")
        for name in args.models:
            grid = StepGrid(meta_model(name), [f"sampler.cfg={CFG.get(name, 3.0)}"])
            base = grid.tflops(64, 100)
            for n in (64, 48, 32, 24, 16, 8):
                cells = [f"{grid.tflops(n, h):.1f} ({base / grid.tflops(n, h):.2f}x)" for h in (100, 50, 25)]
                print(f"| {name} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
