"""Tune a model's sampling defaults: baseline FID over CFG scale, CFG schedule and temperature.

    python benchmarks/sampling_sweep.py --cfg 1.5,2.5,3.5,5 --cfg-schedule linear,constant \
        --temperature 0.8,0.9,1.0 --num-samples 1000 --seeds 0,1 --out runs/sampling-sweep

Every combination is evaluated with every seed (``marcache.evaluation.sweep``; shards under OUT, so a
killed sweep resumes). Prints a markdown table sorted by mean FID with its seed spread, marks the
settings tied with the best (difference within the larger spread) and writes ``OUT/results.json``.
The registered defaults of a model (``register_model_config(..., sampling=...)``) are where the winner goes.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from marcache.cli import add_model_args, build_model


def _list(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)  # --model/--checkpoint/--weights/--vae as in `marcache eval` (default: the shipped mar_mnist)
    p.add_argument("--cfg", type=_list(float), default=[1.5, 2.5, 3.5, 5.0])
    p.add_argument("--cfg-schedule", type=_list(str), default=["linear", "constant"])
    p.add_argument("--temperature", type=_list(float), default=[0.8, 0.9, 1.0])
    p.add_argument("--seeds", type=_list(int), default=[0, 1])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/sampling-sweep")
    args = p.parse_args(argv)

    import torch

    from marcache.evaluation.spread import judge
    from marcache.evaluation.sweep import sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    _, model = build_model(args)
    settings = [(f"cfg{c:g}-{s}-t{t:g}", [f"sampler.cfg={c}", f"sampler.cfg_schedule={s}", f"sampler.temperature={t}"])
                for c, s, t in itertools.product(args.cfg, args.cfg_schedule, args.temperature)]
    results = sweep(model, settings, args.seeds, args.num_samples, args.out, args.batch_size)
    ranked = sorted(results.items(), key=lambda kv: kv[1]["fid"])
    best = ranked[0][1]
    lines = [f"N = {args.num_samples} per seed, seeds {args.seeds}", "",
             "| setting | FID mean | spread | precision | recall | class acc. | vs best |", "|---|---|---|---|---|---|---|"]
    for label, r in ranked:
        verdict = judge(r["fid"], best["fid"], max(r["fid_spread"], best["fid_spread"]) if len(args.seeds) > 1 else None)
        lines.append(f"| {label} | {r['fid']:.2f} | {r['fid_spread']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['class_accuracy']:.3f} | {verdict or '-'} |")
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({k: {m: v for m, v in r.items() if m != "policy"}
                                                             for k, r in results.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
