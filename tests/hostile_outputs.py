"""The hostile-input catalogue, part 2: output folders (existing files, disk full), eval resume after every
kind of corruption, two identical evals at once, and policies refused only at run time (see
``tests/hostile.py`` for the runner and the outcome classes)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from hostile import (EVAL_N, EVAL_SHARD, FAST, Case, Outcome, _STATE, cache_root, gen, policy_file, run_main, write)


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
                 timeout=900)]  # two processes importing torch on a shared 2-core machine


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
