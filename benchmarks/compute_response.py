"""Does the quality instrument respond to compute? Baseline quality against AR steps and head steps.

    python benchmarks/compute_response.py --num-samples 5000 --seeds 0,1 --out runs/compute-response \
        --ar-steps 1,2,4,8,16,32 --head-steps 5,10,25,50,100 --docs docs/compute_response

The baseline policy is evaluated (``marcache.evaluation.evaluate``) at every AR step count (head steps at
the model's default) and every head step count (AR steps at the default), each with every seed. Sample
shards go to ``OUT/<setting>-s<seed>/``, so a killed run resumes where it stopped.

The instrument *passes* when

1. the cheapest AR setting and the cheapest head setting are each worse (higher FID) than the default
   setting by more than ``2 x spread``, and
2. within each sweep FID does not rise by more than ``spread`` from one setting to the next costlier one,
   over the whole sweep (beyond the default a plateau passes; a curve that gets worse with more compute
   does not),

where ``spread`` is the seed-to-seed spread: the mean over settings of ``max - min`` FID across the seeds.
Writes ``results.json``, ``table.md`` and ``plot.png`` to ``--docs`` (default: OUT).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from marcache.cli import add_model_args, build_model

METRICS = ("fid", "precision", "recall", "class_accuracy", "inception_score", "images_per_second")


def _ints(text: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    return _ints(text, minimum=0)


def measure(model, ar_steps, head_steps, seeds, num_samples, out, batch_size=100, cache_root=None, progress=True):
    """Evaluate the baseline at every setting and seed; returns ``{"rows": [...], "defaults": {...}}``."""
    from marcache.evaluation.sweep import sweep
    from marcache.policy import load_policy

    defaults = load_policy("baseline").sampler_settings(model)
    default_ar, default_head = int(defaults["num_iter"]), int(defaults["head_steps"])
    plan = [("ar", k, f"ar{k}", f"sampler.num_iter={k}") for k in sorted(set(ar_steps) | {default_ar})]
    # the default head setting is the default AR setting: sampled once, under its AR label
    plan += [("head", h, f"ar{default_ar}" if h == default_head else f"head{h}", f"sampler.head_steps={h}")
             for h in sorted(set(head_steps) | {default_head})]
    settings = list({label: (label, [override]) for _, _, label, override in plan}.values())
    results = sweep(model, settings, seeds, num_samples, out, batch_size, cache_root=cache_root, progress=progress)
    rows = []
    for sweep_name, value, label, _ in plan:
        r = results[label]
        rows.append({"sweep": sweep_name, "value": value, "fid_mean": r["fid"], "fid_range": r["fid_spread"],
                     "per_seed": {seed: {k: (r[f"{k}_per_seed"][i] if f"{k}_per_seed" in r else r.get(k))
                                         for k in METRICS} for i, seed in enumerate(seeds)},
                     "default": value == (default_ar if sweep_name == "ar" else default_head)})
    return {"rows": rows, "defaults": {"ar": default_ar, "head": default_head}, "seeds": list(seeds),
            "num_samples": num_samples}


def verdict(results: dict) -> dict:
    """The pass criterion of the module docstring, with the numbers it was decided on."""
    rows = results["rows"]
    spread = sum(r["fid_range"] for r in rows) / len(rows)
    checks = {}
    for sweep in ("ar", "head"):
        series = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r["value"])
        default = next(r for r in series if r["default"])
        cheapest = series[0]
        rises = [b["fid_mean"] - a["fid_mean"] for a, b in zip(series, series[1:])]
        checks[sweep] = {
            "cheapest": cheapest["value"], "default": default["value"],
            "gap": cheapest["fid_mean"] - default["fid_mean"],
            "cheapest_worse": cheapest["fid_mean"] - default["fid_mean"] > 2 * spread,
            "max_rise": max(rises, default=0.0),
            "monotone": all(rise <= spread for rise in rises),
        }
    passed = all(c["cheapest_worse"] and c["monotone"] for c in checks.values())
    return {"spread": spread, "checks": checks, "passes": passed}


def table(results: dict, decision: dict) -> str:
    seeds = results["seeds"]
    lines = [f"N = {results['num_samples']} per seed, seeds {', '.join(map(str, seeds))}; "
             f"seed spread (mean FID range over settings) {decision['spread']:.2f}", "",
             "| sweep | steps | FID mean | FID per seed | precision | recall | class acc. | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ps = list(r["per_seed"].values())
        mean = lambda k: sum(p[k] for p in ps) / len(ps)  # noqa: E731
        name = {"ar": "AR steps", "head": "head steps"}[r["sweep"]]
        lines.append(f"| {name} | {r['value']}{' (default)' if r['default'] else ''} | {r['fid_mean']:.2f} | "
                     f"{' / '.join(format(p['fid'], '.2f') for p in ps)} | {mean('precision'):.3f} | {mean('recall'):.3f} | "
                     f"{mean('class_accuracy'):.3f} | {mean('images_per_second'):.2f} |")
    lines.append("")
    for sweep, c in decision["checks"].items():
        lines.append(f"- {sweep}: cheapest ({c['cheapest']}) minus default ({c['default']}) = {c['gap']:.2f} FID "
                     f"({'>' if c['cheapest_worse'] else '<='} 2 x spread); largest rise to a costlier setting "
                     f"{c['max_rise']:.2f} ({'within' if c['monotone'] else 'beyond'} the spread)")
    lines.append(f"- **instrument {'passes' if decision['passes'] else 'fails'}**")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, sweep, label in zip(axes, ("ar", "head"), ("AR steps", "head (DDPM) steps")):
        series = sorted((r for r in results["rows"] if r["sweep"] == sweep), key=lambda r: r["value"])
        x = [r["value"] for r in series]
        for seed in results["seeds"]:
            ax.plot(x, [r["per_seed"][seed]["fid"] for r in series], "o", alpha=0.5, label=f"seed {seed}")
        ax.plot(x, [r["fid_mean"] for r in series], "-k", label="mean")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("FID (classifier space)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, docs: Path) -> dict:
    decision = verdict(results)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.json").write_text(json.dumps(dict(results, verdict=decision), indent=1, default=str))
    (docs / "table.md").write_text(table(results, decision))
    plot(results, docs / "plot.png")
    return decision


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)  # --model/--checkpoint/--weights/--vae as in `marcache eval` (default: the shipped mar_mnist)
    p.add_argument("--ar-steps", type=_ints, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--head-steps", type=_ints, default=[5, 10, 25, 50, 100])
    p.add_argument("--seeds", type=_seeds, default=[0, 1])
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/compute-response", help="sample shards (resumable)")
    p.add_argument("--docs", default=None, help="where results.json/table.md/plot.png go (default: --out)")
    args = p.parse_args(argv)
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2")

    import torch


    if args.threads:
        torch.set_num_threads(args.threads)
    _, model = build_model(args)
    results = measure(model, args.ar_steps, args.head_steps, args.seeds, args.num_samples, args.out, args.batch_size)
    decision = write(results, Path(args.docs or args.out))
    print(table(results, decision))
    return 0 if decision["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
