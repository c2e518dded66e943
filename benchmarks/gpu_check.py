"""GPU evidence in one command, sized for a borrowed GPU machine's short lease (docs/performance.md).

    python3 benchmarks/gpu_check.py OUT               # on the GPU machine: about 8 minutes
    python3 benchmarks/gpu_check.py OUT --dry-run     # on a CPU: everything but the CUDA parts, tiny sizes

Parts, run in order, each a subprocess killed at its own time cap (seconds, ``CAPS``), so a slow part
cannot eat the others' time; time a part leaves unused goes to the benchmark:

1. ``setup``: whatever marcache needs and the machine lacks (``REQUIRED``) is installed from the wheel
   folder (``--wheels``, default ``.whl``, filled by benchmarks/fetch_gpu_wheels.sh) into ``--site``,
   marcache itself included (built from this tree, no network); then a subprocess imports it all.
2. ``tests``: the CUDA-marked tests, then the rest of tests/test_cuda_backend.py; ``pytest -x``: the
   first failure stops the part and its message is reported. Dry run: the CUDA tests are collected
   and must all skip.
3. ``parity``: benchmarks/gpu_parity.py: cuda vs reference backend for every shipped policy within
   the documented tolerance, and no host sync in a baseline step (mar_base, random weights).
4. ``bench``: benchmarks/backends.py: mar_base at batch 16, 64, 1 for baseline, lazymar, gtr_fts,
   turbo; official, reference and cuda rows; fp16 and bf16; interleaved; median of 3.

Writes ``OUT/gpu_check.json`` (every part's status, time and results), ``OUT/gpu_check.md`` (the
tables) and ``OUT/gpu_check.log`` (every part's output). Exit status 0 when every part passed, 1
otherwise, 2 for bad arguments. Needs only the standard library itself (Python >= 3.11:
``PYTHONSAFEPATH`` keeps the source tree off the parts' ``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the whole check's budget and each part's cap, seconds (they sum to the budget, less a reserve for the report)
BUDGET_S = 480
CAPS = {"setup": 40, "tests": 90, "parity": 70, "bench": 260}
#: importable modules the parts need; the GPU machine's image lacks the ones the wheel folder carries
REQUIRED = ["torch", "numpy", "pluggy", "safetensors", "yaml", "pytest", "hypothesis", "omegaconf", "fvcore", "iopath",
            "yacs", "termcolor", "torch_fidelity", "marcache"]
BENCH_POLICIES = "baseline,lazymar,gtr_fts,turbo"
#: what the GPU run and the dry run give the parts (the dry run: tiny model, tiny schedule, CPU dtypes)
SIZES = {
    "gpu": {"tests": [["-m", "cuda", "tests"], ["-m", "not cuda", "tests/test_cuda_backend.py"]],
            "parity": ["--model", "mar_base", "--device", "cuda", "--dtypes", "float32,float16,bfloat16"],
            "bench": ["--model", "mar_base", "--batch-sizes", "16,64,1", "--device", "cuda", "--dtype", "float16,bfloat16",
                      "--repeats", "3", "--warmup", "1"]},
    "dry": {"tests": [["-m", "cuda", "tests/test_cuda_backend.py"]],
            "parity": ["--model", "tiny", "--device", "cpu", "--dtypes", "float32,bfloat16", "--batch", "2",
                       "--num-iter", "2", "--head-steps", "4"],
            "bench": ["--model", "tiny", "--batch-sizes", "2", "--device", "cpu", "--dtype", "float32,bfloat16",
                      "--head-steps", "4", "--repeats", "1", "--warmup", "0"]},
}


class Log:
    """Everything the parts print, echoed to stdout (the lease returns its tail) and kept in a file."""

    def __init__(self, path: Path):
        self.file = path.open("a")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def run_capped(cmd: list[str], cap_s: float, env: dict, log: Log, name: str) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in its own process group; past ``cap_s`` seconds kill the group. ``(rc or None, lines)``."""
    log(f"[{name}] $ {' '.join(cmd)}  (cap {cap_s:.0f} s)")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log(f"[{name}] {lines[-1]}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(cap_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started
        proc.wait()
        rc = None
        log(f"[{name}] killed at its cap of {cap_s:.0f} s")
    reader.join(timeout=5)
    return rc, lines


# ---------------------------------------------------------------------------- parts
def probe() -> dict:
    """Import what the parts need and describe the machine."""
    import platform

    import fvcore  # noqa: F401
    import omegaconf  # noqa: F401
    import torch
    import torch_fidelity  # noqa: F401

    import marcache
    from marcache.backends import available_backends

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda,
            "gpu": torch.cuda.get_device_name() if cuda else None, "backends": sorted(available_backends()),
            "marcache": str(Path(marcache.__file__).parent)}


