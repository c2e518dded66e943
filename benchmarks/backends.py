"""Time the reference and CUDA backends against an official-style eager loop (issue: CUDA backend).

    python benchmarks/backends.py --model mar_base --batch-sizes 1,16,64 \
        --policies baseline,lazymar,gtr_fts,turbo --device cuda --dtype float16 --out docs/performance

Rows per batch size: ``official`` (benchmarks/official_loop.py, baseline, fp16 autocast on CUDA as
official evaluation runs, float32 on CPU), then every policy on the ``reference`` and the ``cuda``
backend with ``--dtype``. Random weights (no checkpoint needed: timing does not depend on them).
Every row gets ``--warmup`` untimed runs (graph capture happens there), then ``--repeats`` timed runs,
interleaved across rows so drift hits every row alike; the median is reported. Token generation only
(no VAE decode). Writes ``OUT/backends.json`` and ``OUT/backends.md``.
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
from official_loop import official_sample_tokens  # noqa: E402

import marcache  # noqa: E402
from marcache.backends import get_backend  # noqa: E402
from marcache.policy import load_policy  # noqa: E402
from marcache.scheduler import Sampler  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_rows(model, args, batch: int) -> dict:
    """``{label: callable generating one batch}`` for one batch size."""
    defaults = model.sampling_defaults
    num_iter = args.num_iter or defaults["num_iter"]
    labels = [i % model.num_classes for i in range(batch)]
    official_dtype = torch.float16 if args.device.startswith("cuda") else None
    rows = {"official": lambda: official_sample_tokens(
        model, labels, num_iter, defaults["cfg"], defaults["cfg_schedule"], defaults["temperature"],
        autocast_dtype=official_dtype, head_steps=str(args.head_steps or model.diffloss.gen_diffusion.num_timesteps),
        clip_denoised=defaults["clip_denoised"])}
    overrides = [f"backend.device={args.device}", f"backend.dtype={args.dtype}"]
    if args.num_iter:
        overrides.append(f"sampler.num_iter={args.num_iter}")
    if args.head_steps:
        overrides.append(f"sampler.head_steps={args.head_steps}")
    for policy in args.policies:
        for backend in args.backends:
            resolved = load_policy(policy, overrides)
            sampler = Sampler(model, resolved, backend=get_backend(backend, args.device, args.dtype))
            rows[f"{policy}/{backend}"] = (lambda s=sampler: s.generate(labels=labels, seed=0, batch_size=batch))
    return rows


def time_rows(rows: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        for run in rows.values():
            run()
    times = {label: [] for label in rows}
    for _ in range(repeats):
        for label, run in rows.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[label].append(time.perf_counter() - start)
    return times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = marcache.create_model(args.model).to(device).eval()
    report = {"model": args.model, "device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
              "num_iter": args.num_iter or model.sampling_defaults["num_iter"], "repeats": args.repeats, "rows": []}
    for batch in args.batch_sizes:
        rows = build_rows(model, args, batch)
        times = time_rows(rows, device, args.warmup, args.repeats)
        base = statistics.median(times["official"])
        for label, values in times.items():
            sec = statistics.median(values)
            report["rows"].append({"batch": batch, "row": label, "seconds": sec, "images_per_second": batch / sec,
                                   "speedup_vs_official": base / sec, "spread": (max(values) - min(values)) / sec})
            print(f"batch {batch:3d}  {label:24s} {sec:8.3f} s  {batch / sec:8.2f} img/s  {base / sec:5.2f}x", flush=True)
    return report


def to_markdown(report: dict) -> str:
    lines = [f"{report['model']}, {report['num_iter']} steps, random weights, {report['device']}, torch {report['torch']}, "
             f"dtype {report['dtype']} (official row: fp16 autocast on CUDA), median of {report['repeats']}",
             "", "| batch | row | s / batch | images/s | vs official |", "|---:|---|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['row']} | {r['seconds']:.3f} | {r['images_per_second']:.2f} | {r['speedup_vs_official']:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mar_base")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--policies", type=lambda s: s.split(","), default=["baseline", "lazymar", "gtr_fts", "turbo"])
    p.add_argument("--backends", type=lambda s: s.split(","), default=["reference", "cuda"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-iter", type=int, default=None, help="AR steps (default: the model's, 64 for mar_base)")
    p.add_argument("--head-steps", type=int, default=None, help="head steps (default: the model's, 100)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for backends.json and backends.md")
    args = p.parse_args(argv)
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        p.error("--dtype float16 needs CUDA; use float32 or bfloat16 on CPU")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "backends.json").write_text(json.dumps(report, indent=2))
        (out / "backends.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
