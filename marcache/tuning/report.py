"""Outputs of ``marcache tune``: the Pareto front (table + plot), the chosen policy YAML, the final FID check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..strict_json import json_safe


def rows_of(study) -> list[dict]:
    """One row per measured trial (complete, first of any repeated point)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "same_as" in t.user_attrs:
            continue
        rows.append({"trial": t.number, "cost": t.values[0], "quality_drop": t.values[1], **t.user_attrs})
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (cost ratio higher, quality drop lower), sorted by cost ratio."""
    def dominates(a, b):
        return (a["cost"] >= b["cost"] and a["quality_drop"] <= b["quality_drop"]
                and (a["cost"] > b["cost"] or a["quality_drop"] < b["quality_drop"]))

    front = [r for r in rows if not any(dominates(o, r) for o in rows)]
    return sorted(front, key=lambda r: r["cost"])


def choose(rows: list[dict], budget) -> Optional[dict]:
    """The budget's point: least quality drop at the cost target, or most cost ratio under the drop ceiling."""
    feasible = [r for r in rows if (r.get("violation") or 0.0) <= 0]
    if not feasible:
        return None
    if budget.max_quality_drop is not None:
        return max(feasible, key=lambda r: (r["cost"], -r["quality_drop"]))
    return min(feasible, key=lambda r: (r["quality_drop"], -r["cost"]))


def closest(study, budget) -> Optional[dict]:
    """The trial that misses the budget by the least (FLOPs-pruned trials count: their ratio is exact)."""
    scored = [(budget.violation(t.user_attrs), t) for t in study.trials]
    scored = [(v, t) for v, t in scored if v is not None]
    if not scored:
        return None
    v, t = min(scored, key=lambda x: x[0])
    return {"trial": t.number, "violation": v, **t.user_attrs}


