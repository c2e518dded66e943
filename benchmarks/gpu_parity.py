"""The cuda backend's images against the reference backend's, every shipped policy, and a sync-free step.

    python benchmarks/gpu_parity.py --model mar_base --device cuda --json parity.json
    python benchmarks/gpu_parity.py --model tiny --device cpu --dtypes float32,bfloat16   # CPU: exact

For every dtype and every shipped policy, one batch is generated with the ``reference`` and the ``cuda``
backend (same seed) and the tokens (what the VAE decodes into the images) are compared with
:func:`marcache.testing.rel_err` against ``TOLERANCE`` (docs/performance.md, "Correctness evidence").
On CUDA, after each dtype's policies, a baseline generation on the warmed ``cuda`` backend runs under
:class:`marcache.testing.HostSyncGuard`: any host sync inside a step raises. Weights are random and
perturbed (:func:`marcache.testing.perturb`) so that the head depends on its condition.

Part of benchmarks/gpu_check.py. Checks past ``--deadline-s`` are recorded as not run; the JSON is
rewritten after every check, so a killed run keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from marcache.backends import CudaBackend, ReferenceBackend
from marcache.models import create_model
from marcache.policy import list_shipped_policies, load_policy
from marcache.scheduler import Sampler
from marcache.testing import HostSyncGuard, make_tiny, perturb, rel_err

#: max |cuda - reference| relative to the reference's scale, per autocast dtype (docs/performance.md)
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}


def build_model(name: str, device: torch.device):
    """``tiny``: the test suite's tiny MAR (deep enough for every policy); else a registered config."""
    if name == "tiny":
        model = make_tiny(4, decoder_depth=4, diffloss_d=6)
    else:
        torch.manual_seed(0)
        model = perturb(create_model(name).eval())
    return model.to(device)


def write_json(path, report: dict) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, path)  # a reader never sees half a file


def check_policy(model, policy: str, dtype: str, args) -> dict:
    device = torch.device(args.device)
    overrides = [f"sampler.num_iter={args.num_iter}", f"sampler.head_steps={args.head_steps}"]
    labels = [(97 * i) % model.num_classes for i in range(args.batch)]
    resolved = load_policy(policy, overrides)
    reference = Sampler(model, resolved, backend=ReferenceBackend(device, dtype)).generate(labels=labels, seed=0)
    backend = CudaBackend(device, dtype)
    fast = Sampler(model, resolved, backend=backend).generate(labels=labels, seed=0)
    error = rel_err(fast.tokens.float(), reference.tokens.float())
    return {"check": "parity", "policy": policy, "dtype": dtype, "rel_err": error, "tolerance": TOLERANCE[dtype],
            "exact": bool(torch.equal(fast.tokens, reference.tokens)), "graphs": backend.graphs,
            "head_chains": len(backend.runners), "ok": bool(error <= TOLERANCE[dtype])}


def check_no_host_sync(model, dtype: str, args) -> dict:
    device = torch.device(args.device)
    if device.type != "cuda":
        return {"check": "no_host_sync", "policy": "baseline", "dtype": dtype, "ok": None, "note": "needs CUDA: not run"}
    resolved = load_policy("baseline", [f"sampler.num_iter={args.num_iter}", f"sampler.head_steps={args.head_steps}"])
    labels = list(range(args.batch))
    backend = CudaBackend(device, dtype)
    Sampler(model, resolved, backend=backend).generate(labels=labels, seed=0)  # captures the graphs
    guard = HostSyncGuard()
    try:
        Sampler(model, resolved, backend=backend, extra_plugins=[guard]).generate(labels=labels, seed=0)
        error = None
    except RuntimeError as exc:  # set_sync_debug_mode("error") raises at the syncing call
        error = str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    steps = guard.engagement["guarded_steps"]
    return {"check": "no_host_sync", "policy": "baseline", "dtype": dtype, "guarded_steps": steps,
            "ok": error is None and steps == args.num_iter, "error": error}


def run(args) -> dict:
    start = time.perf_counter()
    device = torch.device(args.device)
    model = build_model(args.model, device)
    report = {"model": args.model, "device": str(device), "batch": args.batch, "num_iter": args.num_iter,
              "head_steps": args.head_steps, "tolerance": {d: TOLERANCE[d] for d in args.dtypes}, "checks": []}
    plan = [(dtype, policy) for dtype in args.dtypes for policy in [*args.policies, None]]  # None: the sync check
    for dtype, policy in plan:
        if time.perf_counter() - start > args.deadline_s:
            report["checks"].append({"check": "no_host_sync" if policy is None else "parity", "policy": policy or "baseline",
                                     "dtype": dtype, "ok": None, "note": "not run: time cap"})
            continue
        t0 = time.perf_counter()
        try:
            row = check_no_host_sync(model, dtype, args) if policy is None else check_policy(model, policy, dtype, args)
        except Exception as exc:  # one broken policy must not hide the others' results
            row = {"check": "no_host_sync" if policy is None else "parity", "policy": policy or "baseline", "dtype": dtype,
                   "ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        report["checks"].append(row)
        print(f"{row['check']:13s} {row['policy']:9s} {dtype:9s} ok={row['ok']} "
              + (f"rel_err={row['rel_err']:.2e} (tol {row['tolerance']:.0e})" if "rel_err" in row else row.get("error") or row.get("note") or "")
              + f"  {row['seconds']:.1f}s", flush=True)
        write_json(args.json, report)
    ran = [c for c in report["checks"] if c["ok"] is not None]
    report["ok"] = bool(ran) and all(c["ok"] for c in ran)
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_json(args.json, report)
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mar_base", help="a registered config (random weights) or 'tiny'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "float16", "bfloat16"])
    p.add_argument("--policies", type=lambda s: s.split(","), default=None, help="default: every shipped policy")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-iter", type=int, default=16)
    p.add_argument("--head-steps", type=int, default=50)
    p.add_argument("--deadline-s", type=float, default=float("inf"), help="start no check after this many seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.policies = args.policies or list_shipped_policies()
    bad = [d for d in args.dtypes if d not in TOLERANCE]
    if bad:
        p.error(f"--dtypes: unknown {bad}; use {', '.join(TOLERANCE)}")
    if "float16" in args.dtypes and not args.device.startswith("cuda"):
        p.error("--dtypes float16 needs CUDA; use float32,bfloat16 on CPU")
    return args


def main(argv=None) -> int:
    report = run(parse_args(argv))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
