"""Search composed policies on mar_mnist: FID with its seed spread, fidelity to the baseline, FLOPs.

    python benchmarks/search_turbo.py --num-samples 1000 --seeds 0,1 --out docs/composition_search

Every candidate is scored on every seed with the same evaluator (``marcache.evaluation.evaluate``) and
priced with the same FLOP counter (``marcache.flops.policy_flops``, FLOPs = 2 x MACs). FID is the mean
over seeds with its spread (max - min); a candidate whose FID differs from the baseline's by no more
than the larger of the two spreads is a **tie** (``marcache.evaluation.spread.judge``). Every candidate
is also compared image by image with the baseline's sample of the same seed and label (PSNR / SSIM /
classifier-feature distance, ``fidelity.compare_images``); that comparison judges only the candidates
that keep the baseline's order and step count (column "same order"): for the others it measures a
different sample, not an approximation of the baseline's.

Results are keyed by the weights' fingerprint and appended to ``<out>/results.json`` as they come;
samples are kept as shards under ``--work``, so an interrupted search resumes where it stopped.
Outputs: ``results.json``, ``pareto.md`` (the rows of the current weights, Pareto-optimal ones
marked) and ``pareto.png``. Wall-clock is not measured here (use ``marcache bench``, interleaved).
At N = 1000 the seed spread (~1.5 FID on mar_mnist) hides differences of about 1 FID: rerun the short
list with ``--num-samples 5000`` (and its own ``--out``/``--work``) before choosing a policy.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

#: samples per shard file under --work
SHARD_SIZE = 500

#: candidate compositions: a plugin list, a policy mapping, a shipped policy's name, or (name, sampler
#: settings to change) (``as_policy``). Parameters are chosen for mar_mnist's 16 steps x 50 head steps;
#: GtR's rates give 3 / 1 / 1 steps on its 7x7 grid.
GTR = [{"name": "gtr_order"}, {"name": "gtr_schedule", "params": {"rates": [4.6, 16.0, 128.0]}}]
FTS = [{"name": "fts"}]
LAZY = [{"name": "lazymar_token_cache", "params": {"warmup_steps": 5, "refresh_interval": 9}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 5, "refresh_interval": 9}}]
HEAD = [{"name": "lazymar_head", "params": {"scale_with_head_steps": False}}]
GTR_HALF = [{"name": "gtr_order"}, {"name": "gtr_schedule", "params": {"rates": [4.6, 16.0, 128.0], "head_max": 25, "head_min": 10, "head_rec": 10}}]


def V2(head_max, head_min, detail, disa, cache_dtype="float16", warmup=2, refresh=7, rates=(5.3334, 21.3334, 128.0),
       caches=("token", "cond"), jump=None):
    """turbo v2-v4 and the search rows v2-v7: GtR (default rates: 12/3/1 steps on 16x16, 3/1/1 on 7x7) with its head ramp, FTS,
    LazyMAR's feature caches (``warmup`` steps, refreshed every ``refresh``, stored as ``cache_dtype``), and
    DiSA's annealed cap (``disa=None``: no DiSA; ``caches``: which LazyMAR caches; ``jump``: their
    ``jump_refresh``)."""
    plugins = [{"name": "gtr_order"},
               {"name": "gtr_schedule", "params": {"rates": list(rates), "head_max": head_max,
                                                   "head_min": head_min, "head_rec": head_min}},
               {"name": "fts", "params": {"beta": 0.10, "detail_steps": detail}}]
    schedule = {"warmup_steps": warmup, "refresh_interval": refresh, "jump_refresh": jump}
    if "token" in caches:
        plugins.append({"name": "lazymar_token_cache", "params": {**schedule, "cache_dtype": cache_dtype}})
    if "cond" in caches:
        plugins.append({"name": "lazymar_cond_cache", "params": schedule})
    if disa:
        plugins.append({"name": "disa", "params": {"upper_steps": disa[0], "lower_steps": disa[1]}})
    return plugins


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
    "halton (roll)": [{"name": "halton_order", "params": {"roll": True}}],
    "lazymar feats (5,9)": LAZY,
    "lazymar feats (5,inf)+drift 0.3": [
        {"name": "lazymar_token_cache", "params": {"warmup_steps": 5, "refresh_interval": 1000}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 5, "refresh_interval": 1000}},
        {"name": "drift_refresh", "params": {"threshold": 0.3}}],
    "v2a: gtr 12/3/1 (25->10)+fts 25+lazymar(2,7)+disa 25->5": V2(25, 10, 25, (25, 5)),
    "v2b: gtr 12/3/1 (20->5)+fts 20+lazymar(2,7)+disa 20->4": V2(20, 5, 20, (20, 4)),
    "v2c: gtr 12/3/1 (15->4)+fts 15+lazymar(2,7)+disa 15->3": V2(15, 4, 15, (15, 3)),
    "v2d: gtr 12/3/1 (10->3)+fts 10+lazymar(2,7)+disa 10->2": V2(10, 3, 10, (10, 2)),
    "turbo v2 (policies/turbo_v2.yaml)": "turbo_v2",
    # v3 family (run-3 weights and later): a float32 feature cache (faster on CPU, exact) and higher head floors
    "v3a: v2c with a float32 cache": V2(15, 4, 15, (15, 3), "float32"),
    "v3b: gtr (15->5)+fts 15+lazymar(2,7) f32+disa 15->5": V2(15, 5, 15, (15, 5), "float32"),
    "v3c: gtr (20->6)+fts 20+lazymar(2,7) f32+disa 20->6": V2(20, 6, 20, (20, 6), "float32"),
    "v3d: gtr (25->8)+fts 25+lazymar(2,7) f32+disa 25->8": V2(25, 8, 25, (25, 8), "float32"),
    "v3f: gtr (15->6)+fts 15+lazymar(1,7) f32+disa 15->6": V2(15, 6, 15, (15, 6), "float32", warmup=1),
    "turbo v3 (policies/turbo_v3.yaml)": "turbo_v3",  # V2(15, 5, 15, (15, 5), "float32", warmup=1), v3e in docs
    # v4 family (run-4 weights): head floors of 8-10 (5 head steps cost ~12 FID on the run-4 model,
    # docs/compute_response), paid for by a longer cache refresh (9) or fewer GtR steps; all >= 10x on MAR-H
    "v4a: gtr (12->8)+fts 15+lazymar(1,9) f32": V2(12, 8, 15, None, "float32", warmup=1, refresh=9),
    "v4b: gtr 10/2/1 (10->10)+fts 15+lazymar(1,9) f32": V2(10, 10, 15, None, "float32", warmup=1, refresh=9,
                                                           rates=(6.4, 32.0, 128.0)),
    "v4c: gtr (15->8)+fts 15+lazymar(1,9) f32": V2(15, 8, 15, None, "float32", warmup=1, refresh=9),
    # which part costs the quality: v4a without the caches, and with turbo v1's cache schedule
    "v4a without caches: gtr (12->8)+fts 15": V2(12, 8, 15, None, caches=()),
    "v4d: gtr (12->8)+fts 15+lazymar(2,3) f32": V2(12, 8, 15, None, "float32", warmup=2, refresh=3),
    "v4a token cache only": V2(12, 8, 15, None, "float32", warmup=1, refresh=9, caches=("token",)),
    "v4a condition cache only": V2(12, 8, 15, None, "float32", warmup=1, refresh=9, caches=("cond",)),
    # v5: the caches refreshed at GtR's stage jumps (jump_refresh 1.5) instead of every 9 steps
    "v5a: gtr (12->8)+fts 15+lazymar(1,inf,jump 1.5) f32": V2(12, 8, 15, None, "float32", warmup=1, refresh=100, jump=1.5),
    "v5b: gtr 10/2/1 (10->8)+fts 15+lazymar(1,inf,jump 1.5) f32": V2(10, 8, 15, None, "float32", warmup=1, refresh=100,
                                                                     jump=1.5, rates=(6.4, 32.0, 128.0)),
    "v5c: gtr (12->7)+fts 15+lazymar(1,inf,jump 1.5) f32": V2(12, 7, 15, None, "float32", warmup=1, refresh=100, jump=1.5),
    "v5d: gtr (10->7)+fts 15+lazymar(1,inf,jump 1.5) f32": V2(10, 7, 15, None, "float32", warmup=1, refresh=100, jump=1.5),
    "v5e: gtr (10->8)+fts 10+lazymar(1,inf,jump 1.5) f32": V2(10, 8, 10, None, "float32", warmup=1, refresh=100, jump=1.5),
    # v6 (run-6 weights): GtR 10/2/1 with a head floor of 10 is the cheapest head budget >= 10x on MAR-H (10.13x)
    "v6a: gtr 10/2/1 (15->10)+fts 15+lazymar(1,inf,jump 1.5) f32": V2(15, 10, 15, None, "float32", warmup=1, refresh=100,
                                                                      jump=1.5, rates=(6.4, 32.0, 128.0)),
    # v7 (run-6 weights, N = 5000): the v5 family loses FID there; GtR's half-paper head ramp (25 -> 10) with
    # v5a's stage-jump caches. v7a = V2(25, 10, 25, None, "float32", warmup=1, refresh=100, jump=1.5) is turbo v4.
    "turbo (policies/turbo.yaml)": "turbo",
    "v7b: gtr (20->8)+fts 20+lazymar(1,inf,jump 1.5) f32": V2(20, 8, 20, None, "float32", warmup=1, refresh=100, jump=1.5),
    # can a higher temperature give back the recall GtR's order costs? (mar_mnist's default is 0.9)
    "turbo @ temperature 1.0": ("turbo", {"temperature": 1.0}),
    # ReCAP's claim is quality at equal cost: both at several step counts
    "baseline @8 steps": {"sampler": {"num_iter": 8}, "plugins": []},
    "baseline @24 steps": {"sampler": {"num_iter": 24}, "plugins": []},
    "baseline @32 steps": {"sampler": {"num_iter": 32}, "plugins": []},
    "recap @24 steps": {"sampler": {"num_iter": 24}, "plugins": [{"name": "recap"}]},
    "recap @32 steps": {"sampler": {"num_iter": 32}, "plugins": [{"name": "recap"}]},
    "fewer: 8 steps x 25 head": {"sampler": {"num_iter": 8, "head_steps": 25}, "plugins": []},
    "fewer: 5 steps x 20 head": {"sampler": {"num_iter": 5, "head_steps": 20}, "plugins": []},
}


def _add_shipped_policies() -> None:
    """Every policy shipped in policies/ is a candidate (its fidelity to the baseline is reported); one that
    fixes its own AR step count (DiSA's release: 64) runs at the model's (mar_mnist has 49 tokens)."""
    from marcache.policy import list_shipped_policies, load_policy

    named = {v for v in CANDIDATES.values() if isinstance(v, str)}
    for name in list_shipped_policies():
        if name in named | {"baseline"}:
            continue
        steps = load_policy(name).config.sampler.num_iter
        if steps is None:
            CANDIDATES[f"shipped: {name}"] = name
        else:
            CANDIDATES[f"shipped: {name} (its {steps} AR steps -> the model's)"] = (name, {"num_iter": None})


_add_shipped_policies()


def as_policy(entry):
    from marcache.policy import load_policy, resolve_policy

    if isinstance(entry, str):
        return load_policy(entry)
    if isinstance(entry, tuple):  # (shipped policy, sampler settings to change)
        name, sampler = entry
        raw = load_policy(name).to_dict()
        raw["sampler"].update(sampler)
        return resolve_policy(raw, source="search")
    raw = entry if isinstance(entry, dict) else {"plugins": entry}
    return resolve_policy(raw, source="search")


def pareto(rows):
    """Rows not dominated in (FLOPs lower, FID lower)."""
    keep = []
    for r in rows:
        dominated = any(o["tflops"] <= r["tflops"] and o["fid"] <= r["fid"] and (o["tflops"] < r["tflops"] or o["fid"] < r["fid"]) for o in rows)
        keep.append(not dominated)
    return keep


def keeps_baseline_order(policy, baseline) -> bool:
    """Image-by-image fidelity is meaningful when the same tokens are predicted at the same steps."""
    reorders = any("order" in cls.families for cls, _ in policy.plugin_configs)
    return not reorders and policy.config.sampler.num_iter == baseline.config.sampler.num_iter


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80]


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="mar_mnist weights (default: the shipped ones)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1", help="two or more seeds (FID mean and spread); one seed only "
                        "samples and scores it (e.g. one process per seed and core; then rerun with all seeds)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", default="docs/composition_search")
    parser.add_argument("--work", default="runs/composition_search", help="sample shards (resumable)")
    parser.add_argument("--cache-root", help="cache of the reference statistics (as in `marcache eval`)")
    parser.add_argument("--only", nargs="*", help="candidate names to run besides the baseline, in this order (default: "
                        "all; `--only` with no names: none, only the table of what was scored)")
    args = parser.parse_args(argv)

    import torch

    import marcache
    from marcache.evaluation import evaluate, sharded
    from marcache.evaluation.fidelity import compare_images
    from marcache.evaluation.runner import model_fingerprint
    from marcache.evaluation.spread import combine_seeds, compare, parse_seeds
    from marcache.flops import policy_flops
    from marcache.models import meta_model

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = parse_seeds(args.seeds, "--seeds")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.checkpoint:
        model = marcache.load_mar("mar_mnist", args.checkpoint)
    else:
        from marcache.weights import mnist_path

        model = marcache.load_mar("mar_mnist", mnist_path())
    weights = model_fingerprint(model)
    shapes = meta_model("mar_mnist")
    baseline = as_policy(CANDIDATES["baseline"])
    unknown = sorted(set(args.only or ()) - set(CANDIDATES))
    if unknown:
        parser.error(f"--only: unknown candidate(s) {unknown}")
    names = ["baseline"] + [n for n in (CANDIDATES if args.only is None else args.only) if n != "baseline"]  # in the order given
    for name in names:
        policy = as_policy(CANDIDATES[name])
        for seed in seeds:
            key = f"{name}|n={args.num_samples}|seed={seed}|weights={weights}"
            if key in results:
                continue
            folder = work / weights / slug(name) / f"seed-{seed}"
            metrics = evaluate(model, policy, num_samples=args.num_samples, seed=seed, batch_size=args.batch_size,
                               out_dir=str(folder), shard_size=SHARD_SIZE, cache_root=args.cache_root)
            row = {k: metrics.get(k) for k in ("fid", "precision", "recall", "class_accuracy")}
            row.update(name=name, seed=seed, weights=weights, num_samples=args.num_samples,
                       tflops=policy_flops(shapes, policy, num_images=args.batch_size,
                                           batch_size=args.batch_size)["tflops_per_image"],
                       executed_tflops=metrics.get("tflops_per_image"), policy=policy.to_dict())
            if name != "baseline":
                base_folder = work / weights / "baseline" / f"seed-{seed}"
                mine = sharded.collect(folder, args.num_samples, SHARD_SIZE)["images"]
                ref = sharded.collect(base_folder, args.num_samples, SHARD_SIZE)["images"]
                row["fidelity"] = compare_images(mine, ref)
            # re-read before writing: a search of another seed may share the file
            results = {**(json.loads(results_path.read_text()) if results_path.exists() else {}), key: row}
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{name:40s} seed {seed}  {row['tflops'] * 1e3:7.3f} GFLOP/img  FID {row['fid']:.3f}  "
                  f"acc {row['class_accuracy']:.4f}", flush=True)

    if len(seeds) < 2:
        print("one seed: samples scored; rerun with all seeds for the table (it needs the seed spread)")
        return 0
    rows = []
    for name in CANDIDATES:
        per_seed = [results.get(f"{name}|n={args.num_samples}|seed={s}|weights={weights}") for s in seeds]
        if any(r is None for r in per_seed):
            continue
        row = combine_seeds(per_seed)
        row.update(name=name, tflops=per_seed[0]["tflops"],
                   same_order=name == "baseline" or keeps_baseline_order(as_policy(CANDIDATES[name]), baseline))
        if all("fidelity" in r for r in per_seed):
            row["psnr"], row["ssim"], row["feature_distance"] = (
                sum(r["fidelity"][m]["mean"] for r in per_seed) / len(per_seed)
                for m in ("psnr", "ssim", "feature_cosine_distance"))
        rows.append(row)
    base = next(r for r in rows if r["name"] == "baseline")
    flags = pareto(rows)
    lines = ["| policy | GFLOP/image | FLOPs ratio | FID (mean) | FID per seed | vs baseline | precision | recall "
             "| class acc. | same order | PSNR | SSIM | feature dist. | Pareto |", "|" + "---|" * 14]
    for r, best in sorted(zip(rows, flags), key=lambda x: x[0]["tflops"]):
        verdict = "" if r is base else compare(r, base, "fid")["verdict"]
        # FID can tie while diversity drops (GtR's order trades recall for precision): recall is judged too
        recall = f"{r['recall']:.3f}" + ("" if r is base else " " + compare(r, base, "recall")["verdict"])
        lines.append(
            f"| {r['name']} | {r['tflops'] * 1e3:.3f} | {base['tflops'] / r['tflops']:.2f}x | {r['fid']:.2f} | "
            f"{' / '.join(f'{v:.2f}' for v in r['fid_per_seed'])} | {verdict} | {r['precision']:.3f} | "
            f"{recall} | {r['class_accuracy']:.4f} | {'yes' if r['same_order'] else 'no'} | {fmt(r.get('psnr'), '.2f')} | "
            f"{fmt(r.get('ssim'), '.3f')} | {fmt(r.get('feature_distance'), '.4f')} | {'yes' if best else ''} |")
    sampling = ", ".join(f"{k} {v}" for k, v in model.sampling_defaults.items())
    header = (f"mar_mnist weights `{weights}` (sampling defaults: {sampling}), N = {args.num_samples} samples per seed, seeds "
              f"{', '.join(map(str, seeds))}, batch {args.batch_size}. A FID difference within the larger seed spread "
              f"of the two policies is a tie (recall: the same rule on its own spread). PSNR (dB) / SSIM / feature distance: mean over images and seeds "
              f"against the baseline's image of the same seed and label; it judges only the policies that keep "
              f"the baseline's order and steps ('same order'): for the others it compares different samples.\n\n")
    (out / "pareto.md").write_text(header + "\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, best in zip(rows, flags):
        x = r["tflops"] * 1e3
        ax.errorbar(x, r["fid"], yerr=r["fid_spread"] / 2, fmt="o", color="tab:red" if best else "tab:blue", ms=4)
        ax.annotate(r["name"][:30], (x, r["fid"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("GFLOP per image (2 x MAC)")
    ax.set_ylabel(f"FID (classifier features, N={args.num_samples}; bar = seed spread)")
    ax.set_title("mar_mnist: composed policies (red = Pareto-optimal)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
