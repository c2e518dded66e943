"""FLOP tables of the methods as released (docs/methods/*.md, docs/composition.md).

    .venv/bin/python benchmarks/methods_as_released.py [--only recap gtr lazymar]

* ReCAP: every released MAR-L/H configuration (liebenxj/ReCAP run_mar_recap.sh), the tokens its
  Local-FEs decode, and the matched-quality reading (ReCAP at T steps vs the baseline at 2T).
* GtR: the paper's literal rates (``gtr_paper``) vs the calibrated ones (``gtr``), and marcache's
  rows for the paper's ablation.
* LazyMAR: the default and release-exact policies, plus the stem work the released code runs and
  discards on lazy steps (z_proj on the unconditional half, decoder_embed on both halves and every
  visible token), counted from the schedule with the same per-shape costs.

Shape-only (meta-device models, the real scheduler and plans): no checkpoint needed.
"""

from __future__ import annotations

import argparse

from marcache.flops import cost_model_for, policy_flops
from marcache.models import meta_model
from marcache.plugins.cosine_schedule import cosine_tokens_per_step
from marcache.plugins.lazymar import is_full_step
from marcache.plugins.recap import ReCAPConfig, local_token_count
from marcache.policy import load_policy, resolve_policy

RECAP_RELEASED = {"mar_large": (3.0, [96, 84, 56, 36]), "mar_huge": (3.2, [128, 96, 48])}
LAZYMAR_PUBLISHED = {"mar_base": (15.49, 5.54), "mar_large": (35.05, 12.52), "mar_huge": (69.06, 24.38)}
LAZYMAR_CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}


def tflops(model, policy, overrides: list[str]) -> float:
    """``policy``: a shipped policy name or a raw policy dict."""
    resolved = resolve_policy(policy, overrides=overrides) if isinstance(policy, dict) else load_policy(policy, overrides)
    return policy_flops(model, resolved)["tflops_per_image"]


def recap_table() -> None:
    print("| model | T / warm-up / k | cfg | Local-FE tokens (of 256) | baseline@T | ReCAP@T | ratio | baseline@2T | "
          "baseline@2T / ReCAP@T |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (cfg, steps) in RECAP_RELEASED.items():
        model = meta_model(name)
        for t in steps:
            common = [f"sampler.cfg={cfg}"]
            base = tflops(model, "baseline", common + [f"sampler.num_iter={t}"])
            recap = tflops(model, "recap", common + [f"sampler.num_iter={t}"])
            base2 = tflops(model, "baseline", common + [f"sampler.num_iter={2 * t}"])
            local = local_token_count(cosine_tokens_per_step(model.seq_len, t), ReCAPConfig())
            print(f"| {name} | {t}/{t // 2}/1 | {cfg} | {local} ({local / model.seq_len:.0%}) | {base:.2f} | {recap:.2f} "
                  f"| {base / recap:.2f}× | {base2:.2f} | **{base2 / recap:.2f}×** |", flush=True)


def gtr_table() -> None:
    model = meta_model("mar_huge")
    common = ["sampler.num_iter=64", "sampler.cfg=3.0"]
    base = tflops(model, "baseline", common)
    rows = [
        ("`gtr_order` alone (cosine, 64 steps)", {"plugins": [{"name": "gtr_order"}]}, common),
        ("`gtr_paper` without the head schedule (24/6/2 steps, 100 head steps)", "gtr_paper", common + ["gtr_schedule.head_schedule=false"]),
        ("`gtr` without the head schedule (14/4/1 steps, 100 head steps)", "gtr", common + ["gtr_schedule.head_schedule=false"]),
        ("`gtr_paper` (24/6/2, head 50→20, rec. 20)", "gtr_paper", common),
        ("`gtr` (14/4/1, head 50→20, rec. 20)", "gtr", common),
        ("`gtr_fts_paper`", "gtr_fts_paper", common),
        ("`gtr_fts`", "gtr_fts", common),
    ]
    print(f"mar_huge, baseline 64 x 100 head steps, cfg 3.0: {base:.2f} T\n")
    print("| policy | TFLOPs | ratio |")
    print("|---|---|---|")
    for label, policy, over in rows:
        value = tflops(model, policy, over)
        print(f"| {label} | {value:.2f} | {base / value:.2f}× |", flush=True)


def release_stem_extra(model, cfg_policy, num_iter: int = 64) -> float:
    """TFLOPs per image the released lazy steps spend on stem work marcache does not run."""
    costs = cost_model_for(model)
    z_proj = sum(costs.encoder_stem().values())
    warm, refresh = cfg_policy.warmup_steps, cfg_policy.refresh_interval
    counts, extra, known, prev = cosine_tokens_per_step(model.seq_len, num_iter), 0, 0, 0
    buf = model.buffer_size
    for s, n in enumerate(counts):
        if not is_full_step(s, warm, refresh):
            extra += z_proj  # the unconditional half's z_proj (marcache: conditional rows only)
            released = 2 * sum(costs.decoder_stem(buf + known).values())  # both halves, every visible token
            ours = sum(costs.decoder_stem(buf + prev).values())  # conditional rows, buffer + new tokens
            extra += released - ours
        known, prev = known + n, n
    return extra / 1e12


def lazymar_table() -> None:
    print("| model | baseline | `lazymar` | ratio | `lazymar_release` | ratio | + discarded stem work | ratio | published |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (pub_base, pub_lazy) in LAZYMAR_PUBLISHED.items():
        model = meta_model(name)
        common = ["sampler.num_iter=64", f"sampler.cfg={LAZYMAR_CFG[name]}"]
        base = tflops(model, "baseline", common)
        default = tflops(model, "lazymar", common)
        release_policy = load_policy("lazymar_release", common)
        release = policy_flops(model, release_policy)["tflops_per_image"]
        token_cfg = next(c for cls, c in release_policy.plugin_configs if cls.name == "lazymar_token_cache")
        counted = release + release_stem_extra(model, token_cfg)
        print(f"| {name} | {base:.2f} | {default:.2f} | {base / default:.2f}× | {release:.2f} | {base / release:.2f}× "
              f"| {counted:.2f} | {base / counted:.2f}× | {pub_base:.2f} → {pub_lazy:.2f} = {pub_base / pub_lazy:.2f}× "
              f"(+{pub_base / base - 1:.1%} / +{pub_lazy / counted - 1:.1%} over ours) |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=["recap", "gtr", "lazymar"], default=["recap", "gtr", "lazymar"])
    args = ap.parse_args()
    for part in args.only:
        print(f"\n## {part}\n")
        {"recap": recap_table, "gtr": gtr_table, "lazymar": lazymar_table}[part]()


if __name__ == "__main__":
    main()
