"""Composition: every pair of built-in accelerators, and scheduling invariants over random stacks."""

import functools
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny, rel_err
from marcache.errors import PluginError
from marcache.flops import policy_flops
from marcache.plugin import available_plugins
from marcache.plugins.cfg_schedules import linear_cfg_scale
from marcache.policy import resolve_policy
from marcache.scheduler import Sampler
from marcache.testing import HeadChainCounter, StepRecorder, check_scheduling_invariants

def registered_accelerators() -> list[str]:
    """Every built-in accelerator in the plugin registry: marcache's own plugins that are not part of
    the official sampler and change a decision (not observers such as ``trace``)."""
    return sorted(n for n, cls in available_plugins().items()
                  if cls.__module__.startswith("marcache.plugins.") and not cls.builtin and cls.families - {"accounting"})


# Small-model settings of each accelerator this file composes ({} = its defaults). A new built-in
# accelerator must be added here: test_every_registered_accelerator_is_covered fails until it is.
# LazyMAR selects at decoder layer 3; the head skips blocks 1-4 of 6.
COVERED = {
    "fts": {"detail_steps": 16},
    "gtr_order": {},
    "gtr_schedule": {"head_max": 20, "head_min": 8, "head_rec": 8},
    "lazymar_cond_cache": {"warmup_steps": 2, "refresh_interval": 3},
    "lazymar_head": {},
    "lazymar_token_cache": {"warmup_steps": 2, "refresh_interval": 3, "cache_dtype": "float32"},
    "recap": {},
    "disa": {"upper_steps": 20, "lower_steps": 4},
    "halton_order": {},
    # threshold 0: a refresh after every lazy pass with any drift, the same decisions in a batch and alone
    "drift_refresh": {"threshold": 0.0},
}
ACCELERATORS = [n for n in registered_accelerators() if n in COVERED]
PARAMS = COVERED
HEAD_STEPS = 24


@functools.lru_cache(maxsize=None)
def model_for(grid):
    return make_tiny(grid, decoder_depth=4, diffloss_d=6)


def policy_of(names, cfg=3.0, num_iter=8, **sampler):
    plugins = []
    if "drift_refresh" in names and "lazymar_token_cache" not in names:  # the caches it refreshes
        names = ["lazymar_token_cache", *names]
    for name in names:
        params = dict(PARAMS.get(name, {}))
        if name == "fts" and "gtr_schedule" not in names:
            params["apply_to"] = "all"
        plugins.append({"name": name, "params": params})
    return resolve_policy({"sampler": {"num_iter": num_iter, "cfg": cfg, "head_steps": HEAD_STEPS, **sampler}, "plugins": plugins})


def conflicting(names):
    classes = available_plugins()
    return any(other in names for n in names for other in classes[n].conflicts)


def test_every_registered_accelerator_is_covered():
    missing = sorted(set(registered_accelerators()) - set(COVERED))
    assert not missing, f"accelerators registered but not composed by this file: {missing}; add them to COVERED"
    assert set(ACCELERATORS) == set(COVERED), f"COVERED names unregistered plugins: {sorted(set(COVERED) - set(ACCELERATORS))}"


PAIRS = list(itertools.combinations(ACCELERATORS, 2))


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "+".join(p))
def test_every_pair(pair):
    model = model_for(4)
    if conflicting(pair):
        with pytest.raises(PluginError, match="conflict"):
            Sampler(model, policy_of(pair))
        return
    watcher = StepRecorder()
    sampler = Sampler(model, policy_of(pair), extra_plugins=[watcher])
    result = sampler.generate(labels=[3, 8], seed=2)
    predicted = sum(s.mask_to_pred.long() for s, _ in watcher.steps)
    assert torch.equal(predicted, torch.ones_like(predicted))
    assert torch.isfinite(result.tokens).all() and watcher.stale_reads == 0
    base = policy_flops(model, policy_of([]), num_images=2)["tflops_per_image"]
    assert policy_flops(model, policy_of(pair), num_images=2)["tflops_per_image"] <= base * (1 + 1e-9)
    alone = torch.cat([sampler.generate(labels=[lab], seed=2, sample_offset=i).tokens for i, lab in enumerate([3, 8])])
    assert rel_err(result.tokens, alone) < 1e-5


