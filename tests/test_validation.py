"""Validation names the culprit: `policy validate` = what generate checks; plan errors name the plugin
and the sample; wrong types refused in one line; pluggy's argument line kept."""

from dataclasses import dataclass

import pytest
import torch

import marcache.plugin as plugin_mod
from marcache.cli import main
from marcache.errors import PluginError
from marcache.hookspecs import hookimpl
from marcache.plans import HEAD_STEPS_MAX, HEAD_STEPS_MIN, require_head_steps
from marcache.plugin import Plugin, available_plugins, build_plugin_manager, register_plugin
from marcache.policy import list_shipped_policies, policy_path, resolve_policy
from marcache.scheduler import Sampler

SMALL = ["sampler.num_iter=4", "sampler.head_steps=3"]


@pytest.fixture
def registry(monkeypatch):
    """A scratch copy of the global registry: test plugins vanish after the test."""
    available_plugins()
    monkeypatch.setattr(plugin_mod, "_REGISTRY", dict(plugin_mod._REGISTRY))
    return plugin_mod._REGISTRY


@dataclass
class RampConfig:
    end: int = 3  # unchecked on purpose: the error only shows at the last AR step


def _plugin(name, family, **methods):
    return register_plugin(type(name, (Plugin,), {"name": name, "families": frozenset({family}), **methods}))


def _last_step_budget(self, step, plan, z):
    if step.is_last:
        plan.steps.fill_(self.config.end)
        plan.owner = self.name


def _register_culprits():
    """Plugins a user could write from docs/ alone, each wrong in one way."""
    _plugin("halton_test", "order", marcache_token_order=lambda self, gen: torch.stack(
        [torch.randperm(gen.seq_len, generator=g) for g in gen.generators]))
    register_plugin(type("Ramp", (Plugin,), {"name": "ramp_test", "families": frozenset({"head"}), "Config": RampConfig,
                                             "marcache_head_plan": _last_step_budget}))
    _plugin("zero_head_test", "head", marcache_head_plan=lambda self, step, plan, z: plan.steps.zero_())
    _plugin("list_order_test", "order", marcache_token_order=lambda self, gen: [list(range(gen.seq_len))] * gen.batch_size)
    _plugin("float_order_test", "order", marcache_token_order=lambda self, gen: torch.arange(gen.seq_len).float().expand(gen.batch_size, -1))
    _plugin("float_budget_test", "head", marcache_head_plan=lambda self, step, plan, z: setattr(plan, "steps", plan.steps.float() * 0.5 + 2.5))
    _plugin("float_schedule_test", "schedule", marcache_step_schedule=lambda self, gen: [gen.seq_len / 2, gen.seq_len / 2])

    def bad_second_sample(self, gen):
        orders = torch.arange(gen.seq_len).repeat(gen.batch_size, 1)
        orders[1, 0] = orders[1, 1]  # sample 1 repeats a position
        return orders

    _plugin("dup_order_test", "order", marcache_token_order=bad_second_sample)
    _plugin("badarg_test", "head", marcache_head_plan=lambda self, step, plan, z, budget: None)


CASES = [
    # (policy YAML, message both validate and generate must print)
    ("plugins:\n  - name: gtr_order\n  - name: halton_test\n", "both claim the exclusive hook family 'order'"),
    ("plugins:\n  - name: recap\n  - name: lazymar_token_cache\n", "plugins 'recap' and 'lazymar_token_cache' conflict"),
    ("plugins:\n  - name: ramp_test\n    params: {end: 1}\n",
     "head plan after plugin 'ramp_test' at step 3: a token of sample 0 gets 1 DDPM steps; head plans need 2..1000"),
    ("plugins:\n  - name: zero_head_test\n", "head plan after plugin 'zero_head_test' at step 0"),
    ("plugins:\n  - name: list_order_test\n", "token order from plugin 'list_order_test': got a list"),
    ("plugins:\n  - name: float_order_test\n", "token order from plugin 'float_order_test': got a torch.float32 tensor"),
    ("plugins:\n  - name: float_budget_test\n", "head plan after plugin 'float_budget_test' at step 0: steps is a torch.float32 tensor"),
    ("plugins:\n  - name: float_schedule_test\n", "step schedule from plugin 'float_schedule_test': entry 0 is 8.0 (float)"),
    ("plugins:\n  - name: dup_order_test\n", "token order from plugin 'dup_order_test': the order of sample 1 is not a permutation"),
    ("plugins:\n  - name: badarg_test\n", "Argument(s) {'budget'} are declared in the implementation but can not be found in the hookspec"),
]


