"""Search composed policies on mar_mnist: FID vs FLOPs, the Pareto table, and the turbo choice.

    python benchmarks/search_turbo.py --num-samples 2000 --out docs/composition_search

Every candidate is scored with the same seed and evaluator (``marcache.evaluation.evaluate``) and
priced with the same FLOP counter (``marcache.flops.policy_flops``, FLOPs = 2 x MACs). Results are
appended to ``<out>/results.json`` as they come, so an interrupted search resumes where it stopped.
Outputs: ``results.json``, ``pareto.md`` (all rows, Pareto-optimal ones marked) and ``pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

#: candidate compositions (policy mappings). Parameters are chosen for mar_mnist's 16 steps x 50
#: head steps; GtR's rates give 3 / 1 / 1 steps on its 7x7 grid.
GTR = [{"name": "gtr_order"}, {"name": "gtr_schedule", "params": {"rates": [4.6, 16.0, 128.0]}}]
FTS = [{"name": "fts"}]
LAZY = [{"name": "lazymar_token_cache", "params": {"warmup_steps": 5, "refresh_interval": 9}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 5, "refresh_interval": 9}}]
HEAD = [{"name": "lazymar_head", "params": {"scale_with_head_steps": False}}]
GTR_HALF = [{"name": "gtr_order"}, {"name": "gtr_schedule", "params": {"rates": [4.6, 16.0, 128.0], "head_max": 25, "head_min": 10, "head_rec": 10}}]


def V2(head_max, head_min, detail, disa):
    """turbo v2 family: GtR at 12/3/1 steps on 16x16 (3/1/1 on 7x7) with its head ramp, FTS, LazyMAR's
    feature caches refreshed once after warm-up on 16 steps, and DiSA's annealed cap."""
    return [{"name": "gtr_order"},
            {"name": "gtr_schedule", "params": {"rates": [5.3334, 21.3334, 128.0], "head_max": head_max,
                                                "head_min": head_min, "head_rec": head_min}},
            {"name": "fts", "params": {"beta": 0.10, "detail_steps": detail}},
            {"name": "lazymar_token_cache", "params": {"warmup_steps": 2, "refresh_interval": 7, "cache_dtype": "float16"}},
            {"name": "lazymar_cond_cache", "params": {"warmup_steps": 2, "refresh_interval": 7}},
            {"name": "disa", "params": {"upper_steps": disa[0], "lower_steps": disa[1]}}]


CANDIDATES = {
    "baseline": [],
    "lazymar": LAZY + [{"name": "lazymar_head"}],
    "recap": [{"name": "recap"}],
    "gtr": GTR,
    "gtr_fts": GTR + FTS,
    "gtr_fts+head": GTR + FTS + HEAD,
    "lazymar(2,3)+head": [{"name": "lazymar_token_cache", "params": {"warmup_steps": 2, "refresh_interval": 3}},
                          {"name": "lazymar_cond_cache", "params": {"warmup_steps": 2, "refresh_interval": 3}}] + HEAD,
    "gtr_fts+lazymar(2,2)+head": GTR + FTS + [
        {"name": "lazymar_token_cache", "params": {"warmup_steps": 2, "refresh_interval": 2}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 2, "refresh_interval": 2}}] + HEAD,
    "recap+head": [{"name": "recap"}] + HEAD,
    # GtR's head ramp scaled to mar_mnist's 50-step baseline (the paper's 50->20 is for 100 steps)
    "gtr_fts(head 25->10)": GTR_HALF + [{"name": "fts", "params": {"detail_steps": 25}}],
    "gtr_fts(head 25->10)+lazymar(2,2)": GTR_HALF + [{"name": "fts", "params": {"detail_steps": 25}}] + [
        {"name": "lazymar_token_cache", "params": {"warmup_steps": 2, "refresh_interval": 2}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 2, "refresh_interval": 2}}],
    "turbo v1 (policies/turbo_v1.yaml)": "turbo_v1",
    # issue #18: DiSA, Halton, drift-triggered refresh, and turbo v2 candidates (mar_mnist: 16 x 50)
    "disa 50->5": [{"name": "disa", "params": {"upper_steps": 50, "lower_steps": 5}}],
    "disa 25->5": [{"name": "disa", "params": {"upper_steps": 25, "lower_steps": 5}}],
    "halton": [{"name": "halton_order"}],
    "lazymar feats (5,9)": LAZY,
    "lazymar feats (5,inf)+drift 0.3": [
        {"name": "lazymar_token_cache", "params": {"warmup_steps": 5, "refresh_interval": 1000}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 5, "refresh_interval": 1000}},
        {"name": "drift_refresh", "params": {"threshold": 0.3}}],
    "v2a: gtr 12/3/1 (25->10)+fts 25+lazymar(2,7)+disa 25->5": V2(25, 10, 25, (25, 5)),
    "v2b: gtr 12/3/1 (20->5)+fts 20+lazymar(2,7)+disa 20->4": V2(20, 5, 20, (20, 4)),
    "v2c: gtr 12/3/1 (15->4)+fts 15+lazymar(2,7)+disa 15->3": V2(15, 4, 15, (15, 3)),
    "turbo (policies/turbo.yaml)": "turbo",
    # ReCAP's claim is quality at equal cost: both at several step counts
    "baseline @8 steps": {"sampler": {"num_iter": 8}, "plugins": []},
    "baseline @24 steps": {"sampler": {"num_iter": 24}, "plugins": []},
    "baseline @32 steps": {"sampler": {"num_iter": 32}, "plugins": []},
    "recap @24 steps": {"sampler": {"num_iter": 24}, "plugins": [{"name": "recap"}]},
    "recap @32 steps": {"sampler": {"num_iter": 32}, "plugins": [{"name": "recap"}]},
    "fewer: 8 steps x 25 head": {"sampler": {"num_iter": 8, "head_steps": 25}, "plugins": []},
    "fewer: 5 steps x 20 head": {"sampler": {"num_iter": 5, "head_steps": 20}, "plugins": []},
}