def part_setup(ctx) -> dict:
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    installed = []
    if missing or ctx.args.install == "always":
        wheels = sorted(Path(ctx.args.wheels).glob("*.whl"))
        if not wheels:
            return {"ok": False, "missing": missing, "error": f"missing {', '.join(missing)} and no wheels in {ctx.args.wheels}: "
                    "run benchmarks/fetch_gpu_wheels.sh where pip reaches PyPI, and carry that folder"}
        with tempfile.TemporaryDirectory() as tmp:
            targets = [str(w) for w in wheels]
            if "marcache" in missing or ctx.args.install == "always":
                # build marcache from a copy of its sources: the tree stays free of build/ and egg-info
                source = Path(tmp) / "marcache-src"
                for name in ("pyproject.toml", "README.md", "marcache", "plugins", "backends", "policies"):
                    copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
                    copy(REPO / name, source / name)
                targets.append(str(source))
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                   "--no-compile", "--no-cache-dir", "--upgrade", "--target", ctx.args.site, *targets]
            rc, lines = run_capped(cmd, ctx.remaining_cap(), ctx.env, ctx.log, "setup")
        if rc != 0:
            return {"ok": False, "missing": missing, "error": "pip install failed" if rc is not None else "pip install hit the cap",
                    "tail": lines[-15:]}
        installed = [w.name for w in wheels] + (["marcache (this tree)"] if len(targets) > len(wheels) else [])
        if ctx.args.site not in ctx.env.get("PYTHONPATH", "").split(os.pathsep):
            ctx.env["PYTHONPATH"] = os.pathsep.join(filter(None, [ctx.args.site, ctx.env.get("PYTHONPATH")]))
    if installed:  # what the other parts will see: ask a fresh interpreter with their environment
        code = f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import gpu_check; print('PROBE ' + json.dumps(gpu_check.probe()))"
        rc, lines = run_capped([sys.executable, "-c", code], ctx.remaining_cap(), ctx.env, ctx.log, "setup")
        found = [json.loads(line[6:]) for line in lines if line.startswith("PROBE ")]
        if rc != 0 or not found:
            return {"ok": False, "missing": missing, "installed": installed, "error": "import check failed", "tail": lines[-15:]}
    else:  # nothing installed: this interpreter sees what the parts will
        try:
            found = [probe()]
        except Exception as exc:
            return {"ok": False, "missing": missing, "error": f"import check failed: {type(exc).__name__}: {exc}"}
    machine = found[0]
    ctx.machine = machine
    problems = []
    if "cuda" not in machine["backends"]:
        problems.append("the cuda backend is not registered")
    if not ctx.args.dry_run and not machine["cuda"]:
        problems.append("torch sees no CUDA device (use --dry-run on a CPU)")
    return {"ok": not problems, "missing": missing, "installed": installed, "machine": machine,
            **({"error": "; ".join(problems)} if problems else {})}


PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def part_tests(ctx) -> dict:
    runs = []
    for selection in SIZES[ctx.mode]["tests"]:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfEs", "--tb=short", "-p", "no:cacheprovider", "-p", "no:randomly",
               *selection]
        rc, lines = run_capped(cmd, ctx.remaining_cap(), ctx.env, ctx.log, "tests")
        counts = {}
        for line in lines[-5:]:
            for n, what in PYTEST_COUNTS.findall(line):
                counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
        failure = next((line for line in lines if line.startswith(("FAILED ", "ERROR "))), None)
        run = {"selection": " ".join(selection), "rc": rc, "counts": counts}
        if rc != 0:
            run["first_failure"] = failure or ("hit the cap" if rc is None else f"pytest exit status {rc}")
            run["tail"] = lines[-25:]
        runs.append(run)
        if rc != 0:
            break  # stop at the first failure
    first = runs[0]["counts"]
    if ctx.args.dry_run:  # on a CPU the CUDA tests must be collected and skipped, none run
        ok = all(r["rc"] == 0 for r in runs) and first.get("skipped", 0) > 0 and not first.get("passed")
    else:  # on a GPU none of them may skip
        ok = all(r["rc"] == 0 for r in runs) and first.get("passed", 0) > 0 and not first.get("skipped")
    result = {"ok": ok, "runs": runs}
    if not ok:
        result["error"] = next((r["first_failure"] for r in runs if "first_failure" in r),
                               f"unexpected counts {first} ({'CUDA tests must skip on a CPU' if ctx.args.dry_run else 'CUDA tests skipped on a GPU'})")
    return result