def label(raw: dict) -> str:
    """``num_iter=8 head_steps=25; gtr_order + fts(beta=0.1)`` from a sampled policy mapping (tuned values only)."""
    head = " ".join(f"{k}={_short(v)}" for k, v in raw.get("sampler", {}).items())
    parts = []
    for p in raw.get("plugins", []):
        params = ", ".join(f"{k}={_short(v)}" for k, v in p.get("params", {}).items())
        parts.append(p["name"] + (f"({params})" if params else ""))
    return (head + "; " if head else "") + (" + ".join(parts) or "no plugin")  # no "|": a Markdown cell


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def front_table(front: list[dict], chosen: Optional[dict], settings: dict, rows: Optional[list] = None) -> str:
    """The front, plus any measured reference point (a ``reference`` user attribute, e.g. an enqueued
    shipped policy) marked ``off the front`` when dominated."""
    on_front = {r["trial"] for r in front}
    refs = [r for r in rows or [] if r.get("reference") and r["trial"] not in on_front]
    cost = "FLOPs ratio" if settings["cost"] == "flops" else "speedup (measured)"
    lines = [f"| trial | policy (sampler and plugins) | {cost} | GFLOP/image | quality drop ({settings['quality']}) ± s.e. | "
             f"PSNR mean | SSIM mean | images/s | |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(front + refs, key=lambda r: r["cost"]):
        mark = ", ".join(x for x in ("chosen" if chosen is not None and r["trial"] == chosen["trial"] else "",
                                     r.get("reference", ""), "off the front" if r["trial"] not in on_front else "") if x)
        lines.append(f"| {r['trial']} | {r['label'].replace(' | ', '; ')} | {r['cost']:.2f}x | "
                     f"{r['tflops_per_image'] * 1e3:.3f} | {r['quality_drop']:.4f} ± {r.get('quality_drop_se', float('nan')):.4f} | {r['psnr_mean']:.2f} | "
                     f"{r['ssim_mean']:.3f} | {r['images_per_second']:.2f} | {mark} |")
    return "\n".join(lines)


def plot_front(rows: list[dict], front: list[dict], chosen: Optional[dict], settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["cost"] for r in rows], [r["quality_drop"] for r in rows], color="tab:gray", s=14, label="trials")
    ax.plot([r["cost"] for r in front], [r["quality_drop"] for r in front], "o-", color="tab:red", label="Pareto front")
    if chosen is not None:
        ax.scatter([chosen["cost"]], [chosen["quality_drop"]], marker="*", s=220, color="gold", edgecolor="k", zorder=5, label="chosen")
    ax.scatter([1.0], [0.0], marker="s", color="k", label="baseline")
    ax.set_xlabel("FLOPs ratio (baseline / policy)" if settings["cost"] == "flops" else "measured speedup (images/s ratio)")
    ax.set_ylabel(f"quality drop: {settings['quality']} (lower is better)")
    ax.set_title(f"marcache tune: {settings['model']}, {len(rows)} measured trials, N={settings['calibration_samples']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def policy_yaml(chosen: dict, settings: dict, budget, final: Optional[dict], n_trials: int) -> str:
    """The chosen policy as YAML that ``marcache generate --policy`` accepts, measured numbers on top."""
    from ..policy import resolve_policy

    raw = dict(chosen["policy"], name="tuned", description=f"marcache tune trial {chosen['trial']} ({budget.describe()})")
    body = resolve_policy(raw, source="tuned").to_yaml()
    head = [f"# marcache tune: {settings['model']}, {budget.describe()}, trial {chosen['trial']} of {n_trials} finished",
            f"# calibration: {settings['calibration_samples']} samples, seed {settings['seed']} (labels i % classes), "
            f"quality = {settings['quality']}",
            f"# FLOPs ratio {chosen['flops_ratio']:.3f}x ({chosen['tflops_per_image'] * 1e3:.3f} GFLOP/image, shape-only counter)",
            f"# quality drop {chosen['quality_drop']:.4f}; PSNR mean {chosen['psnr_mean']:.2f} dB, SSIM mean {chosen['ssim_mean']:.4f}"
            + (f", feature distance {chosen['feature_distance_mean']:.4f}" if chosen.get("feature_distance_mean") is not None else ""),
            f"# measured {chosen['images_per_second']:.2f} images/s, speedup {chosen['speedup']:.2f}x vs the baseline "
            f"({settings['device']}, batch {settings['batch_size']})"]
    if final:
        head.append(f"# final check on held-out seeds (seed {final['seed']}, N={final['num_samples']}): FID {final['fid']:.3f} "
                    f"vs baseline {final['baseline_fid']:.3f}; class accuracy {final.get('class_accuracy')}")
    return "\n".join(head) + "\n" + body


def final_check(model, chosen: dict, num_samples: int, seed: int, batch_size: int, out: Path, vae=None,
                reference_stats=None, baseline_set=()) -> dict:
    """FID of the chosen point and of the baseline on held-out seeds (resumable shards under ``out/final``)."""
    from ..evaluation import evaluate
    from ..policy import load_policy, resolve_policy

    results = {}
    for name, policy in (("chosen", resolve_policy(chosen["policy"], source="tuned")), ("baseline", load_policy("baseline", list(baseline_set)))):
        results[name] = evaluate(model, policy, num_samples=num_samples, seed=seed, batch_size=batch_size,
                                 out_dir=str(out / "final" / f"{name}-seed{seed}-n{num_samples}"), vae=vae,
                                 reference_stats=reference_stats)
    chosen_r, base_r = results["chosen"], results["baseline"]
    return {"seed": seed, "num_samples": num_samples, "fid": chosen_r["fid"], "baseline_fid": base_r["fid"],
            "class_accuracy": chosen_r.get("class_accuracy"), "baseline_class_accuracy": base_r.get("class_accuracy"),
            "images_per_second": chosen_r["images_per_second"], "baseline_images_per_second": base_r["images_per_second"]}


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(json_safe(data), indent=1))