def as_policy(entry):
    from marcache.policy import load_policy, resolve_policy

    if isinstance(entry, str):
        return load_policy(entry)
    raw = entry if isinstance(entry, dict) else {"plugins": entry}
    return resolve_policy(raw, source="search")


def pareto(rows):
    """Rows not dominated in (FLOPs lower, FID lower)."""
    keep = []
    for r in rows:
        dominated = any(o["tflops"] <= r["tflops"] and o["fid"] <= r["fid"] and (o["tflops"] < r["tflops"] or o["fid"] < r["fid"]) for o in rows)
        keep.append(not dominated)
    return keep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="mar_mnist weights (default: the shipped ones)")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="docs/composition_search")
    parser.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    args = parser.parse_args(argv)

    import marcache
    from marcache.evaluation import evaluate
    from marcache.flops import policy_flops
    from marcache.models import meta_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.checkpoint:
        model = marcache.load_mar("mar_mnist", args.checkpoint)
    else:
        from marcache.weights import mnist_path

        model = marcache.load_mar("mar_mnist", mnist_path())
    shapes = meta_model("mar_mnist")
    for name, entry in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        key = f"{name}|n={args.num_samples}|seed={args.seed}"
        if key in results:
            continue
        policy = as_policy(entry)
        flops = policy_flops(shapes, policy, num_images=args.batch_size, batch_size=args.batch_size)["tflops_per_image"]
        start = time.perf_counter()
        metrics = evaluate(model, policy, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size)
        results[key] = {"name": name, "tflops": flops, "executed_tflops": metrics.get("tflops_per_image"),
                        "fid": metrics["fid"], "class_accuracy": metrics["class_accuracy"],
                        "images_per_second": metrics["images_per_second"], "seconds": time.perf_counter() - start,
                        "policy": policy.to_dict()}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name:32s} {flops * 1e3:8.3f} GFLOP/img  FID {metrics['fid']:.3f}  acc {metrics['class_accuracy']:.4f}  "
              f"{metrics['images_per_second']:.2f} img/s", flush=True)

    rows = [r for k, r in results.items() if k.endswith(f"|n={args.num_samples}|seed={args.seed}")]
    base = next((r for r in rows if r["name"] == "baseline"), None)
    flags = pareto(rows)
    lines = ["| policy | GFLOP/image | FLOPs ratio | FID | ΔFID vs baseline | class acc. | images/s | speed ratio | Pareto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r, best in sorted(zip(rows, flags), key=lambda x: x[0]["tflops"]):
        ratio = base["tflops"] / r["tflops"] if base else float("nan")
        dfid = (r["fid"] / base["fid"] - 1) * 100 if base else float("nan")
        speed = r["images_per_second"] / base["images_per_second"] if base else float("nan")
        lines.append(f"| {r['name']} | {r['tflops'] * 1e3:.3f} | {ratio:.2f}x | {r['fid']:.3f} | {dfid:+.1f}% | "
                     f"{r['class_accuracy']:.4f} | {r['images_per_second']:.2f} | {speed:.2f}x | {'yes' if best else ''} |")
    (out / "pareto.md").write_text(f"N = {args.num_samples} samples, seed {args.seed}, batch {args.batch_size}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, best in zip(rows, flags):
        ax.scatter(r["tflops"] * 1e3, r["fid"], color="tab:red" if best else "tab:blue")
        ax.annotate(r["name"], (r["tflops"] * 1e3, r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GFLOP per image (2 x MAC)")
    ax.set_ylabel(f"FID (classifier features, N={args.num_samples})")
    ax.set_title("mar_mnist: composed policies (red = Pareto-optimal)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
