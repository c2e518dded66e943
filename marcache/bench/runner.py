"""Measuring: baseline, policies and matched fewer-steps rows, timed interleaved after warm-up.

Timing covers the token generation of ``Sampler.generate`` (its own clock, ending with the tokens on
the host); a latent model's VAE decode is excluded, as in the FLOP totals.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from marcache.errors import ConfigError
from marcache.evaluation.spread import combine_seeds, compare

from .config import BenchConfig
from .matching import StepGrid

@dataclass
class Row:
    label: str
    kind: str  # baseline | policy | fewer_ar_steps | fewer_head_steps | fewer_mixed_steps
    policy: object  # ResolvedPolicy
    matched_to: Optional[str] = None
    target_tflops: Optional[float] = None
    sampler: Optional[object] = None
    seconds: list = field(default_factory=list)
    flops: Optional[dict] = None
    peak_memory_bytes: Optional[int] = None
    cache_peak_bytes: dict = field(default_factory=dict)
    eval: Optional[dict] = None
    executed: dict = field(default_factory=dict)
    setting: Optional[tuple] = None  # (num_iter, head_steps) of a fewer-steps row
    also_matches: list = field(default_factory=list)


def _device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, size: Optional[int] = None, repeats: int = 5) -> float:
    """Measured dense matmul throughput of the device (2 n^3 per product), median of ``repeats``."""
    n = size or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    _device_sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        _device_sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9

def _run_once(sampler, row: Row, config: BenchConfig, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    labels = [i % sampler.model.num_classes for i in range(config.images)]
    result = sampler.generate(labels=labels, num_images=config.images, seed=config.seed, batch_size=config.batch_size)
    _device_sync(device)
    if device.type == "cuda":
        row.peak_memory_bytes = max(row.peak_memory_bytes or 0, torch.cuda.max_memory_allocated(device))
    else:  # process-wide high-water mark (Linux: KiB)
        row.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row.cache_peak_bytes = result.report.get("cache_peak_bytes", {})
    row.executed = executed_steps(result.report)
    return result.report


def executed_steps(report: dict) -> dict:
    """What ran, from the report's step log: AR steps and the mean DDPM head steps per token (a
    policy's nominal sampler settings can differ, e.g. GtR's per-stage schedule)."""
    steps = report.get("steps", [])
    chains = Counter()
    for s in steps:
        for count, rows in s.get("head_rows_by_steps", {}).items():
            chains[int(count)] += int(rows)
    total = sum(chains.values())
    mean = sum(c * n for c, n in chains.items()) / total if total else None
    return {"ar_steps": report.get("num_steps"), "mean_head_steps": mean}


def _flops_section(report: dict) -> dict:
    section = report.get("engagement", {}).get("flops")
    if section is None:
        raise ConfigError("a benchmarked policy disables 'flop_counter'; bench needs the FLOPs of what ran")
    return section


def _policy_label(policy, path: str, used: set) -> str:
    base = policy.config.name if policy.config.name not in ("policy", "") else Path(path).stem
    label, i = base, 2
    while label in used:
        label, i = f"{base}#{i}", i + 1
    used.add(label)
    return label


def run_bench(model, config: BenchConfig, log=print) -> dict:
    """Measure baseline, policies and matched fewer-steps baselines; return the JSON report."""
    from marcache.policy import load_policy
    from marcache.scheduler import Sampler

    common = list(config.overrides)
    baseline = load_policy("baseline", common)
    rows = [Row("baseline", "baseline", baseline)]
    used = {"baseline"}
    policies = [(p, load_policy(p, common)) for p in config.policies]
    for path, pol in policies:
        rows.append(Row(_policy_label(pol, path, used), "policy", pol))

    samplers = {}
    device = None
    log(f"warm-up ({config.warmup} run(s) per row) ...")
    for row in list(rows):
        samplers[row.label] = Sampler(model, row.policy)
        device = samplers[row.label].backend.device
        for _ in range(max(config.warmup, 1)):
            row.flops = _flops_section(_run_once(samplers[row.label], row, config, device))
        row.sampler = dict(samplers[row.label].settings)

    unmatched = _add_matched_rows(model, rows, samplers, config, device, used, log)

    log(f"timing: {config.repeats} interleaved repeat(s) of {len(rows)} rows, {config.images} images, batch {config.batch_size} ...")
    for r in range(config.repeats):
        shift = r % len(rows)
        for row in rows[shift:] + rows[:shift]:
            report = _run_once(samplers[row.label], row, config, device)
            row.seconds.append(float(report["seconds"]))

    if config.eval:
        from marcache.evaluation import evaluate  # lazy: heavy deps

        for row in rows:
            log(f"eval {row.label} ({config.eval_samples} samples, seeds {list(config.eval_seeds)}) ...")
            per_seed = [dict(evaluate(model, row.policy, config.eval_samples, seed, config.batch_size))
                        for seed in config.eval_seeds]
            row.eval = combine_seeds(per_seed) if len(per_seed) > 1 else per_seed[0]
        base = rows[0].eval
        for row in rows:  # a difference within either row's seed spread is a tie; recall is judged on its own
            for metric, key in (("fid", "vs_baseline"), ("recall", "recall_vs_baseline")):
                comparison = compare(row.eval, base, metric)
                if comparison:
                    row.eval[key] = comparison["verdict"]

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[baseline.config.backend.dtype]
    if device.type == "cpu":
        dtype = torch.float32
    peak = matmul_gflops(device, dtype)
    report = _report(rows, config, device, peak, dtype)
    report["unmatched"] = unmatched
    return report


def _plain_setting(grid: StepGrid, mode: str, target: float, n0: int, h0: int) -> tuple[int, int, float, str]:
    """``(num_iter, head_steps, achieved TFLOPs, description)`` of the plain setting matching ``target``."""
    if mode == "ar":
        n, achieved = grid.match_ar(target, n0, h0)
        return n, h0, achieved, f"fewer AR steps ({n})"
    if mode == "head":
        h, achieved = grid.match_head(target, n0, h0)
        return n0, h, achieved, f"fewer head steps ({h})"
    n, h, achieved = grid.match_mixed(target, n0, h0)
    return n, h, achieved, f"fewer AR+head steps ({n}/{h})"


def _add_matched_rows(model, rows: list[Row], samplers: dict, config: BenchConfig, device, used: set, log) -> list[dict]:
    """Append the fewer-steps baselines at the FLOPs each policy actually spent (warmed up); return
    the policies no plain setting matched within the tolerance."""
    from marcache.policy import load_policy
    from marcache.scheduler import Sampler

    common = list(config.overrides)
    n0, h0 = int(rows[0].sampler["num_iter"]), int(rows[0].sampler["head_steps"])
    grid = StepGrid(model, common)
    unmatched: list[dict] = []
    for row in [r for r in rows if r.kind == "policy"]:
        target = row.flops["tflops_per_image"]
        for mode in config.match:
            n, h, achieved, what = _plain_setting(grid, mode, target, n0, h0)
            label = f"{what} ~ {row.label}"
            if abs(achieved - target) / target > config.match_tolerance:
                log(f"  no plain setting with {what.split(' (')[0]} reaches {row.label}'s "
                    f"{target:.4g} TFLOPs/image (closest {achieved:.4g}); row skipped")
                unmatched.append({"policy": row.label, "mode": mode, "target_tflops_per_image": target, "closest_tflops_per_image": achieved})
                continue
            same = next((r for r in rows if r.kind.startswith("fewer_") and r.setting == (n, h)), None)
            if same is not None:  # two policies matched by the same plain setting: measure it once
                same.also_matches.append(row.label)
                log(f"  {label}: same setting as '{same.label}', measured once")
                continue
            used.add(label)
            policy = load_policy("baseline", common + [f"sampler.num_iter={n}", f"sampler.head_steps={h}"])
            fewer = Row(label, f"fewer_{mode}_steps", policy, matched_to=row.label, target_tflops=target, setting=(n, h))
            samplers[label] = Sampler(model, fewer.policy)
            for _ in range(max(config.warmup, 1)):
                fewer.flops = _flops_section(_run_once(samplers[label], fewer, config, device))
            fewer.sampler = dict(samplers[label].settings)
            rows.append(fewer)
            log(f"  {label}: {achieved:.4g} TFLOPs/image planned vs {target:.4g} spent by {row.label}")
    return unmatched


def _report(rows: list[Row], config: BenchConfig, device, peak: float, dtype) -> dict:
    base = rows[0]
    base_median = statistics.median(base.seconds)
    out_rows = []
    for row in rows:
        med = statistics.median(row.seconds)
        tfl = row.flops["tflops_per_image"]
        out_rows.append({
            "label": row.label,
            "kind": row.kind,
            "matched_to": row.matched_to,
            "also_matches": row.also_matches,
            "executed": row.executed,
            "target_tflops_per_image": row.target_tflops,
            "match_error": abs(tfl - row.target_tflops) / row.target_tflops if row.target_tflops else None,
            "sampler": {k: row.sampler[k] for k in ("num_iter", "head_steps", "cfg", "cfg_schedule", "temperature")},
            "seconds": {"median": med, "min": min(row.seconds), "max": max(row.seconds),
                        "spread": (max(row.seconds) - min(row.seconds)) / med if med else None, "all": row.seconds},
            "images_per_second": config.images / med,
            "tflops_per_image": tfl,
            "flops_ratio": base.flops["tflops_per_image"] / tfl if tfl else None,
            "wallclock_speedup": base_median / med,
            "achieved_gflops": tfl * 1e3 * config.images / med,
            "components_tflops_per_image": {p: c["tflops_per_image"] for p, c in row.flops["components"].items()},
            "peak_memory_bytes": row.peak_memory_bytes,
            "cache_peak_bytes": row.cache_peak_bytes,
            "eval": row.eval,
        })
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "model": config.model,
        "batch_size": config.batch_size,
        "num_images": config.images,
        "warmup": config.warmup,
        "repeats": config.repeats,
        "matmul_gflops": peak,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "peak_memory_kind": "cuda max_memory_allocated per row" if device.type == "cuda" else "process peak RSS (cumulative, not per row)",
        "flops_convention": "FLOPs = 2 x multiply-adds (marcache.flops); VAE excluded",
        "rows": out_rows,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