@pytest.mark.parametrize("yaml_text,message", CASES, ids=[c[1][:40] for c in CASES])
def test_validate_rejects_what_generate_rejects_with_the_same_line(registry, tmp_path, capsys, yaml_text, message):
    _register_culprits()
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml_text)
    assert main(["policy", "validate", "--model", "mar_tiny", str(policy), *SMALL]) == 2
    validate_err = capsys.readouterr().err.strip()
    out = tmp_path / "out"
    assert main(["generate", "--model", "mar_tiny", "--policy", str(policy), "--labels", "1,2", "--out", str(out),
                 "--no-progress", *SMALL]) == 2
    generate_err = capsys.readouterr().err.strip()
    assert validate_err == generate_err
    assert message in validate_err and "\n" not in validate_err and validate_err.startswith("marcache: error: ")
    assert not out.exists()


@pytest.mark.parametrize("name", list_shipped_policies())
def test_validate_accepts_exactly_what_generate_accepts(name, tmp_path, capsys):
    """Every shipped policy on mar_tiny: validate and generate agree (both succeed or fail alike)."""
    rc_validate = main(["policy", "validate", "--model", "mar_tiny", name, *SMALL])
    line = capsys.readouterr()
    rc_generate = main(["generate", "--model", "mar_tiny", "--policy", name, "--labels", "3", "--out", str(tmp_path / "o"),
                        "--no-progress", *SMALL])
    gen = capsys.readouterr()
    assert rc_validate == rc_generate
    if rc_validate == 0:
        import json

        steps = len(json.loads((tmp_path / "o" / "report.json").read_text())["steps"])
        # the dry run runs the steps generate ran (4 = SMALL's num_iter, unless a plugin schedules its own)
        assert f"{name}.yaml: valid (" in line.out and f"dry run on mar_tiny: {steps} steps" in line.out
    else:
        assert line.err == gen.err


def test_validate_line_says_what_was_checked(capsys):
    assert main(["policy", "validate", "--model", "mar_tiny", "baseline", *SMALL]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(": valid (built-ins only); dry run on mar_tiny: 4 steps, 2 samples, 3 head steps per token")
    assert out.startswith(str(policy_path("baseline")))


def test_head_plan_error_blames_the_refining_plugin_not_the_builtin(registry):
    _register_culprits()
    from marcache.testing import make_tiny

    policy = resolve_policy({"sampler": {"num_iter": 2, "head_steps": 3}, "plugins": [{"name": "zero_head_test"}]})
    with pytest.raises(PluginError) as err:
        Sampler(make_tiny(3), policy).generate(labels=[1, 2, 3], seed=0, sample_offset=7)
    assert "'zero_head_test'" in str(err.value) and "ddpm_head" not in str(err.value)
    assert "sample 7" in str(err.value)  # the global sample id of the first bad row


def test_pluggy_argument_line_is_kept(registry):
    class BadArgs(Plugin):
        name = "badargs_line_test"
        families = frozenset({"features"})

        def marcache_forward_plan(self, step, plan, nonsense):
            pass

    with pytest.raises(PluginError) as err:
        build_plugin_manager([BadArgs()])
    message = str(err.value)
    assert message == ("plugin 'badargs_line_test': marcache_forward_plan: Argument(s) {'nonsense'} are declared in the "
                       "implementation but can not be found in the hookspec (it accepts: step, plan)")


def test_head_step_range_is_one_pair_of_constants():
    assert (HEAD_STEPS_MIN, HEAD_STEPS_MAX) == (2, 1000)
    require_head_steps("x", HEAD_STEPS_MIN)
    require_head_steps("x", HEAD_STEPS_MAX)
    require_head_steps("x", None, nullable=True)
    for bad in (HEAD_STEPS_MIN - 1, HEAD_STEPS_MAX + 1, 2.5, True, None):
        with pytest.raises(ValueError, match=r"x=.*: must be an integer in \[2, 1000\]"):
            require_head_steps("x", bad)
    # the policy schema and every plugin config use them: a bound moved here moves everywhere
    for key, params in (("gtr_schedule", {"head_rec": 1}), ("fts", {"detail_steps": 1001}),
                        ("recap", {"local_head_steps": 1}), ("lazymar_head", {"reference_head_steps": 1})):
        with pytest.raises(Exception, match=r"must be an integer in \[2, 1000\]"):
            resolve_policy({"plugins": [{"name": key, "params": params}]})
