"""``marcache tune``: a resumable multi-objective search (Optuna) for the best composed policy for a budget."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import ConfigError, MarcacheError


class BudgetNotMet(MarcacheError):
    """No measured trial meets the requested budget (exit status 2, the closest point named)."""


def add_parser(subparsers) -> None:
    from ..cli import add_model_args

    p = subparsers.add_parser(
        "tune", help="search composed policies for a budget (Optuna; resumable, several workers may share a study)",
        description="Multi-objective search (FLOPs ratio or measured speedup vs fidelity to the baseline on a fixed "
                    "calibration set) over which tunable plugins are on and their parameters; writes the Pareto front "
                    "and, for a budget, a ready policy YAML. See docs/tune.md.")
    p.set_defaults(func=run)
    add_model_args(p)
    p.add_argument("--space", help="search-space YAML (default: every tunable plugin with its declared ranges, "
                                   "sampler num_iter and head_steps; see `marcache plugins --tunable`)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-flops-ratio", type=float, metavar="R",
                        help="budget: FLOPs ratio (baseline / policy) >= R; the least quality drop that meets it")
    budget.add_argument("--target-speedup", type=float, metavar="R",
                        help="budget: measured images/s >= R x the baseline's (the cost objective becomes measured speed)")
    budget.add_argument("--max-quality-drop", type=float, metavar="X",
                        help="budget: quality drop (see --quality) <= X; the highest cost ratio that meets it")
    p.add_argument("--quality", choices=["auto", "feature", "ssim"], default="auto",
                   help="quality drop minimised: feature = mean classifier-feature cosine distance to the baseline's images "
                        "(MNIST-sized), ssim = 1 - mean SSIM; auto = feature where it applies, else ssim")
    p.add_argument("--cost", choices=["flops", "speed"], default=None,
                   help="cost objective: exact FLOPs ratio (default) or measured speedup (default with --target-speedup)")
    p.add_argument("--baseline-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides of the baseline that costs and fidelity are relative to, e.g. sampler.num_iter=32")
    p.add_argument("--n-trials", type=int, default=40, help="finished trials the study should reach, all workers together (default 40)")
    p.add_argument("--calibration-samples", type=int, default=64, help="calibration images per trial (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration set and of the sampler (default 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--final-samples", type=int, default=1000,
                   help="FID of the chosen point and the baseline on held-out seeds with this many samples (0: skip)")
    p.add_argument("--final-seed", type=int, help="seed of the final check (default: --seed + 1, disjoint from calibration)")
    p.add_argument("--reference-stats", help="FID statistics (.npz mu/sigma, Inception space) for the final check of a non-MNIST model")
    p.add_argument("--out", default="tune_out", help="output folder (study.db, pareto.md/png, policy.yaml; default tune_out)")
    p.add_argument("--storage", help="Optuna storage URL shared by workers (default: sqlite:///OUT/study.db)")
    p.add_argument("--study-name", help="study name in the storage (default: derived from the model, objectives and space)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")


def _validate(args) -> None:
    if args.n_trials < 1:
        raise ConfigError("--n-trials must be >= 1")
    if args.calibration_samples < 2:
        raise ConfigError("--calibration-samples must be >= 2")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.final_samples < 0 or args.final_samples == 1:
        raise ConfigError("--final-samples must be 0 (skip) or >= 2")
    for flag in ("target_flops_ratio", "target_speedup"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive number (a ratio, e.g. 3 for 3x)")
    if args.max_quality_drop is not None and not (math.isfinite(args.max_quality_drop) and args.max_quality_drop >= 0):
        raise ConfigError("--max-quality-drop must be >= 0 (in the unit of --quality)")
    if args.cost == "flops" and args.target_speedup is not None:
        raise ConfigError("--target-speedup needs the measured-speed objective: drop --cost flops")
    if args.cost == "speed" and args.target_flops_ratio is not None:
        raise ConfigError("--target-flops-ratio needs the FLOPs objective: drop --cost speed")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be >= 1")


def run(args) -> int:
    import torch

    from ..cli import build_model, build_vae
    from ..evaluation.runner import model_fingerprint
    from . import report as rep
    from .objective import Calibration, resolve_quality
    from .space import load_space
    from .study import Budget, default_storage, finished, make_objective, open_study, run_study

    _validate(args)
    from ..policy import load_policy

    baseline = load_policy("baseline", args.baseline_set)  # a bad override: one line before anything runs
    if args.threads:
        torch.set_num_threads(args.threads)
    cost = args.cost or ("speed" if args.target_speedup is not None else "flops")
    budget = Budget(args.target_flops_ratio, args.target_speedup, args.max_quality_drop)
    name, model = build_model(args)
    vae = build_vae(args, model)
    quality = resolve_quality(args.quality, model)
    space = load_space(args.space, model, baseline.sampler_settings(model))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {"model": name, "weights": model_fingerprint(model), "calibration_samples": args.calibration_samples,
                "seed": args.seed, "batch_size": args.batch_size, "quality": quality, "cost": cost,
                "space": space.describe()}
    if args.baseline_set:
        settings["baseline_set"] = list(args.baseline_set)
    if cost == "speed":  # measured speed is only comparable on one kind of machine
        settings["device"] = device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or default_storage(out)
    study_name = args.study_name or f"tune-{name}-{cost}-{quality}-{space.fingerprint()}"
    study = open_study(storage, study_name, settings, args.seed)

    calibration = Calibration(model, name, args.calibration_samples, args.seed, args.batch_size, quality, vae,
                              tuple(args.baseline_set))
    log = (lambda *a: None) if args.no_progress else print
    log(f"calibration: baseline on {args.calibration_samples} samples (seed {args.seed}); study {study_name!r} in {storage}")
    calibration.prepare(out)

    def describe_best(study) -> str:
        rows = rep.rows_of(study)
        pick = rep.choose(rows, budget) if budget.active else None
        if pick is None:
            return f"front: {len(rep.pareto(rows))} point(s)" if rows else "no measured trial yet"
        return f"best #{pick['trial']}: {pick['cost']:.2f}x, drop {pick['quality_drop']:.4f}"

    run_study(study, make_objective(space, calibration, budget, cost), args.n_trials, describe_best,
              progress=not args.no_progress)

    rows = rep.rows_of(study)
    for r in rows:  # the budget of this run decides (the study may have been made under another one)
        r["violation"] = budget.violation(r)
    front = rep.pareto(rows)
    chosen = rep.choose(rows, budget) if budget.active else None
    table = rep.front_table(front, chosen, settings, rows)
    n_done = len(finished(study))
    header = (f"marcache tune: {name}, {n_done} finished trials ({len(rows)} measured), calibration N={args.calibration_samples} "
              f"seed {args.seed}, quality = {quality}, cost = {cost}, {budget.describe()}\n\n")
    (out / "pareto.md").write_text(header + table + "\n")
    rep.plot_front(rows, front, chosen, settings, out / "pareto.png")
    rep.write_json(out / "trials.json", {"settings": settings, "rows": rows, "front": [r["trial"] for r in front]})
    print(header + table)
    print(f"wrote {out / 'pareto.md'}, {out / 'pareto.png'} and {out / 'trials.json'}")
    if not budget.active:
        return 0
    if chosen is None:
        near = rep.closest(study, budget)
        where = "no trial was measured" if near is None else (
            f"the closest is trial {near['trial']} ({near['label']}: FLOPs ratio {near['flops_ratio']:.2f}x"
            + (f", speedup {near['speedup']:.2f}x, quality drop {near['quality_drop']:.4f}" if "quality_drop" in near else "")
            + ")")
        raise BudgetNotMet(f"no trial meets {budget.describe()} after {n_done} trials: {where}; "
                           f"relax the budget or widen --space / --n-trials (front in {out / 'pareto.md'})")
    final = None
    if args.final_samples:
        if model.num_classes != 10 and args.reference_stats is None:
            print("final check skipped: FID of a non-MNIST model needs --reference-stats FILE")
        else:
            seed = args.seed + 1 if args.final_seed is None else args.final_seed
            log(f"final check: FID of trial {chosen['trial']} and the baseline on {args.final_samples} held-out samples (seed {seed})")
            final = rep.final_check(model, chosen, args.final_samples, seed, args.batch_size, out, vae, args.reference_stats,
                                    args.baseline_set)
            rep.write_json(out / "final_check.json", dict(final, trial=chosen["trial"]))
    text = rep.policy_yaml(chosen, dict(settings, device=device), budget, final, n_done)
    (out / "policy.yaml").write_text(text)
    print(f"chosen: trial {chosen['trial']} ({chosen['label']}), FLOPs ratio {chosen['flops_ratio']:.2f}x, "
          f"quality drop {chosen['quality_drop']:.4f}" + (f", FID {final['fid']:.2f} vs baseline {final['baseline_fid']:.2f}" if final else "")
          + f"\nwrote {out / 'policy.yaml'} (marcache generate --policy {out / 'policy.yaml'})")
    return 0