def part_parity(ctx) -> dict:
    path = Path(ctx.tmp) / "parity.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_parity.py"), *SIZES[ctx.mode]["parity"], "--json", str(path),
           "--deadline-s", str(max(ctx.remaining_cap() - 20, 1))]
    rc, lines = run_capped(cmd, ctx.remaining_cap(), ctx.env, ctx.log, "parity")
    report = json.loads(path.read_text()) if path.exists() else None
    if report is None:
        return {"ok": False, "error": "no result" + (" (hit the cap)" if rc is None else ""), "tail": lines[-15:]}
    failed = [c for c in report["checks"] if c["ok"] is False]
    not_run = [c for c in report["checks"] if c["ok"] is None and "needs CUDA" not in c.get("note", "")]
    ok = rc == 0 and not failed and not not_run
    error = None
    if failed:
        c = failed[0]
        error = f"{c['check']} {c['policy']} {c['dtype']}: " + (c.get("error") or f"rel_err {c['rel_err']:.2e} > {c['tolerance']:.0e}")
    elif not_run or rc != 0:
        error = f"{len(not_run)} check(s) not run (time cap)" if not_run else f"exit status {rc}"
    return {"ok": ok, "report": report, **({"error": error} if error else {})}


def part_bench(ctx) -> dict:
    out = Path(ctx.tmp) / "bench"
    cap = ctx.remaining_cap()
    cmd = [sys.executable, str(REPO / "benchmarks" / "backends.py"), *SIZES[ctx.mode]["bench"], "--policies", ctx.args.policies,
           "--num-iter", str(ctx.args.num_iter), "--deadline-s", str(max(cap - 30, 1)), "--out", str(out)]
    if ctx.args.batch_sizes:
        cmd += ["--batch-sizes", ctx.args.batch_sizes]
    rc, lines = run_capped(cmd, cap, ctx.env, ctx.log, "bench")
    if not (out / "backends.json").exists():
        return {"ok": False, "error": "no result" + (" (hit the cap)" if rc is None else ""), "tail": lines[-15:]}
    report = json.loads((out / "backends.json").read_text())
    ok = rc == 0 and bool(report["rows"]) and not report["skipped"]
    error = None if ok else ("batch sizes not run: " + ", ".join(str(s["batch"]) for s in report["skipped"]) if report["skipped"]
                             else f"exit status {rc}" if rc is not None else "hit the cap")
    return {"ok": ok, "report": report, "table": (out / "backends.md").read_text(), **({"error": error} if error else {})}


PARTS = {"setup": part_setup, "tests": part_tests, "parity": part_parity, "bench": part_bench}


class Context:
    def __init__(self, args, out: Path, tmp: str):
        self.args, self.out, self.tmp = args, out, tmp
        self.mode = "dry" if args.dry_run else "gpu"
        self.log = Log(out / "gpu_check.log")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
        if Path(args.site).is_dir():  # installed by an earlier run on this machine (e.g. before --parts bench)
            sys.path.insert(0, args.site)
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.site, self.env.get("PYTHONPATH")]))
        self.machine: dict = {}
        self.start = time.monotonic()
        self.part_deadline = self.start

    def remaining_cap(self) -> float:
        return max(self.part_deadline - time.monotonic(), 0.0)


# ---------------------------------------------------------------------------- report
def targets(bench: dict | None) -> list[dict]:
    """The issue's targets, read off the benchmark rows (float16, else the first dtype run)."""
    if not bench or not bench["rows"]:
        return []
    rows = {(r["batch"], r["row"], r["dtype"]): r for r in bench["rows"]}
    dtype = "float16" if any(k[2] == "float16" for k in rows) else bench["rows"][0]["dtype"]
    found = []
    if (16, "baseline/cuda", dtype) in rows:
        x = rows[(16, "baseline/cuda", dtype)]["speedup_vs_official"]
        found.append({"target": f"baseline/cuda >= 3x official at batch 16 ({dtype})", "value": f"{x:.2f}x", "met": x >= 3})
    for batch in (16, 64):
        for backend in ("cuda", "reference"):
            if (batch, f"turbo/{backend}", dtype) in rows:
                x = rows[(batch, f"turbo/{backend}", dtype)]["speedup_vs_official"]
                found.append({"target": f"turbo/{backend} vs official at batch {batch} ({dtype})", "value": f"{x:.2f}x", "met": None})
    for (batch, label, d), r in sorted(rows.items()):
        if label.endswith("/cuda") and (batch, label.replace("/cuda", "/reference"), d) in rows:
            ratio = rows[(batch, label.replace("/cuda", "/reference"), d)]["seconds"] / r["seconds"]
            found.append({"target": f"{label.split('/')[0]} cuda/reference speed at batch {batch} ({d})", "value": f"{ratio:.2f}x",
                          "met": None})
    return found


