"""The hostile-input catalogue, part 1: checkpoints, weights, sampler settings, plugin parameters, policy
files and command-line arguments (see ``tests/hostile.py`` for the runner and the outcome classes)."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Optional

from hostile import (EVAL_N, EVAL_SHARD, FAST, Case, Outcome, cache_root, gen, mnist_state, policy_file,
                     save_safetensors, save_torch, write)


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
        Case("checkpoint-vae-garbage", "checkpoint",  # builds mar_base (random init) first: minutes under load
             lambda t: gen(t, "--model", "mar_base", "--vae", write(t / "in" / "vae.ckpt", b"junk")), timeout=900),
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
        "reference-missing": ["--reference-stats", "nope.npz"],
        "classifier-garbage": ["--classifier", "CLASSIFIER"],
    }

    def eval_build(t, a):
        a = [str(write(t / "in" / "c.safetensors", b"junk")) if x == "CLASSIFIER" else x for x in a]
        return ["eval", "--num-samples", str(EVAL_N), "--shard-size", str(EVAL_SHARD), "--batch-size", "2",
                "--out", t / "out", "--cache-root", cache_root(), "--json", "--no-progress", *a, *FAST]
    cases += [Case(f"eval-arg-{k}", "arguments", lambda t, a=a: eval_build(t, a)) for k, a in eval_args.items()]
    return cases
