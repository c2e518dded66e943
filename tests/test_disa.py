"""DiSA: annealed head budgets (range, monotonicity, the release's formulas) and its capped respacing."""

import math

import pytest
import torch

from conftest import make_tiny, rel_err
from marcache.errors import ConfigError
from marcache.models.diffusion import capped_timesteps, respaced_timesteps
from marcache.policy import load_policy, resolve_policy
from marcache.plugins.disa import STRATEGIES, DiSAConfig, disa_budget
from marcache.scheduler import Sampler
from marcache.testing import StepRecorder


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("upper,lower", [(50, 5), (25, 5), (100, 2), (7, 7)])
def test_budgets_monotone_and_in_range_for_every_step_count(strategy, upper, lower):
    cfg = DiSAConfig(upper_steps=upper, lower_steps=lower, strategy=strategy)
    for num_steps in range(1, 257):
        budgets = [disa_budget(s, num_steps, cfg) for s in range(num_steps)]
        assert all(lower <= b <= upper for b in budgets), (num_steps, budgets)
        assert all(a >= b for a, b in zip(budgets, budgets[1:])), (num_steps, budgets)
        if strategy != "constant":
            assert budgets[0] == upper
        if num_steps > 1:
            assert budgets[-1] == lower


def test_release_recipe_values():
    """The release's schedule index, recomputed here from its formula, for 64 AR steps 50 -> 5."""
    n_diffusions = 50 - 5 + 1
    for strategy in ("linear", "cosine", "two-stage"):
        cfg = DiSAConfig(strategy=strategy)
        for step in range(64):
            if strategy == "linear":
                index = int((63 - step) / 63 * (n_diffusions - 1))
            elif strategy == "cosine":
                index = int((math.cos(math.pi * step / 63) + 1) / 2 * (n_diffusions - 1))
            else:
                index = n_diffusions - 1 if step < 63 / 2 else 0
            assert disa_budget(step, 64, cfg) == 5 + index
    linear = [disa_budget(s, 64, DiSAConfig()) for s in range(64)]
    assert linear[:3] == [50, 49, 48] and linear[-2:] == [5, 5]


def test_capped_respacing_merges_clipped_timesteps():
    plain = respaced_timesteps(1000, "50")
    capped = capped_timesteps("50@950")
    assert capped == sorted({min(t, 950) for t in plain}) and len(capped) == 48 and capped[-1] == 950
    assert capped_timesteps("5@950") == [0, 250, 500, 749, 950]
    assert capped_timesteps("50") == plain
    with pytest.raises(ValueError, match="cap"):
        capped_timesteps("50@x")


def test_config_validation():
    for bad in (dict(lower_steps=1), dict(upper_steps=4, lower_steps=5), dict(strategy="exp"), dict(timestep_cap=1000)):
        with pytest.raises(ValueError):
            DiSAConfig(**bad)
    with pytest.raises(ConfigError, match="plugins\\[0\\].params"):
        resolve_policy({"plugins": [{"name": "disa", "params": {"lower_steps": 0}}]})


def test_budgets_and_capped_chains_run_as_planned():
    """Every token of step s runs the capped chain of disa_budget(s); records count the steps that ran."""
    model = make_tiny(3)
    recorder = StepRecorder()
    policy = resolve_policy({"sampler": {"num_iter": 6, "cfg": 2.0, "head_steps": 40},
                             "plugins": [{"name": "disa", "params": {"upper_steps": 30, "lower_steps": 4}}]})
    sampler = Sampler(model, policy, extra_plugins=[recorder])
    result = sampler.generate(labels=[1, 2], seed=0)
    cfg = DiSAConfig(upper_steps=30, lower_steps=4)
    for (step, record), logged in zip(recorder.steps, result.report["steps"]):
        budget = disa_budget(step.step, 6, cfg)
        ran = model.diffloss.schedule(f"{budget}@950").num_timesteps
        assert record.head_rows_by_steps == {ran: 2 * 2 * step.tokens_this_step}
        assert logged["head_budget"]["effective"] == [budget, budget] and logged["head_budget"]["timestep_cap"] == 950
    section = result.report["engagement"]["disa"]
    assert section["budget_per_step"] == [disa_budget(s, 6, cfg) for s in range(6)]
    # batch invariance and determinism
    alone = torch.cat([sampler.generate(labels=[lab], seed=0, sample_offset=i).tokens for i, lab in enumerate([1, 2])])
    assert rel_err(result.tokens, alone) < 1e-5


def test_uncapped_disa_equals_plain_budget_of_the_baseline():
    """timestep_cap: null and a constant budget equal to head_steps is the baseline, exactly."""
    model = make_tiny(3)
    base = load_policy("baseline", ["sampler.num_iter=4", "sampler.head_steps=12"])
    disa = resolve_policy({"sampler": {"num_iter": 4, "head_steps": 12},
                           "plugins": [{"name": "disa", "params": {"upper_steps": 12, "lower_steps": 12, "timestep_cap": None}}]})
    a = Sampler(model, base).generate(labels=[0, 3], seed=1).tokens
    b = Sampler(model, disa).generate(labels=[0, 3], seed=1).tokens
    assert torch.equal(a, b)
