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
import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field
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
    timeout: int = 120
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


def _weights_case(kind: str, mutate: Callable[[dict], None], suffix: str = ".safetensors") -> Case:
    def build(tmp: Path) -> list:
        state = mnist_state()
        mutate(state)
        path = tmp / "in" / f"w{suffix}"
        path.parent.mkdir(parents=True)
        (save_safetensors if suffix == ".safetensors" else save_torch)(path, state)
        return gen(tmp, "--model", "mar_mnist", "--checkpoint", path)
    return Case(f"weights-{kind}", "weights", build)


def _set(key: str, index, value: float) -> Callable[[dict], None]:
    def mutate(state):
        state[key].view(-1)[index] = value
    return mutate


def _scale(factor: float) -> Callable[[dict], None]:
    def mutate(state):
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = v * factor
    return mutate


class _Evil:
    """Pickles to a call of ``os.system``: a weights_only loader must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint_case(kind: str, make: Callable[[Path], Path], extra: tuple = (), check=None) -> Case:
    def build(tmp: Path) -> list:
        (tmp / "in").mkdir(parents=True, exist_ok=True)
        return gen(tmp, "--model", "mar_mnist", "--checkpoint", make(tmp / "in"), *extra)
    return Case(f"checkpoint-{kind}", "checkpoint", build, check=check)


def _no_marker(tmp: Path, outcome: Outcome) -> Optional[str]:
    return "the pickle executed code" if (tmp / "in" / "pwned").exists() else None


def _pickle_message(tmp: Path, outcome: Outcome) -> Optional[str]:
    line = outcome.stderr.strip()
    if outcome.rc == 2 and not ("safetensors" in line and "--weights" in line and "system" in line):
        return f"the refusal does not say what was refused and what to do: {line}"
    return None


def checkpoint_cases() -> list[Case]:
    import argparse

    import torch

    def truncated(d):
        full = save_safetensors(d / "full.safetensors", mnist_state())
        data = full.read_bytes()
        return write(d / "t.safetensors", data[: len(data) // 2])

    def truncated_pth(d):
        full = save_torch(d / "full.pth", {"model_ema": mnist_state()})
        data = full.read_bytes()
        return write(d / "t.pth", data[: len(data) // 3])

    def int_tensor(d):
        s = mnist_state()
        s["class_emb.weight"] = s["class_emb.weight"].to(torch.int64)
        return save_safetensors(d / "w.safetensors", s)

    return [
        _checkpoint_case("missing", lambda d: d / "nope.pth"),
        _checkpoint_case("directory", lambda d: d),
        _checkpoint_case("empty", lambda d: write(d / "e.pth", b"")),
        _checkpoint_case("garbage-pth", lambda d: write(d / "g.pth", os.urandom(4096))),
        _checkpoint_case("garbage-safetensors", lambda d: write(d / "g.safetensors", os.urandom(4096))),
        _checkpoint_case("text-as-safetensors", lambda d: write(d / "g.safetensors", "hello\n")),
        _checkpoint_case("truncated-safetensors", truncated),
        _checkpoint_case("truncated-pth", truncated_pth),
        _checkpoint_case("zip-not-torch", lambda d: _zip(d / "z.pth")),
        _checkpoint_case("pickle-exec", lambda d: save_torch(d / "evil.pth", {"model_ema": _Evil(d / "pwned")}),
                         check=lambda t, o: _no_marker(t, o) or _pickle_message(t, o)),
        _checkpoint_case("raw-pickle-exec", lambda d: write(d / "evil.pkl", pickle.dumps(_Evil(d / "pwned"))),
                         check=_no_marker),
        _checkpoint_case("namespace-entry", lambda d: save_torch(d / "n.pth", {"model_ema": argparse.Namespace(a=1)})),
        _checkpoint_case("list-entry", lambda d: save_torch(d / "l.pth", {"model_ema": [torch.zeros(2)]})),
        _checkpoint_case("tensor-entry", lambda d: save_torch(d / "l.pth", {"model_ema": torch.zeros(2)})),
        _checkpoint_case("none-entry", lambda d: save_torch(d / "l.pth", {"model_ema": None})),
        _checkpoint_case("top-list", lambda d: save_torch(d / "l.pth", [torch.zeros(2)])),
        _checkpoint_case("top-tensor", lambda d: save_torch(d / "l.pth", torch.zeros(2))),
        _checkpoint_case("int-keys", lambda d: save_torch(d / "l.pth", {1: torch.zeros(2)})),
        _checkpoint_case("nested-dict", lambda d: save_torch(d / "l.pth", {"model_ema": {"a": {"b": torch.zeros(1)}}})),
        _checkpoint_case("only-model-entry", lambda d: save_torch(d / "m.pth", {"model": mnist_state()})),
        _checkpoint_case("wrong-shapes", lambda d: save_safetensors(d / "w.safetensors", {"x": torch.zeros(3)})),
        _checkpoint_case("int-tensor", int_tensor),
        _checkpoint_case("wrong-model", lambda d: save_safetensors(d / "w.safetensors", mnist_state()),
                         extra=("--model", "mar_tiny")),
        Case("checkpoint-vae-garbage", "checkpoint",
             lambda t: gen(t, "--model", "mar_base", "--vae", write(t / "in" / "vae.ckpt", b"junk"))),
    ]


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    return path


def weights_cases() -> list[Case]:
    nan, inf = float("nan"), float("inf")
    return [
        _weights_case("nan-class-emb", _set("class_emb.weight", 0, nan)),
        _weights_case("inf-class-emb", _set("class_emb.weight", 3, inf)),
        _weights_case("neg-inf-last", _set("diffloss.net.final_layer.linear.weight", 0, -inf)),
        _weights_case("nan-pth", _set("class_emb.weight", 5, nan), suffix=".pth"),
        _weights_case("overflow-1e30", _scale(1e30)),
        _weights_case("huge-1e38", _set("class_emb.weight", 0, 3e38)),
    ]


def settings_cases() -> list[Case]:
    bad_overrides = ["sampler.cfg=inf", "sampler.cfg=.inf", "sampler.cfg=1e308", "sampler.cfg=nan", "sampler.cfg=-inf",
                     "sampler.cfg=0.5", "sampler.temperature=.inf", "sampler.temperature=nan", "sampler.temperature=0",
                     "sampler.temperature=-1", "sampler.temperature=1e300", "sampler.num_iter=0", "sampler.num_iter=-3",
                     "sampler.num_iter=10000", "sampler.num_iter=1e9", "sampler.num_iter=abc", "sampler.head_steps=1",
                     "sampler.head_steps=100000", "sampler.cfg_schedule=bogus", "sampler.bogus=1", "backend.dtype=int8",
                     "backend.name=warp", "backend.device=tpu", "backend.device=cuda:7", "sampler.clip_denoised=maybe",
                     "nokey", "plugin_without_dot=1", "sampler.cfg=[1,2]", "sampler.cfg={a: 1}"]
    def build(t, o):
        fast = [f for f in FAST if f.split("=")[0] not in o]  # the bad value comes last either way
        return gen(t, *fast, o, fast=False)
    cases = [Case(f"override-{o}", "settings", lambda t, o=o: build(t, o)) for o in bad_overrides]
    yaml_settings = {
        "cfg-inf": "sampler: {cfg: .inf}", "cfg-1e308": "sampler: {cfg: 1e308}", "cfg-nan": "sampler: {cfg: .nan}",
        "temperature-inf": "sampler: {temperature: .inf}", "temperature-nan": "sampler: {temperature: .nan}",
        "cfg-string": "sampler: {cfg: high}", "num-iter-float": "sampler: {num_iter: 2.5}",
    }
    cases += [Case(f"policy-{k}", "settings", lambda t, v=v: gen(t, "--policy", policy_file(t, v)))
              for k, v in yaml_settings.items()]
    return cases


def plugin_param_cases() -> list[Case]:
    params = {
        "gtr-rates-nan": ("gtr_schedule", "{rates: [.nan, 16.0, 128.0]}"),
        "gtr-rates-inf": ("gtr_schedule", "{rates: [.inf, 16.0, 128.0]}"),
        "gtr-rates-huge": ("gtr_schedule", "{rates: [1e308, 1e308, 1e308]}"),
        "gtr-rates-string": ("gtr_schedule", "{rates: [a, b, c]}"),
        "gtr-rates-scalar": ("gtr_schedule", "{rates: 3.0}"),
        "gtr-order-70": ("gtr_order", "{num_stages: 70}"),
        "gtr-order-100000": ("gtr_order", "{num_stages: 100000}"),
        "gtr-order-0": ("gtr_order", "{num_stages: 0}"),
        "gtr-schedule-70": ("gtr_schedule", "{num_stages: 70, rates: " + str([2.0] * 70) + "}"),
        "gtr-steps-too-many": ("gtr_schedule", "{steps_per_stage: [100, 1, 1]}"),
        "gtr-half-bogus": ("gtr_order", "{continue_half: middle}"),
        "gtr-head-max-1": ("gtr_schedule", "{head_max: 1}"),
        "fts-beta-nan": ("fts", "{beta: .nan, apply_to: all}"),
        "fts-beta-inf": ("fts", "{beta: .inf, apply_to: all}"),
        "fts-beta-0": ("fts", "{beta: 0, apply_to: all}"),
        "fts-needs-gtr": ("fts", "{beta: 0.1}"),
        "fts-detail-1": ("fts", "{detail_steps: 1, apply_to: all}"),
        "lazy-keep-nan": ("lazymar_token_cache", "{keep_ratios: [.nan]}"),
        "lazy-keep-inf": ("lazymar_token_cache", "{keep_ratios: [.inf]}"),
        "lazy-keep-empty": ("lazymar_token_cache", "{keep_ratios: []}"),
        "lazy-keep-2": ("lazymar_token_cache", "{keep_ratios: [2.0]}"),
        "lazy-warmup-0": ("lazymar_token_cache", "{warmup_steps: 0}"),
        "lazy-refresh-0": ("lazymar_cond_cache", "{refresh_interval: 0}"),
        "lazy-dtype": ("lazymar_token_cache", "{cache_dtype: int8}"),
        "lazy-huge-layer": ("lazymar_token_cache", "{selection_layer: 1000000}", "ok"),  # documented: capped
        "head-threshold-nan": ("lazymar_head", "{mlp_reuse_threshold: .nan}"),
        "head-threshold-inf": ("lazymar_head", "{mlp_reuse_threshold: .inf}"),
        "head-skip-99": ("lazymar_head", "{skip_blocks: [99]}"),
        "head-skip-neg": ("lazymar_head", "{skip_blocks: [-1]}"),
        "head-refresh-0": ("lazymar_head", "{refresh_interval: 0}"),
        "head-refresh-float": ("lazymar_head", "{refresh_interval: 2.5}"),
        "recap-head-1": ("recap", "{local_head_steps: 1}"),
        "recap-warmup-neg": ("recap", "{warmup_steps: -1}"),
        "recap-warmup-huge": ("recap", "{warmup_steps: 1000000}", "ok"),  # every step a warm-up step: baseline
        "params-list": ("gtr_order", "[1, 2]"),
        "params-string": ("gtr_order", "hello"),
        "params-unknown-key": ("gtr_order", "{num_stage: 3}"),
        "params-null": ("gtr_order", "null"),
    }
    cases = [Case(f"param-{k}", "plugin-params",
                  lambda t, n=v[0], p=v[1]: gen(t, "--policy", policy_file(t, f"plugins:\n  - name: {n}\n    params: {p}\n")),
                  expect=v[2] if len(v) > 2 else "refuse")
             for k, v in params.items()]
    overrides = ["gtr_order.num_stages=70", "gtr_schedule.rates=[.nan,1,1]", "fts.beta=nan", "fts.beta=inf",
                 "lazymar_head.mlp_reuse_threshold=nan", "gtr_order.bogus=1", "notlisted.x=1"]
    pol = {"gtr_order": "gtr", "gtr_schedule": "gtr", "fts": "gtr_fts", "lazymar_head": "lazymar", "notlisted": "gtr"}
    cases += [Case(f"param-override-{o}", "plugin-params", lambda t, o=o: gen(t, "--policy", pol[o.split(".")[0]], o))
              for o in overrides]
    for cmd in ("validate", "show"):
        cases.append(Case(f"param-{cmd}-params-list", "plugin-params",
                          lambda t, cmd=cmd: ["policy", cmd, policy_file(t, "plugins:\n  - name: gtr_order\n    params: [1, 2]\n")]))
    return cases


def policy_cases() -> list[Case]:
    texts = {
        "yaml-syntax": "sampler: {cfg: [1, 2\n", "list-root": "- 1\n- 2\n", "scalar-root": "42\n",
        "binary": b"\x00\xff\xfe\x89PNG\r\n\x1a\n" + os.urandom(64), "unknown-top": "bogus: 1\n",
        "unknown-plugin": "plugins:\n  - name: warp_drive\n", "plugin-no-name": "plugins:\n  - params: {}\n",
        "plugin-builtin": "plugins:\n  - name: ddpm_head\n", "plugins-mapping": "plugins: {name: gtr_order}\n",
        "dup-plugin": "plugins:\n  - name: lazymar_head\n  - name: lazymar_head\n",
        "dup-gtr-order": "plugins:\n  - name: gtr_order\n  - name: gtr_order\n",
        "two-orders": "plugins:\n  - name: gtr_order\n  - name: recap\n  - name: gtr_order\n    params: {num_stages: 2}\n",
        "disable-unknown": "disable: [warp]\n", "disable-string": "disable: ddpm_head\n",
        "disable-forward": "disable: [full_recompute]\n", "disable-order": "disable: [random_order]\n",
        "disable-schedule": "disable: [cosine_schedule]\n", "disable-head": "disable: [ddpm_head]\n",
        "disable-cfg": "disable: [linear_cfg]\nsampler: {cfg: 2.0}\n",
        "oc-env": "description: ${oc.env:HOME}\n", "oc-env-default": "name: ${oc.env:MARCACHE_NOPE,leak}\n",
        "oc-decode": "sampler: {num_iter: '${oc.decode:\"2\"}'}\n", "custom-resolver": "name: ${nope:x}\n",
        "interp-missing": "sampler: {cfg: '${nothing.here}'}\n", "interp-loop": "name: ${description}\ndescription: ${name}\n",
        "deep-nesting": "a: " + "[" * 5000 + "]" * 5000 + "\n", "huge-anchors": _billion_laughs(),
        "name-list": "name: [1, 2]\n", "sampler-list": "sampler: [1, 2]\n",
    }
    cases = [Case(f"policy-{k}", "policy", lambda t, v=v: gen(t, "--policy", policy_file(t, v))) for k, v in texts.items()]
    cases += [
        Case("policy-missing-file", "policy", lambda t: gen(t, "--policy", t / "nope.yaml")),
        Case("policy-unknown-name", "policy", lambda t: gen(t, "--policy", "warpdrive")),
        Case("policy-directory", "policy", lambda t: gen(t, "--policy", (t / "in.yaml").mkdir() or t / "in.yaml")),
        Case("policy-validate-oc-env", "policy",
             lambda t: ["policy", "show", policy_file(t, "description: ${oc.env:HOME}\n")]),
        Case("policy-override-oc-env", "policy", lambda t: ["policy", "show", "baseline", "description=${oc.env:HOME}"]),
        Case("policy-override-oc-env-gen", "policy", lambda t: gen(t, "name=${oc.env:HOME}")),
    ]
    return cases


def _billion_laughs() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    return "\n".join(lines) + "\n"


def argument_cases() -> list[Case]:
    args = {
        "num-images-0": ["--num-images", "0"], "num-images-neg": ["--num-images", "-5"],
        "num-images-huge": ["--num-images", str(10**12)], "num-images-float": ["--num-images", "2.5"],
        "batch-0": ["--batch-size", "0"], "batch-neg": ["--batch-size", "-1"],
        "labels-abc": ["--labels", "a,b"], "labels-99": ["--labels", "99"], "labels-neg": ["--labels", "-1"],
        "labels-mismatch": ["--labels", "1,2,3", "--num-images", "2"], "labels-empty": ["--labels", ","],
        "labels-huge-repeat": ["--labels", "3", "--num-images", str(10**12)],
        "labels-overflow": ["--labels", str(2**70)],
        "model-unknown": ["--model", "mar_gigantic"], "weights-bad": ["--weights", "latest"],
        "backend-bad": ["--backend", "tpu"], "latent-without-vae": ["--model", "mar_base"],
    }
    cases = [Case(f"arg-{k}", "arguments", lambda t, a=a: [*gen(t), *a]) for k, a in args.items()]
    cases.append(Case("arg-seed-huge", "arguments", lambda t: [*gen(t), "--seed", str(2**80)], expect="ok"))  # any int seeds
    eval_args = {
        "num-samples-huge": ["--num-samples", str(10**12)], "num-samples-1": ["--num-samples", "1"],
        "num-samples-neg": ["--num-samples", "-4"], "shard-size-0": ["--shard-size", "0"],
        "shard-size-neg": ["--shard-size", "-2"], "batch-0": ["--batch-size", "0"], "threads-0": ["--threads", "0"],
        "features-mnist-imagenet": ["--model", "mar_base", "--vae", "random", "--features", "mnist"],
        "reference-missing": ["--reference-stats", "nope.npz"],
        "classifier-garbage": ["--classifier", "CLASSIFIER"],
    }

    def eval_build(t, a):
        a = [str(write(t / "in" / "c.safetensors", b"junk")) if x == "CLASSIFIER" else x for x in a]
        return ["eval", "--num-samples", str(EVAL_N), "--shard-size", str(EVAL_SHARD), "--batch-size", "2",
                "--out", t / "out", "--cache-root", cache_root(), "--json", "--no-progress", *a, *FAST]
    cases += [Case(f"eval-arg-{k}", "arguments", lambda t, a=a: eval_build(t, a)) for k, a in eval_args.items()]
    return cases


class _DiskFull:
    """Writes under ``folder`` fail with ENOSPC once ``budget`` bytes were written there (a filling disk)."""

    def __init__(self, folder: Path, budget: int):
        self.folder, self.budget = str(folder), budget

    def __enter__(self):
        import builtins

        self._open = builtins.open
        guard = self

        class Full:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                guard.budget -= len(data)
                if guard.budget < 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def __iter__(self):
                return iter(self._f)

        def fake_open(file, mode="r", *args, **kwargs):
            f = guard._open(file, mode, *args, **kwargs)
            if any(m in mode for m in "wax+") and os.path.abspath(str(file)).startswith(guard.folder):
                return Full(f)
            return f

        builtins.open = fake_open
        io_open, io.open = io.open, fake_open
        self._io_open = io_open
        return self

    def __exit__(self, *exc):
        import builtins

        builtins.open = self._open
        io.open = self._io_open
        return False


def output_cases() -> list[Case]:
    def existing_file(t):
        return gen(t, out=write(t / "out", "I am a file"))

    def under_file(t):
        write(t / "in" / "f", "x")
        return gen(t, out=t / "in" / "f" / "sub")

    cases = [
        Case("out-existing-file", "output", existing_file, check=lambda t, o: None),
        Case("out-under-file", "output", under_file),
        Case("out-proc", "output", lambda t: gen(t, out="/proc/marcache-out")),
        Case("out-dev-null", "output", lambda t: gen(t, out="/dev/null")),
        Case("out-empty-string", "output", lambda t: gen(t, out="")),
        Case("eval-out-existing-file", "output", lambda t: ["eval", "--num-samples", str(EVAL_N), "--json",
                                                              "--no-progress", "--out", write(t / "out", "file"), *FAST]),
        Case("eval-out-proc", "output", lambda t: ["eval", "--num-samples", str(EVAL_N), "--json", "--no-progress",
                                                     "--out", "/proc/marcache-eval", *FAST]),
    ]
    for budget in (0, 100, 600, 5000):
        cases.append(Case(f"out-disk-full-{budget}", "output",
                          lambda t: gen(t, "--num-images", "3", "--trace"), patch=lambda t, b=budget: _DiskFull(t / "out", b)))
    for budget in (0, 3000, 12000):
        cases.append(Case(f"eval-disk-full-{budget}", "output", lambda t: _eval_argv(t),
                          patch=lambda t, b=budget: _DiskFull(t / "out", b)))
    return cases


# --------------------------------------------------------------------------- eval resume
def _eval_argv(tmp: Path, out: Optional[Path] = None) -> list:
    return ["eval", "--num-samples", str(EVAL_N), "--shard-size", str(EVAL_SHARD), "--batch-size", "2", "--seed", "0",
            "--out", out or tmp / "out", "--cache-root", cache_root(), "--json", "--no-progress", *FAST]


METRICS = ("fid", "kid", "precision", "recall", "inception_score", "class_accuracy", "num_samples")


def reference_eval() -> tuple[Path, dict]:
    """An uninterrupted eval (once per process): its folder and its metrics."""
    if "ref" not in _STATE:
        folder = Path(tempfile.mkdtemp(prefix="marcache-hostile-ref-")) / "out"
        outcome = run_main(_eval_argv(folder.parent, folder), 600)
        if outcome.rc != 0:
            raise RuntimeError(f"the reference eval failed: {outcome.error or outcome.stderr}")
        _STATE["ref"] = (folder, json.loads(outcome.stdout))
    return _STATE["ref"]


def _same_metrics(tmp: Path, outcome: Outcome) -> Optional[str]:
    if outcome.rc != 0:
        return None
    _, ref = reference_eval()
    try:
        got = json.loads(outcome.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"no JSON result on stdout: {outcome.stdout[-200:]!r}"
    diff = [k for k in METRICS if got.get(k) != ref.get(k)]
    if diff:
        return "metrics differ from an uninterrupted run: " + ", ".join(f"{k} {got.get(k)} vs {ref.get(k)}" for k in diff)
    return None


def _resume_case(kind: str, corrupt: Callable[[Path], None], expect: str = "ok") -> Case:
    def build(tmp: Path) -> list:
        ref, _ = reference_eval()
        shutil.copytree(ref, tmp / "out")
        corrupt(tmp / "out")
        return _eval_argv(tmp)
    return Case(f"resume-{kind}", "resume", build, expect=expect, check=_same_metrics if expect == "ok" else None,
                ignore=("manifest.json",) if expect == "refuse" else ())


def _npz(folder: Path, index: int = 1) -> Path:
    return folder / f"shard-{index:05d}.npz"


def _rewrite_shard(folder: Path, edit: Callable[[dict], dict], index: int = 1) -> None:
    path = _npz(folder, index)
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    np.savez(path, **edit(data))


def resume_cases() -> list[Case]:
    def truncate(f):
        data = _npz(f).read_bytes()
        _npz(f).write_bytes(data[: len(data) // 2])

    def zeroed(d):
        return d | {"images": np.zeros_like(d["images"])}

    def fewer(d):
        return d | {"images": d["images"][:1]}

    def fewer_all(d):
        return {k: (v[:1] if np.ndim(v) else v) for k, v in d.items()}

    def wrong_ids(d):
        return d | {"sample_ids": d["sample_ids"] + 100}

    def wrong_dtype(d):
        return d | {"images": d["images"].astype(np.float32)}

    def missing_key(d):
        return {k: v for k, v in d.items() if k != "labels"}

    def flipped_labels(d):
        return d | {"labels": (d["labels"] + 1) % 10}

    def pickled(f):
        np.savez(_npz(f), images=np.array([object()], dtype=object))

    def manifest_edit(fn):
        def corrupt(f):
            m = f / "manifest.json"
            m.write_text(fn(m.read_text()))
        return corrupt

    cases = [
        _resume_case("missing-shard", lambda f: _npz(f).unlink()),
        _resume_case("truncated-shard", truncate),
        _resume_case("garbage-shard", lambda f: _npz(f).write_bytes(os.urandom(3000))),
        _resume_case("empty-shard", lambda f: _npz(f).write_bytes(b"")),
        _resume_case("zeroed-images", lambda f: _rewrite_shard(f, zeroed)),
        _resume_case("fewer-images-than-ids", lambda f: _rewrite_shard(f, fewer)),
        _resume_case("shorter-shard", lambda f: _rewrite_shard(f, fewer_all)),
        _resume_case("wrong-ids", lambda f: _rewrite_shard(f, wrong_ids)),
        _resume_case("float-images", lambda f: _rewrite_shard(f, wrong_dtype)),
        _resume_case("missing-key", lambda f: _rewrite_shard(f, missing_key)),
        _resume_case("altered-labels", lambda f: _rewrite_shard(f, flipped_labels)),
        _resume_case("object-array", pickled),
        _resume_case("shard-is-directory", lambda f: (_npz(f).unlink(), _npz(f).mkdir()), expect="refuse"),
        _resume_case("stale-tmp", lambda f: (_npz(f).rename(f / "shard-00001.tmp4242.npz"))),
        _resume_case("stale-tmp-garbage", lambda f: write(f / "shard-00002.tmp999999.npz", os.urandom(100))),
        _resume_case("manifest-no-complete", manifest_edit(lambda s: s.replace('"complete": true', '"complete": false'))),
        _resume_case("manifest-garbage", manifest_edit(lambda s: s[: len(s) // 2]), expect="refuse"),
        _resume_case("manifest-empty", manifest_edit(lambda s: ""), expect="refuse"),
        _resume_case("manifest-list", manifest_edit(lambda s: "[1, 2]"), expect="refuse"),
        _resume_case("manifest-description-string", manifest_edit(lambda s: '{"description": "x"}'), expect="refuse"),
        _resume_case("manifest-other-run", manifest_edit(lambda s: s.replace('"seed": 0', '"seed": 7')), expect="refuse"),
        _resume_case("manifest-directory", lambda f: ((f / "manifest.json").unlink(), (f / "manifest.json").mkdir()),
                     expect="refuse"),
    ]
    return cases


def concurrency_cases() -> list[Case]:
    def two_evals(tmp: Path) -> list:
        return [_eval_argv(tmp)[:-len(FAST)] + ["--threads", "1", *FAST]] * 2

    def check(tmp: Path, outcome: Outcome) -> Optional[str]:
        results = [json.loads(line) for line in outcome.stdout.splitlines() if line.startswith("{")]
        if len(results) != 2:
            return f"expected two JSON results, got {len(results)}"
        generated = sum(r.get("generated_now") or 0 for r in results)
        if generated != EVAL_N:
            return f"{generated} samples generated by the two evals together (each of {EVAL_N} once expected)"
        return _same_metrics(tmp, Outcome(0, json.dumps(results[0]), "")) or _same_metrics(tmp, Outcome(0, json.dumps(results[1]), ""))

    return [Case("concurrent-identical-evals", "concurrency", two_evals, expect="ok", check=check, subprocess=True,
                 timeout=300)]


def runtime_cases() -> list[Case]:
    """Policies that validate but may be refused by the model at run time: clean either way."""
    from marcache.policy import list_shipped_policies

    combos = [("num-iter-100", ["sampler.num_iter=100"]), ("num-iter-49", ["sampler.num_iter=49"]),
              ("float16", ["backend.dtype=float16"]), ("bfloat16", ["backend.dtype=bfloat16"]),
              ("cuda", ["backend.name=cuda"]), ("device-cuda", ["backend.device=cuda"]),
              ("constant-cfg", ["sampler.cfg_schedule=constant", "sampler.cfg=3.0"])]
    cases = []
    for name in list_shipped_policies():
        for label, overrides in combos:
            cases.append(Case(f"runtime-{name}-{label}", "runtime",
                              lambda t, n=name, o=overrides: gen(t, "--policy", n, *o, fast=False) + ["sampler.head_steps=2"],
                              expect="any"))
    texts = {
        "fts-all-no-gtr": "plugins:\n  - name: fts\n    params: {apply_to: all}\n",
        "fts-reconstruction-no-gtr": "plugins:\n  - name: fts\n",
        "lazymar-head-skip-9": "plugins:\n  - name: lazymar_head\n    params: {skip_blocks: [9]}\n",
        "gtr-steps-50": "plugins:\n  - name: gtr_schedule\n    params: {steps_per_stage: [50, 1, 1]}\n",
        "gtr-16-stages": "plugins:\n  - name: gtr_order\n    params: {num_stages: 16}\n",
        "gtr-schedule-16": "plugins:\n  - name: gtr_order\n    params: {num_stages: 16}\n  - name: gtr_schedule\n"
                           "    params: {num_stages: 16, rates: " + str([1.0] * 16) + "}\n",
        "lazy-mismatch": "plugins:\n  - name: lazymar_token_cache\n    params: {warmup_steps: 2}\n"
                         "  - name: lazymar_cond_cache\n    params: {warmup_steps: 3}\n",
        "recap-gtr": "plugins:\n  - name: gtr_order\n  - name: gtr_schedule\n  - name: recap\n",
        "constant-disabled": "disable: [constant_cfg]\nsampler: {cfg_schedule: constant, cfg: 2.0}\n",
        "no-cfg-plugins": "disable: [linear_cfg, constant_cfg]\nsampler: {cfg: 2.0}\n",
        "recap-local-9": "plugins:\n  - name: recap\n    params: {local_per_group: 9, warmup_steps: 0}\n",
    }
    cases += [Case(f"runtime-{k}", "runtime", lambda t, v=v: gen(t, "--policy", policy_file(t, v), fast=False)
                   + ["sampler.head_steps=2"], expect="any") for k, v in texts.items()]
    return cases


def all_cases() -> list[Case]:
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
    sys.exit(main())
