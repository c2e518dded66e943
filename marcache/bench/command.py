"""``marcache bench``: the command line of :mod:`marcache.bench`."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from .config import BenchConfig
from .output import format_table, plot
from .runner import run_bench

_DESCRIPTION = ("Wall-clock next to FLOPs, against honest baselines: the baseline, each policy and the plain sampler "
                "with fewer steps at matched FLOPs, timed interleaved after warm-up.")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="wall-clock + FLOPs of policies vs the baseline and matched fewer-steps baselines",
                              description=_DESCRIPTION)
    p.set_defaults(func=run)
    p.add_argument("--policy", action="append", default=[], help="policy YAML or shipped name (repeatable)")
    p.add_argument("--model", default="mar_mnist", help="registered model (default mar_mnist)")
    p.add_argument("--checkpoint", help="weights for the model (default: the model's shipped/random weights)")
    p.add_argument("--weights", default="model_ema", choices=["model_ema", "model"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-images", type=int, help="images per timed run (default: one batch)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row first (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per row (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--match", default="ar,head,mixed",
                   help="fewer-steps baselines per policy, comma-separated: ar (fewer AR steps), head (fewer head steps), "
                        "mixed (both reduced in proportion); 'none' for no such rows (default ar,head,mixed)")
    p.add_argument("--match-tolerance", type=float, default=0.05,
                   help="skip a fewer-steps row whose FLOPs miss the policy's by more than this fraction (default 0.05)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 avoids oversubscription on shared CPUs)")
    from marcache.cli import add_backend_arg

    add_backend_arg(p)
    p.add_argument("--eval", action="store_true", help="also FID / class accuracy per row (marcache.evaluation)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--eval-seeds", default="0,1",
                   help="seeds of --eval (default 0,1): FID is their mean, its spread max - min; a row within the "
                        "spread of the baseline is a tie")
    p.add_argument("--plot", help="PNG path of the speed-vs-FID (or FLOPs) plot (default: OUT/bench.png with --out)")
    p.add_argument("--out", help="folder for bench.json and bench.png")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides for every row: backend.device=cuda, backend.dtype=bfloat16, sampler.cfg=2.0 ...")


def run(args) -> int:
    from marcache.cli import build_model
    from marcache.policy import load_policy

    config = BenchConfig.from_args(args)
    for path in config.policies:  # fail on a bad policy before building anything
        load_policy(path, list(config.overrides))
    load_policy("baseline", list(config.overrides))
    if config.threads:
        torch.set_num_threads(config.threads)
    name, model = build_model(config)
    config = dataclasses.replace(config, model=name)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if config.json else print
    report = run_bench(model, config, log=log)
    plot_path = config.plot or (str(Path(config.out) / "bench.png") if config.out else None)
    if plot_path:
        report["plot"] = str(plot(report, Path(plot_path)))
    if config.out:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "bench.json").write_text(json.dumps(report, indent=2))
    if config.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        if plot_path:
            print(f"plot: {plot_path}")
    return 0
