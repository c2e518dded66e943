"""Time the reference and CUDA backends against an official-style eager loop (issue: CUDA backend).

    python benchmarks/backends.py --model mar_base --batch-sizes 1,16,64 \
        --policies baseline,lazymar,gtr_fts,turbo --device cuda --dtype float16,bfloat16 --out docs/performance

Rows per batch size and dtype: ``official`` (benchmarks/official_loop.py, baseline, under the dtype's
autocast as official evaluation runs fp16), then every policy on the ``reference`` and the ``cuda``
backend. Random weights, perturbed as in benchmarks/gpu_parity.py so that the head depends on its
condition (no checkpoint needed: timing does not depend on them); ``--model tiny`` is the tests' tiny MAR. Every row gets
``--warmup`` untimed runs (graph capture happens there), then ``--repeats`` timed runs, interleaved
across rows (and dtypes) so drift hits every row alike; the median is reported, and ``vs official`` is
against the official row of the same batch and dtype. Token generation only (no VAE decode). Writes
``OUT/backends.json`` and ``OUT/backends.md`` after every batch size.

``--deadline-s``: no round (one run of every row) starts that would end past it, judged by the last
round's time; a batch size cut short reports the medians of the rounds it finished (``repeats``), one
with no timed round is listed under ``skipped``. benchmarks/gpu_check.py uses it to keep its time cap.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_parity import build_model  # noqa: E402
from official_loop import official_sample_tokens  # noqa: E402

from marcache.backends import get_backend  # noqa: E402
from marcache.policy import load_policy  # noqa: E402
from marcache.scheduler import Sampler  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_rows(model, args, batch: int) -> dict:
    """``{(label, dtype): callable generating one batch}`` for one batch size."""
    defaults = model.sampling_defaults
    num_iter = args.num_iter or defaults["num_iter"]
    labels = [i % model.num_classes for i in range(batch)]
    head_steps = str(args.head_steps or model.diffloss.gen_diffusion.num_timesteps)
    rows = {}
    for dtype in args.dtype:
        rows[("official", dtype)] = (lambda d=DTYPES[dtype]: official_sample_tokens(
            model, labels, num_iter, defaults["cfg"], defaults["cfg_schedule"], defaults["temperature"],
            autocast_dtype=d, head_steps=head_steps, clip_denoised=defaults["clip_denoised"]))
    for policy in args.policies:
        for backend in args.backends:
            for dtype in args.dtype:
                overrides = [f"backend.device={args.device}", f"backend.dtype={dtype}"]
                if args.num_iter:
                    overrides.append(f"sampler.num_iter={args.num_iter}")
                if args.head_steps:
                    overrides.append(f"sampler.head_steps={args.head_steps}")
                resolved = load_policy(policy, overrides)
                sampler = Sampler(model, resolved, backend=get_backend(backend, args.device, dtype))
                rows[(f"{policy}/{backend}", dtype)] = (lambda s=sampler: s.generate(labels=labels, seed=0, batch_size=batch))
    return rows


def time_rows(rows: dict, device: torch.device, warmup: int, repeats: int, deadline: float = float("inf"),
              round_estimate: float = 0.0) -> tuple[dict, float]:
    """Interleaved rounds (one run of every row); returns ``({row: [seconds per timed run]}, round time)``.
    A round that would end past ``deadline`` (``time.perf_counter()`` value) is not started."""
    times = {key: [] for key in rows}
    for index in range(warmup + repeats):
        if time.perf_counter() + round_estimate > deadline:
            break
        round_start = time.perf_counter()
        for key, run in rows.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            if index >= warmup:
                times[key].append(time.perf_counter() - start)
        round_estimate = time.perf_counter() - round_start
    return times, round_estimate


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args, on_batch=None) -> dict:
    start = time.perf_counter()
    deadline = start + args.deadline_s
    device = torch.device(args.device)
    model = build_model(args.model, device)
    report = {"model": args.model, "device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
              "num_iter": args.num_iter or model.sampling_defaults["num_iter"],
              "head_steps": args.head_steps or model.diffloss.gen_diffusion.num_timesteps,
              "warmup": args.warmup, "repeats": args.repeats, "rows": [], "skipped": []}
    round_estimate, last_batch = 0.0, None
    for batch in args.batch_sizes:
        if last_batch is not None and batch > last_batch:
            round_estimate *= batch / last_batch  # a bigger batch's round: guess it scales with the batch
        rows = build_rows(model, args, batch)
        times, round_estimate = time_rows(rows, device, args.warmup, args.repeats, deadline, round_estimate)
        last_batch = batch
        if not times[next(iter(times))]:
            report["skipped"].append({"batch": batch, "reason": f"time cap ({args.deadline_s:.0f} s)"})
            print(f"batch {batch:3d}  skipped: time cap", flush=True)
            continue
        for (label, dtype), values in sorted(times.items(), key=lambda kv: args.dtype.index(kv[0][1])):  # grouped by dtype
            base = statistics.median(times[("official", dtype)])
            sec = statistics.median(values)
            report["rows"].append({"batch": batch, "row": label, "dtype": dtype, "seconds": sec, "images_per_second": batch / sec,
                                   "speedup_vs_official": base / sec, "spread": (max(values) - min(values)) / sec,
                                   "repeats": len(values)})
            print(f"batch {batch:3d}  {label:24s} {dtype:9s} {sec:8.3f} s  {batch / sec:8.2f} img/s  {base / sec:5.2f}x", flush=True)
        if on_batch:
            on_batch(report)
    report["seconds"] = time.perf_counter() - start
    return report


def to_markdown(report: dict) -> str:
    lines = [f"{report['model']}, {report['num_iter']} steps x {report['head_steps']} head steps, random weights, {report['device']}, "
             f"torch {report['torch']}, median of {report['repeats']} after {report['warmup']} warm-up, interleaved "
             f"(vs official: the official-style loop of the same batch and dtype)",
             "", "| batch | row | dtype | s / batch | images/s | vs official |", "|---:|---|---|---:|---:|---:|"]
    for r in report["rows"]:
        partial = "" if r["repeats"] == report["repeats"] else f" ({r['repeats']} runs)"
        lines.append(f"| {r['batch']} | {r['row']} | {r['dtype']} | {r['seconds']:.3f}{partial} | {r['images_per_second']:.2f} "
                     f"| {r['speedup_vs_official']:.2f}x |")
    for s in report.get("skipped", []):
        lines.append(f"| {s['batch']} | not run: {s['reason']} | | | | |")
    return "\n".join(lines) + "\n"


def write(report: dict, out) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backends.json").write_text(json.dumps(report, indent=2))
    (out / "backends.md").write_text(to_markdown(report))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mar_base", help="a registered config or 'tiny'")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--policies", type=lambda s: s.split(","), default=["baseline", "lazymar", "gtr_fts", "turbo"])
    p.add_argument("--backends", type=lambda s: s.split(","), default=["reference", "cuda"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", type=lambda s: s.split(","), default=["float16"],
                   help="autocast dtype(s), comma-separated: float32, bfloat16, float16")
    p.add_argument("--num-iter", type=int, default=None, help="AR steps (default: the model's, 64 for mar_base)")
    p.add_argument("--head-steps", type=int, default=None, help="head steps (default: the model's, 100)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--deadline-s", type=float, default=float("inf"), help="start no round that would end after this")
    p.add_argument("--out", default=None, help="folder for backends.json and backends.md")
    args = p.parse_args(argv)
    bad = [d for d in args.dtype if d not in DTYPES]
    if bad:
        p.error(f"--dtype: unknown {bad}; use {', '.join(DTYPES)}")
    if "float16" in args.dtype and not args.device.startswith("cuda"):
        p.error("--dtype float16 needs CUDA; use float32 or bfloat16 on CPU")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args, on_batch=(lambda r: write(r, args.out)) if args.out else None)
    if args.out:
        write(report, args.out)
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
