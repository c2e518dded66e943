"""``marcache bench``: wall-clock next to FLOPs, against honest baselines.

For every policy given, the same process measures the baseline, the policy and a plain sampler with
*fewer steps at matched FLOPs* (fewer AR steps and/or fewer head steps), so a reader sees whether a
method beats simply running fewer steps. Runs are interleaved (round-robin, rotating the order each
repeat) after warm-up; medians and spread are reported with images/s, FLOPs per image (from the
``flop_counter`` accounting of what actually ran), achieved GFLOP/s next to a measured matmul
GFLOP/s of the device, and peak memory. ``--eval`` adds FID / class accuracy per row (from
:func:`marcache.evaluation.evaluate`); a PNG plots speed against FID (or FLOPs without ``--eval``).

Timing covers the token generation of ``Sampler.generate`` (its own clock, ending with the tokens on
the host); a latent model's VAE decode is excluded, as in the FLOP totals.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from marcache.errors import ConfigError

MATCH_MODES = ("ar", "head", "mixed")
MIN_HEAD_STEPS = 2  # the smallest respaced head process a policy accepts


# --------------------------------------------------------------------------- rows
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


# --------------------------------------------------------------------------- matched fewer-steps baselines
class StepGrid:
    """FLOPs per image of the plain sampler at ``num_iter = n`` and ``head_steps = h``, from shape-only
    runs: ``F(n, h) = T(n) + h * H`` (T: encoder + decoder at n steps; H: head FLOPs per head step,
    exact because the official head is linear in its step count)."""

    def __init__(self, model, baseline_overrides: list[str]):
        self.model = model
        self.overrides = list(baseline_overrides)
        self._t: dict[int, float] = {}
        self.head_per_step: Optional[float] = None

    def _flops(self, n: int) -> float:
        from marcache.flops import policy_flops
        from marcache.policy import load_policy

        if n not in self._t:
            s = policy_flops(self.model, load_policy("baseline", self.overrides + [f"sampler.num_iter={n}", f"sampler.head_steps={MIN_HEAD_STEPS}"]))
            comps = s["components"]
            self._t[n] = (comps["encoder"]["flops"] + comps["decoder"]["flops"]) / s["images"] / 1e12
            if self.head_per_step is None:
                self.head_per_step = comps["head"]["flops"] / s["images"] / 1e12 / MIN_HEAD_STEPS
        return self._t[n]

    def tflops(self, n: int, h: int) -> float:
        t = self._flops(n)
        return t + h * self.head_per_step

    def match_ar(self, target: float, n0: int, h: int) -> tuple[int, float]:
        """The num_iter in [1, n0] (head steps ``h``) whose FLOPs are closest to ``target``."""
        best = min(range(1, n0 + 1), key=lambda n: (abs(self.tflops(n, h) - target), -n))
        return best, self.tflops(best, h)

    def match_mixed(self, target: float, n0: int, h0: int) -> tuple[int, int, float]:
        """AR and head steps reduced in proportion (``h = h0 * n / n0``), closest to ``target``."""
        def setting(n):
            return n, min(max(round(h0 * n / n0), MIN_HEAD_STEPS), h0)

        best = min(range(1, n0 + 1), key=lambda n: (abs(self.tflops(*setting(n)) - target), -n))
        n, h = setting(best)
        return n, h, self.tflops(n, h)

    def match_head(self, target: float, n: int, h0: int) -> tuple[int, float]:
        """The head-step count in [2, h0] (num_iter ``n``) whose FLOPs are closest to ``target``."""
        self._flops(n)
        h = round((target - self._t[n]) / self.head_per_step)
        h = min(max(h, MIN_HEAD_STEPS), h0)
        return h, self.tflops(n, h)


# --------------------------------------------------------------------------- measurement
def _run_once(sampler, row: Row, args, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    labels = [i % sampler.model.num_classes for i in range(args.num_images)]
    result = sampler.generate(labels=labels, num_images=args.num_images, seed=args.seed, batch_size=args.batch_size)
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


def run_bench(model, policy_paths: list[str], args, log=print) -> dict:
    """Measure baseline, policies and matched fewer-steps baselines; return the JSON report."""
    from marcache.policy import load_policy
    from marcache.scheduler import Sampler

    common = list(args.overrides)
    baseline = load_policy("baseline", common)
    rows = [Row("baseline", "baseline", baseline)]
    used = {"baseline"}
    policies = [(p, load_policy(p, common)) for p in policy_paths]
    for path, pol in policies:
        rows.append(Row(_policy_label(pol, path, used), "policy", pol))

    samplers = {}
    device = None
    log(f"warm-up ({args.warmup} run(s) per row) ...")
    for row in list(rows):
        samplers[row.label] = Sampler(model, row.policy)
        device = samplers[row.label].backend.device
        for _ in range(max(args.warmup, 1)):
            row.flops = _flops_section(_run_once(samplers[row.label], row, args, device))
        row.sampler = dict(samplers[row.label].settings)

    # fewer-steps baselines at the FLOPs each policy actually spent
    base_settings = rows[0].sampler
    n0, h0 = int(base_settings["num_iter"]), int(base_settings["head_steps"])
    grid = StepGrid(model, common)
    unmatched: list[dict] = []
    for row in [r for r in rows if r.kind == "policy"]:
        target = row.flops["tflops_per_image"]
        for mode in match_modes(args.match):
            if mode == "ar":
                n, achieved = grid.match_ar(target, n0, h0)
                h, what = h0, f"fewer AR steps ({n})"
            elif mode == "head":
                h, achieved = grid.match_head(target, n0, h0)
                n, what = n0, f"fewer head steps ({h})"
            else:
                n, h, achieved = grid.match_mixed(target, n0, h0)
                what = f"fewer AR+head steps ({n}/{h})"
            over, label = [f"sampler.num_iter={n}", f"sampler.head_steps={h}"], f"{what} ~ {row.label}"
            error = abs(achieved - target) / target
            if error > args.match_tolerance:
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
            fewer = Row(label, f"fewer_{mode}_steps", load_policy("baseline", common + over), matched_to=row.label, target_tflops=target)
            fewer.setting = (n, h)
            samplers[label] = Sampler(model, fewer.policy)
            for _ in range(max(args.warmup, 1)):
                fewer.flops = _flops_section(_run_once(samplers[label], fewer, args, device))
            fewer.sampler = dict(samplers[label].settings)
            rows.append(fewer)
            log(f"  {label}: {achieved:.4g} TFLOPs/image planned vs {target:.4g} spent by {row.label}")

    log(f"timing: {args.repeats} interleaved repeat(s) of {len(rows)} rows, {args.num_images} images, batch {args.batch_size} ...")
    for r in range(args.repeats):
        shift = r % len(rows)
        for row in rows[shift:] + rows[:shift]:
            report = _run_once(samplers[row.label], row, args, device)
            row.seconds.append(float(report["seconds"]))

    if args.eval:
        from marcache.evaluation import evaluate  # lazy: heavy deps

        for row in rows:
            log(f"eval {row.label} ({args.eval_samples} samples) ...")
            row.eval = dict(evaluate(model, row.policy, args.eval_samples, args.seed, args.batch_size))

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[baseline.config.backend.dtype]
    if device.type == "cpu":
        dtype = torch.float32
    peak = matmul_gflops(device, dtype)
    report = _report(rows, args, device, peak, dtype)
    report["unmatched"] = unmatched
    return report


def _report(rows: list[Row], args, device, peak: float, dtype) -> dict:
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
            "images_per_second": args.num_images / med,
            "tflops_per_image": tfl,
            "flops_ratio": base.flops["tflops_per_image"] / tfl if tfl else None,
            "wallclock_speedup": base_median / med,
            "achieved_gflops": tfl * 1e3 * args.num_images / med,
            "components_tflops_per_image": {p: c["tflops_per_image"] for p, c in row.flops["components"].items()},
            "peak_memory_bytes": row.peak_memory_bytes,
            "cache_peak_bytes": row.cache_peak_bytes,
            "eval": row.eval,
        })
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "batch_size": args.batch_size,
        "num_images": args.num_images,
        "warmup": args.warmup,
        "repeats": args.repeats,
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


# --------------------------------------------------------------------------- output
def format_table(report: dict) -> str:
    has_eval = any(r["eval"] for r in report["rows"])
    head = f"{'row':<36}{'steps':>9}{'median s':>10}{'spread':>8}{'img/s':>9}{'speedup':>9}{'TFLOP/img':>11}{'FLOPs x':>9}{'GFLOP/s':>9}{'peak MiB':>10}"
    if has_eval:
        head += f"{'FID':>8}{'acc':>7}"
    lines = [f"{report['model']} on {report['device']} ({report['device_name']}), batch {report['batch_size']}, "
             f"{report['num_images']} images, {report['warmup']} warm-up + {report['repeats']} interleaved repeats; "
             f"matmul {report['matmul_gflops']:.1f} GFLOP/s ({report['matmul_dtype']})", head]
    for r in report["rows"]:
        s = r["sampler"]
        e = r["executed"]
        steps = f"{e['ar_steps']}/{e['mean_head_steps']:.3g}" if e.get("mean_head_steps") else f"{s['num_iter']}/{s['head_steps']}"
        line = (f"{r['label'][:35]:<36}{steps:>9}{r['seconds']['median']:>10.3f}"
                f"{r['seconds']['spread']:>8.1%}{r['images_per_second']:>9.2f}{r['wallclock_speedup']:>8.2f}x"
                f"{r['tflops_per_image']:>11.4g}{r['flops_ratio']:>8.2f}x{r['achieved_gflops']:>9.1f}"
                f"{(r['peak_memory_bytes'] or 0) / 2**20:>10.0f}")
        if has_eval:
            e = r["eval"] or {}
            fid, acc = e.get("fid"), e.get("class_accuracy")
            line += f"{fid:>8.2f}" if fid is not None else f"{'-':>8}"
            line += f"{acc:>7.3f}" if acc is not None else f"{'-':>7}"
        lines.append(line)
    lines.append("steps = executed AR steps / mean head steps per token; speedup = baseline median / row median; FLOPs x = baseline FLOPs / row FLOPs; "
                 "spread = (max - min) / median; " + report["peak_memory_kind"])
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Speed (images/s) against FID, or against TFLOPs/image when no row was evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    has_eval = all(r["eval"] and r["eval"].get("fid") is not None for r in rows)
    giga = max(r["tflops_per_image"] for r in rows) < 0.1  # small models: GFLOPs
    fig, ax = plt.subplots(figsize=(9, 4.5))
    markers = {"baseline": ("s", "black"), "policy": ("o", "tab:red"), "fewer_ar_steps": ("v", "tab:blue"),
               "fewer_head_steps": ("^", "tab:green"), "fewer_mixed_steps": ("D", "tab:purple")}
    for i, r in enumerate(rows, 1):
        y = r["eval"]["fid"] if has_eval else r["tflops_per_image"] * (1e3 if giga else 1)
        m, c = markers.get(r["kind"], ("x", "gray"))
        e = r["executed"]
        ax.scatter(r["images_per_second"], y, marker=m, color=c, s=60,
                   label=f"{i}: {r['label']} [{e.get('ar_steps')}/{(e.get('mean_head_steps') or 0):.3g}]")
        ax.annotate(str(i), (r["images_per_second"], y), textcoords="offset points", xytext=(5, 4 + 7 * (i % 2)), fontsize=8)
    ax.set_xlabel("images / s (median)")
    ax.set_ylabel("FID (lower is better)" if has_eval else ("GFLOPs / image" if giga else "TFLOPs / image"))
    ax.set_title(f"{report['model']} on {report['device_name']} (batch {report['batch_size']}, "
                 f"median of {report['repeats']} interleaved runs)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="row [AR steps/mean head steps]", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="wall-clock + FLOPs of policies vs the baseline and matched fewer-steps baselines",
                              description=__doc__.split("\n\n")[0])
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
    p.add_argument("--plot", help="PNG path of the speed-vs-FID (or FLOPs) plot (default: OUT/bench.png with --out)")
    p.add_argument("--out", help="folder for bench.json and bench.png")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides for every row: backend.device=cuda, backend.dtype=bfloat16, sampler.cfg=2.0 ...")


def match_modes(text: str) -> list[str]:
    """``"ar,head"`` -> ``["ar", "head"]``; ``"none"`` -> ``[]``."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if modes == ["none"]:
        return []
    bad = [m for m in modes if m not in MATCH_MODES]
    if bad or not modes:
        raise ConfigError(f"--match {text!r}: expected a comma-separated subset of {', '.join(MATCH_MODES)}, or none")
    return list(dict.fromkeys(modes))


def _validate(args) -> None:
    match_modes(args.match)
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.num_images is None:
        args.num_images = args.batch_size
    if args.num_images < 1:
        raise ConfigError("--num-images must be >= 1")
    if args.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    if args.match_tolerance < 0:
        raise ConfigError("--match-tolerance must be >= 0")
    if args.eval and args.eval_samples < 1:
        raise ConfigError("--eval-samples must be >= 1")
    for item in args.overrides:
        if item.split("=", 1)[0].startswith(("sampler.num_iter", "sampler.head_steps")):
            raise ConfigError(f"override {item!r}: bench sets num_iter/head_steps per row; put them in a policy file")


def run(args) -> int:
    import sys

    from marcache.cli import build_model
    from marcache.policy import load_policy

    _validate(args)
    for path in args.policy:  # fail on a bad policy before building anything
        load_policy(path, list(args.overrides))
    load_policy("baseline", list(args.overrides))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model, model = build_model(args)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    report = run_bench(model, args.policy, args, log=log)
    plot_path = args.plot or (str(Path(args.out) / "bench.png") if args.out else None)
    if plot_path:
        report["plot"] = str(plot(report, Path(plot_path)))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        if plot_path:
            print(f"plot: {plot_path}")
    return 0