def to_markdown(result: dict) -> str:
    m = result.get("machine") or {}
    lines = [f"# GPU check{' (dry run)' if result['dry_run'] else ''}: {m.get('gpu') or 'no GPU'}", "",
             f"{result['date']}; python {m.get('python', '?')}, torch {m.get('torch', '?')}; `{result['command']}`; "
             f"{result['seconds']:.0f} s of a {result['budget_s']} s budget", "",
             "| part | status | seconds | cap | first problem |", "|---|---|---:|---:|---|"]
    for name, part in result["parts"].items():
        status = "pass" if part.get("ok") else ("not run" if part.get("not_run") else "FAIL")
        lines.append(f"| {name} | {status} | {part.get('seconds', 0):.1f} | {part.get('cap_s', 0):.0f} | "
                     f"{str(part.get('error', '')).replace('|', '/')} |")
    if result["targets"]:
        lines += ["", "| target | value | met |", "|---|---:|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'' if t['met'] is None else 'yes' if t['met'] else 'NO'} |"
                  for t in result["targets"]]
    parity = result["parts"].get("parity", {}).get("report")
    if parity:
        lines += ["", f"Parity ({parity['model']}, batch {parity['batch']}, {parity['num_iter']} steps x {parity['head_steps']} head steps): "
                  "max |cuda - reference| / max |reference|", "", "| check | policy | dtype | rel. error | tolerance | ok |",
                  "|---|---|---|---:|---:|---|"]
        for c in parity["checks"]:
            err = f"{c['rel_err']:.2e}" if "rel_err" in c else (c.get("error") or c.get("note") or "")
            tol = f"{c['tolerance']:.0e}" if "tolerance" in c else ""
            lines.append(f"| {c['check']} | {c['policy']} | {c['dtype']} | {err} | {tol} | "
                         f"{'' if c['ok'] is None else 'yes' if c['ok'] else 'NO'} |")
    table = result["parts"].get("bench", {}).get("table")
    if table:
        lines += ["", "Benchmark (benchmarks/backends.py): " + table]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="output folder (gets gpu_check.json, gpu_check.md, gpu_check.log)")
    p.add_argument("--dry-run", action="store_true", help="CPU: every part but the CUDA ones, tiny sizes")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="cpu = --dry-run")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--wheels", default=str(REPO / ".whl"), help="wheel folder (benchmarks/fetch_gpu_wheels.sh)")
    p.add_argument("--site", default=str(Path(tempfile.gettempdir()) / "marcache-site"), help="where missing packages go")
    p.add_argument("--install", choices=["auto", "always"], default="auto", help="always: install even when importable")
    p.add_argument("--num-iter", type=int, default=None, help="benchmark AR steps (default 16: the grid fits the bench cap; dry run 2)")
    p.add_argument("--batch-sizes", default=None, help="benchmark batch sizes, in the order run (default 16,64,1; dry run 2)")
    p.add_argument("--policies", default=BENCH_POLICIES, help="benchmarked policies")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="whole-check budget; the caps scale with it")
    args = p.parse_args(argv)
    args.dry_run = args.dry_run or args.device == "cpu"
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.num_iter is None:
        args.num_iter = 2 if args.dry_run else 16
    if args.budget_s <= 0 or args.num_iter < 1:
        p.error("--budget-s and --num-iter must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text("")
    selected = args.parts.split(",")
    scale = args.budget_s / BUDGET_S
    result = {"dry_run": args.dry_run, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(["python3", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "budget_s": args.budget_s, "caps_s": {k: v * scale for k, v in CAPS.items()}, "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args, out, tmp)
        for name, part in PARTS.items():
            if name not in selected:
                continue
            # a part's cap; the benchmark also gets what earlier parts left unused, within the budget
            cap = CAPS[name] * scale
            budget_left = ctx.start + args.budget_s - 10 * scale - time.monotonic()
            cap = budget_left if name == "bench" else min(cap, budget_left)
            if cap <= 1 or (name != "setup" and result["parts"].get("setup", {}).get("ok") is False):
                result["parts"][name] = {"ok": False, "not_run": True, "seconds": 0.0, "cap_s": max(cap, 0),
                                         "error": "setup failed" if cap > 1 else "no time left"}
                continue
            ctx.part_deadline = time.monotonic() + cap
            t0 = time.monotonic()
            ctx.log(f"== {name} (cap {cap:.0f} s)")
            outcome = part(ctx)
            outcome.update(seconds=round(time.monotonic() - t0, 1), cap_s=round(cap, 1))
            ctx.log(f"== {name}: {'pass' if outcome['ok'] else 'FAIL: ' + str(outcome.get('error'))} ({outcome['seconds']:.1f} s)")
            result["parts"][name] = outcome
        result["machine"] = ctx.machine
    bench = result["parts"].get("bench", {}).get("report")
    result["targets"] = targets(bench)
    result["seconds"] = round(time.monotonic() - ctx.start, 1)
    result["ok"] = all(p.get("ok") for p in result["parts"].values())
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(to_markdown(result))
    print(to_markdown(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