@st.composite
def stacks(draw):
    names = draw(st.lists(st.sampled_from(ACCELERATORS), unique=True, max_size=4))
    names = [n for i, n in enumerate(names) if not conflicting(names[: i + 1])]
    return dict(names=draw(st.permutations(names)), grid=draw(st.integers(3, 4)), num_iter=draw(st.integers(4, 9)),
                batch=draw(st.integers(1, 2)), cfg=draw(st.sampled_from([1.0, 3.0])), seed=draw(st.integers(0, 999)))


@settings(max_examples=12)
@given(stacks())
def test_scheduling_invariants_of_random_stacks(params):
    model = model_for(params["grid"])
    policy = policy_of(params["names"], cfg=params["cfg"], num_iter=params["num_iter"])
    watcher = StepRecorder()
    sampler = Sampler(model, policy, extra_plugins=[watcher])
    labels = list(range(params["batch"]))
    result = sampler.generate(labels=labels, seed=params["seed"])
    seq_len, b = model.seq_len, params["batch"]
    # 1-5 and finite tokens: orders are permutations, each token predicted once, equal counts >= 1
    # summing to L, a token stays masked until the last step, caches never serve an uncomputed position
    check_scheduling_invariants(watcher, result)
    # 6. the guidance scale follows the schedule, whatever the stack
    masked = seq_len
    for s, _ in watcher.steps:
        masked -= s.tokens_this_step
        # recap (final_step_cfg: release) gives the last step the released mask length 0
        last = "recap" in params["names"] and s.step == s.num_steps - 1
        expected = 1.0 if params["cfg"] == 1.0 else linear_cfg_scale(params["cfg"], seq_len, 0 if last else max(masked, 1))
        assert s.cfg_scale == expected
    # 8. no state leaks between generations (same call, same result)
    sampler.generate(labels=[0], seed=params["seed"] + 1)
    again = sampler.generate(labels=labels, seed=params["seed"])
    assert rel_err(again.tokens, result.tokens) < 1e-6
    # 9. batch invariance
    alone = torch.cat([sampler.generate(labels=[lab], seed=params["seed"], sample_offset=i).tokens for i, lab in enumerate(labels)])
    assert rel_err(result.tokens, alone) < 1e-5
    # 10. FLOPs never exceed the baseline's
    base = policy_flops(model, policy_of([], cfg=params["cfg"], num_iter=params["num_iter"]), num_images=b)["tflops_per_image"]
    assert policy_flops(model, policy, num_images=b)["tflops_per_image"] <= base * (1 + 1e-9)


@pytest.mark.parametrize("extra", ["gtr_order", "gtr_schedule", "lazymar_token_cache", "lazymar_cond_cache", "recap"])
def test_head_budgets_honoured(extra):
    """11. the DDPM rows x steps that ran equal what the plans asked for."""
    model = make_tiny(3, decoder_depth=4, diffloss_d=6)
    names = ["fts", extra] if extra != "gtr_schedule" else ["gtr_schedule", "fts"]
    watcher = StepRecorder()
    with HeadChainCounter(model) as counter:
        Sampler(model, policy_of(names, cfg=1.0), extra_plugins=[watcher]).generate(labels=[1, 2], seed=0)
    asked = sum(steps * rows for _, r in watcher.steps for steps, rows in r.head_rows_by_steps.items())
    assert counter.rows_steps == asked


def flops_of(model, names, overrides):
    policy = policy_of(names)
    policy = resolve_policy({"sampler": {"num_iter": 8, "cfg": 3.0, "head_steps": HEAD_STEPS},
                             "plugins": [{"name": n, "params": {**PARAMS.get(n, {}), **overrides.get(n, {})}} for n in names]})
    return policy_flops(model, policy, num_images=1)["tflops_per_image"]


@pytest.mark.parametrize("name,key,values", [
    ("lazymar_token_cache", "refresh_interval", [1, 2, 4, 8]),
    ("recap", "warmup_steps", [8, 6, 4, 2]),
    ("lazymar_head", "refresh_interval", [1, 3, 7, 14]),
])
def test_flops_monotone_in_aggressiveness(name, key, values):
    """12. more aggressive settings never cost more."""
    model = model_for(4)
    names = [name, "lazymar_cond_cache"] if name == "lazymar_token_cache" else [name]
    flops = []
    for v in values:
        over = {name: {key: v}}
        if name == "lazymar_token_cache":
            over["lazymar_cond_cache"] = {key: v}
        if name == "lazymar_head":
            over[name]["scale_with_head_steps"] = False
        flops.append(flops_of(model, names, over))
    assert all(a >= b for a, b in zip(flops, flops[1:])) and flops[0] > flops[-1]
