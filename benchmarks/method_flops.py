"""FLOP tables of issue #18's plugins on MAR-B/L/H (64 AR steps, cfg 3.0, 100 head steps), as in
docs/methods/disa.md, halton_order.md, drift_refresh.md and docs/composition.md.

    .venv/bin/python benchmarks/method_flops.py [--models mar_base mar_large mar_huge] [--disa-ar-steps]

Shape-only (``marcache.flops.policy_flops`` on meta-device models, the same counter as
``marcache flops``; FLOPs = 2 x MACs). Drift-triggered refresh never triggers without feature values:
its rows are lower bounds.
"""

from __future__ import annotations

import argparse

from marcache.flops import policy_flops
from marcache.models import meta_model
from marcache.policy import load_policy, resolve_policy

LAZY = {"warmup_steps": 5, "refresh_interval": 9}
ROWS = {
    "disa (linear 50->5, policies/disa.yaml)": "disa",
    "disa cosine 50->5": [{"name": "disa", "params": {"strategy": "cosine"}}],
    "disa two-stage 50->5": [{"name": "disa", "params": {"strategy": "two-stage"}}],
    "lazymar token+cond caches (5, 9)": [{"name": "lazymar_token_cache", "params": LAZY},
                                         {"name": "lazymar_cond_cache", "params": LAZY}],
    "lazymar caches (5, inf) + drift_refresh (lower bound)": [
        {"name": "lazymar_token_cache", "params": {"warmup_steps": 5, "refresh_interval": 1000}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 5, "refresh_interval": 1000}},
        {"name": "drift_refresh"}],
    "turbo (v4: 12/3/1, head 25->10, FTS 25, LazyMAR f32 (1, refreshed at stage jumps))": "turbo",
    "turbo_v3 (12/3/1, head 15->5, FTS 15, LazyMAR f32 (1, 7), DiSA 15->5)": "turbo_v3",
    "turbo_v2 (12/3/1, head 15->4, FTS 15, LazyMAR (2, 7), DiSA 15->3)": "turbo_v2",
    "turbo v2b candidate (head 20->5, FTS 20, DiSA 20->4)": [
        {"name": "gtr_order"},
        {"name": "gtr_schedule", "params": {"rates": [5.3334, 21.3334, 128.0], "head_max": 20, "head_min": 5, "head_rec": 5}},
        {"name": "fts", "params": {"beta": 0.10, "detail_steps": 20}},
        {"name": "lazymar_token_cache", "params": {"warmup_steps": 2, "refresh_interval": 7, "cache_dtype": "float16"}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 2, "refresh_interval": 7}},
        {"name": "disa", "params": {"upper_steps": 20, "lower_steps": 4}}],
}


def tflops(model, entry, num_iter: int = 64, cfg: float = 3.0) -> float:
    """TFLOPs per image of a shipped policy name or a plugin list, at ``num_iter`` AR steps."""
    overrides = [f"sampler.num_iter={num_iter}", f"sampler.cfg={cfg}"]
    policy = load_policy(entry, overrides) if isinstance(entry, str) else resolve_policy({"plugins": entry}, overrides=overrides)
    return policy_flops(model, policy, num_images=1)["tflops_per_image"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mar_base", "mar_large", "mar_huge"])
    ap.add_argument("--disa-ar-steps", action="store_true", help="also DiSA 50->5 at fewer AR steps on MAR-H")
    args = ap.parse_args()
    models = {name: meta_model(name) for name in args.models}
    base = {name: tflops(m, []) for name, m in models.items()}
    print("| policy | " + " | ".join(f"{n} TFLOPs (ratio)" for n in models) + " |")
    print("|---|" + "---|" * len(models))
    print("| baseline (64 x 100) | " + " | ".join(f"{base[n]:.2f} (1.00x)" for n in models) + " |")
    for label, entry in ROWS.items():
        cells = []
        for name, m in models.items():
            t = tflops(m, entry)
            cells.append(f"{t:.2f} ({base[name] / t:.2f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    if args.disa_ar_steps:
        huge = meta_model("mar_huge")
        print("\n| AR steps | baseline (100 head steps) | DiSA 50->5 | ratio vs 64-step baseline |")
        print("|---|---|---|---|")
        ref = tflops(huge, [])
        for n in (64, 32, 24, 16, 8):
            plain, disa = tflops(huge, [], n), tflops(huge, "disa", n)
            print(f"| {n} | {plain:.2f} | {disa:.2f} | {ref / disa:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
