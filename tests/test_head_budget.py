"""The head-budget rule: caps combine by min whatever the order, raisers lift after; every pair of budget plugins."""

import itertools

import pytest
import torch

from conftest import make_tiny
from marcache.errors import PluginError
from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin
from marcache.plugins.disa import DiSAConfig, disa_budget
from marcache.plugins.gtr import GtRScheduleConfig, gtr_plan, head_steps_for
from marcache.plugins.recap import ReCAPConfig, step_kind
from marcache.policy import resolve_policy
from marcache.scheduler import Sampler

HEAD_STEPS = 30
PARAMS = {
    "gtr_schedule": {"head_max": 26, "head_min": 8, "head_rec": 12},
    "recap": {"local_head_steps": 10},
    "disa": {"upper_steps": 24, "lower_steps": 4, "timestep_cap": None},
    "fts": {"detail_steps": 28, "beta": 0.25},
}
BUDGET_PLUGINS = list(PARAMS)


def policy_of(names):
    plugins = []
    for name in names:
        params = dict(PARAMS[name])
        if name == "fts" and "gtr_schedule" not in names:
            params["apply_to"] = "all"
        plugins.append({"name": name, "params": params})
    return resolve_policy({"sampler": {"num_iter": 8, "cfg": 2.0, "head_steps": HEAD_STEPS}, "plugins": plugins})


def expected_caps(names, step, num_steps, grid):
    """Each cap plugin's own budget at this step (None: it proposes nothing)."""
    caps = {}
    if "gtr_schedule" in names:
        cfg = GtRScheduleConfig(**PARAMS["gtr_schedule"])
        caps["gtr_schedule"] = head_steps_for(gtr_plan(grid, grid, cfg)[1], cfg)[step]
    if "recap" in names and step_kind(step, num_steps, ReCAPConfig(**PARAMS["recap"]))[0] == "local":
        caps["recap"] = PARAMS["recap"]["local_head_steps"]
    if "disa" in names:
        caps["disa"] = disa_budget(step, num_steps, DiSAConfig(**PARAMS["disa"]))
    return caps


@pytest.fixture(scope="module")
def model():
    return make_tiny(4)


@pytest.mark.parametrize("pair", list(itertools.combinations(BUDGET_PLUGINS, 2)), ids="+".join)
def test_rule_for_every_pair(model, pair):
    results = []
    for names in (pair, pair[::-1]):  # the policy order does not matter
        result = Sampler(model, policy_of(names)).generate(labels=[1, 6], seed=4)
        log = result.report["head_budget_per_step"]
        num_steps = len(log)
        for step, entry in enumerate(log):
            caps = expected_caps(names, step, num_steps, 4)
            assert entry["caps"] == caps, (step, entry)
            capped = min([HEAD_STEPS, *caps.values()])
            lo, hi = entry["effective"]
            if "fts" in entry["raises"]:  # raised tokens get at least the detail budget, the others the min
                raised = max(capped, PARAMS["fts"]["detail_steps"])
                assert hi == raised and lo in (capped, raised)
            else:
                assert lo == hi == capped
        results.append(result)
    assert torch.equal(results[0].tokens, results[1].tokens)
    assert results[0].report["head_budget_per_step"] == results[1].report["head_budget_per_step"]


class Overwriter(Plugin):
    """Writes budgets directly (what silently wiped another plugin's budget before the rule)."""

    name = "test_budget_overwriter"
    families = frozenset({"head"})

    @hookimpl
    def marcache_head_plan(self, step, plan, z):
        plan.steps.fill_(3)


def test_writing_budgets_directly_fails_loudly(model):
    with pytest.raises(PluginError, match="HeadPlan.cap"):
        Sampler(model, policy_of(["disa"]), extra_plugins=[Overwriter()]).generate(labels=[0], seed=0)
