"""Hostile and careless input against the marcache CLI: a catalogue of cases and a classifier of outcomes.

Run ``python tests/hostile.py`` (or ``benchmarks/hostile.py``) for the totals; ``tests/test_hostile.py``
asserts every case is clean. Each case builds its inputs in a fresh folder, runs ``marcache.cli.main``
in-process (under a wall-clock alarm) and is classified as:

- ``clean``: a refusal exits 2 with exactly one ``marcache: error:`` line, or a run meant to succeed
  exits 0 with correct results; in both cases nothing half-written is left in the output folder;
- ``traceback``: an exception escaped ``main`` (or stderr holds a traceback);
- ``silent``: exit 0 although the input should be refused, or a wrong result (e.g. metrics of a resumed
  eval differ from an uninterrupted run);
- ``hang``: still running after the case's time limit;
- ``messy``: anything else (exit 2 but several lines, an unexpected exit status, a half-written file).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# the two-step, two-head-step MNIST MAR: fast enough to run every case in a few seconds
FAST = ["sampler.num_iter=2", "sampler.head_steps=2"]
EVAL_N, EVAL_SHARD = 6, 2
OUTCOMES = ("clean", "traceback", "silent", "hang", "messy")


class _Hang(BaseException):
    pass


@dataclass
class Outcome:
    rc: Optional[int]
    stdout: str
    stderr: str
    error: Optional[str] = None  # formatted exception that escaped main
    hang: bool = False
    seconds: float = 0.0


@dataclass
class Case:
    """``build(tmp) -> argv`` creates the inputs under ``tmp`` and returns the CLI arguments.

    ``expect``: ``"refuse"`` (exit 2, one line), ``"ok"`` (exit 0) or ``"any"`` (either, but cleanly). ``check(tmp, outcome)`` returns a
    description of what is wrong (or None); ``patch`` is a context manager factory active during the run.
    """

    id: str
    kind: str
    build: Callable[[Path], list]
    expect: str = "refuse"
    check: Optional[Callable[[Path, Outcome], Optional[str]]] = None
    patch: Optional[Callable[[Path], contextlib.AbstractContextManager]] = None
    timeout: int = 300  # generous: the 2-core machine is shared; a hang is minutes past any honest case
    ignore: tuple = ()  # output files the case damaged on purpose (a refused run must leave them as they are)
    subprocess: bool = False  # run the argv list of lists as concurrent subprocesses (returns merged outcome)


# --------------------------------------------------------------------------- running and classifying
def run_main(argv: list, timeout: int, patch=None) -> Outcome:
    """``marcache.cli.main(argv)`` in-process, stdout/stderr captured, killed by SIGALRM after ``timeout``."""
    from marcache.cli import main

    out, err = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise _Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    start = time.perf_counter()
    result = Outcome(None, "", "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), (patch or contextlib.nullcontext()):
            result.rc = main([str(a) for a in argv])
    except _Hang:
        result.hang = True
    except SystemExit as exc:  # argparse --help etc.
        result.rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - classifying exactly this
        result.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    result.stdout, result.stderr, result.seconds = out.getvalue(), err.getvalue(), time.perf_counter() - start
    return result


def run_subprocesses(argvs: list[list], timeout: int) -> Outcome:
    """Several ``marcache`` processes at once (e.g. two identical evals); outcomes merged."""
    procs = [subprocess.Popen([sys.executable, "-m", "marcache.cli", *map(str, a)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for a in argvs]
    merged = Outcome(0, "", "")
    start = time.perf_counter()
    for p in procs:
        try:
            so, se = p.communicate(timeout=max(1, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
            merged.hang = True
        merged.stdout += so
        merged.stderr += se
        merged.rc = max(merged.rc, p.returncode or 0)
    merged.seconds = time.perf_counter() - start
    return merged


def half_written(folder: Path, ignore: tuple = ()) -> Optional[str]:
    """A temporary file, an empty file, an unreadable PNG/JSON/NPZ or JSON with NaN/Infinity under ``folder``."""
    if not folder.exists():
        return None
    from PIL import Image

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ignore):
        if ".tmp" in path.name or path.suffix == ".partial":
            return f"temporary file left: {path.name}"
        if path.suffix == ".lock":
            continue
        if path.stat().st_size == 0:
            return f"empty file left: {path.name}"
        try:
            if path.suffix == ".png":
                with Image.open(path) as im:
                    im.load()
            elif path.suffix == ".json":
                json.loads(path.read_text(), parse_constant=no_constants)
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    [z[k] for k in z.files]
        except Exception as exc:  # noqa: BLE001
            return f"{path.name} is not complete/valid ({type(exc).__name__}: {exc})"
    return None


def classify(case: Case, tmp: Path, outcome: Outcome) -> tuple[str, str]:
    """``(outcome class, detail)`` of one finished case."""
    if outcome.hang:
        return "hang", f"no result after {case.timeout} s"
    if outcome.error or "Traceback (most recent call last)" in outcome.stderr:
        return "traceback", outcome.error or outcome.stderr.strip().splitlines()[-1]
    lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
    problem = case.check(tmp, outcome) if case.check else None
    problem = problem or half_written(tmp / "out", case.ignore)
    if case.expect == "any" and outcome.rc == 0:  # may run (then it must leave valid files) or refuse cleanly
        return ("silent", problem) if problem else ("clean", "ran")
    if case.expect in ("refuse", "any"):
        if outcome.rc == 0:
            return "silent", "exit 0 for an input that should be refused" + (f"; {problem}" if problem else "")
        if outcome.rc != 2 or len(lines) != 1 or not lines[0].startswith("marcache: error: "):
            return "messy", f"exit {outcome.rc}, {len(lines)} stderr line(s): {' | '.join(lines)[:300]}"
        return ("messy", problem) if problem else ("clean", lines[0])
    if outcome.rc != 0:
        return "messy", f"exit {outcome.rc}: {' | '.join(lines)[:300]}"
    return ("silent", problem) if problem else ("clean", (lines[-1] if lines else "ok"))


def run_case(case: Case, root: Path) -> tuple[str, str, Outcome]:
    tmp = root / case.id
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    argv = case.build(tmp)
    if case.subprocess:
        outcome = run_subprocesses(argv, case.timeout)
    else:
        outcome = run_main(argv, case.timeout, case.patch(tmp) if case.patch else None)
    kind, detail = classify(case, tmp, outcome)
    return kind, detail, outcome


# --------------------------------------------------------------------------- shared inputs
_STATE = {}


def mnist_state() -> dict:
    if "mnist" not in _STATE:
        from safetensors.torch import load_file

        from marcache.weights import mnist_path

        _STATE["mnist"] = load_file(mnist_path())
    return {k: v.clone() for k, v in _STATE["mnist"].items()}


def cache_root() -> Path:
    """Reference statistics cached once per process (scoring the MNIST test set is the slow part)."""
    if "cache" not in _STATE:
        _STATE["cache"] = Path(tempfile.mkdtemp(prefix="marcache-hostile-cache-"))
    return _STATE["cache"]


def save_safetensors(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def save_torch(path: Path, obj) -> Path:
    import torch

    torch.save(obj, path)
    return path


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


# --------------------------------------------------------------------------- the catalogue
def gen(tmp: Path, *args, out: str | Path | None = None, fast: bool = True) -> list:
    """``marcache generate`` of one MNIST digit into ``tmp/out`` (unless ``out`` says otherwise)."""
    return ["generate", "--num-images", "1", "--no-progress", "--out", tmp / "out" if out is None else out, *args, *(FAST if fast else [])]


def policy_file(tmp: Path, text: str, name: str = "p.yaml") -> Path:
    return write(tmp / "in" / name, text)


def warm_up() -> None:
    """Import what the cases import lazily, so that a hang alarm never lands inside an import (which would
    leave a half-initialised module behind for every later case)."""
    import importlib

    for name in ("torch._dynamo", "safetensors.torch", "PIL.PngImagePlugin", "omegaconf", "marcache.cli",
                 "marcache.scheduler", "marcache.loading", "marcache.evaluation.runner", "marcache.evaluation.metrics",
                 "marcache.plugin"):
        importlib.import_module(name)
    from marcache.plugin import available_plugins

    available_plugins()
    run_main(["generate", "--num-images", "1", "--no-progress", "--out", tempfile.mkdtemp(prefix="marcache-warm-"),
              *FAST], timeout=900)


def all_cases() -> list[Case]:
    """Every case of the catalogue (``tests/hostile_inputs.py``, ``tests/hostile_outputs.py``), in class order."""
    from hostile_inputs import (argument_cases, checkpoint_cases, plugin_param_cases, policy_cases, settings_cases,
                                weights_cases)
    from hostile_outputs import concurrency_cases, output_cases, resume_cases, runtime_cases

    return (weights_cases() + settings_cases() + plugin_param_cases() + policy_cases() + checkpoint_cases()
            + argument_cases() + output_cases() + resume_cases() + concurrency_cases() + runtime_cases())


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", default="", help="only cases whose id contains this")
    p.add_argument("--json", default=None, help="also write the per-case outcomes to this file")
    p.add_argument("-v", action="store_true", help="print every case, not only the failures")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cases = [c for c in all_cases() if args.k in c.id]
    warm_up()
    root = Path(tempfile.mkdtemp(prefix="marcache-hostile-"))
    totals = dict.fromkeys(OUTCOMES, 0)
    rows = []
    start = time.perf_counter()
    for case in cases:
        kind, detail, outcome = run_case(case, root)
        totals[kind] += 1
        rows.append({"id": case.id, "class": case.kind, "outcome": kind, "detail": detail, "seconds": round(outcome.seconds, 2)})
        if args.v or kind != "clean":
            print(f"{kind:9s} {case.id}: {detail}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print(f"tried {len(cases)}, clean {totals['clean']}, traceback {totals['traceback']}, silent wrong result "
          f"{totals['silent']}, hang {totals['hang']}, messy {totals['messy']} ({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": totals, "cases": rows}, indent=1))
    return 0 if totals["clean"] == len(cases) else 1


if __name__ == "__main__":
    import hostile  # one module instance for the runner and the catalogue (which imports "hostile")

    sys.exit(hostile.main())
