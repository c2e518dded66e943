"""Plugin manager: registration checks, hook order, conflicts, misspelled hooks, entry points."""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import marcache.plugin as plugin_mod
from marcache.cli import main
from marcache.errors import ConfigError, PluginError
from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin, available_plugins, build_plugin_manager, register_plugin
from marcache.policy import resolve_policy
from marcache.scheduler import Sampler
from marcache.testing import fake_distribution

EXAMPLE = Path(__file__).parents[1] / "examples" / "marcache-head-anneal"


@pytest.fixture
def registry(monkeypatch):
    """A scratch copy of the global registry: test plugins vanish after the test."""
    available_plugins()
    monkeypatch.setattr(plugin_mod, "_REGISTRY", dict(plugin_mod._REGISTRY))
    return plugin_mod._REGISTRY


CALLS = []


def refine_plugin(name, **extra):
    def forward(self, step, plan):
        CALLS.append(self.name)

    return type(name, (Plugin,), {"name": name, "families": frozenset({"features"}), "marcache_forward_plan": forward, **extra})


def test_refine_hooks_run_in_policy_order_after_builtins(registry, tiny_model):
    for name in ("order_a", "order_b", "order_c"):
        register_plugin(refine_plugin(name))
    CALLS.clear()
    policy = resolve_policy({"sampler": {"num_iter": 1, "head_steps": 2}, "plugins": [{"name": "order_b"}, {"name": "order_a"}, {"name": "order_c"}]})
    Sampler(tiny_model, policy).generate(labels=[1], seed=0)
    assert CALLS == ["order_b", "order_a", "order_c"]


def test_firstresult_override_and_fallback(registry, tiny_model):
    class RasterOrder(Plugin):
        name = "raster_test"
        families = frozenset({"order"})

        def marcache_token_order(self, gen):
            self.engagement["used"] += 1
            return torch.arange(gen.seq_len - 1, -1, -1).expand(gen.batch_size, -1).clone()

    register_plugin(RasterOrder)
    policy = resolve_policy({"sampler": {"num_iter": 16, "head_steps": 2}, "plugins": [{"name": "raster_test"}]})
    result = Sampler(tiny_model, policy)
    from marcache.testing import StepRecorder

    rec = StepRecorder()
    out = Sampler(tiny_model, policy, extra_plugins=[rec]).generate(labels=[1, 2], seed=0)
    # revealed from the tail of the order: raster order 0, 1, 2, ...
    firsts = [int(step.mask_to_pred[0].nonzero()[0]) for step, _ in rec.steps]
    assert firsts == list(range(16))
    assert out.report["engagement"]["raster_test"] == {"used": 1}
    assert "random_order" not in out.report["engagement"]  # the built-in fallback was not consulted
    assert result.plugins[-1].name == "raster_test"


def test_misspelled_hook_fails_loudly(registry, tiny_model):
    class Typo(Plugin):
        name = "typo_test"
        families = frozenset({"features"})

        def marcache_forward_plna(self, step, plan):
            pass

    register_plugin(Typo)
    policy = resolve_policy({"plugins": [{"name": "typo_test"}]})
    with pytest.raises(PluginError, match="marcache_forward_plna"):
        Sampler(tiny_model, policy)


def test_unknown_argument_in_hook_is_rejected(registry):
    class BadArgs(Plugin):
        name = "badargs_test"
        families = frozenset({"features"})

        def marcache_forward_plan(self, step, plan, nonsense):
            pass

    with pytest.raises(PluginError, match="badargs_test"):
        build_plugin_manager([BadArgs()])


def test_registration_validation(registry):
    class NoName(Plugin):
        families = frozenset({"head"})

    class WrongFamily(Plugin):
        name = "wrong_family_test"
        families = frozenset({"head"})

        def marcache_token_order(self, gen):
            return None

    class Unknown(Plugin):
        name = "unknown_family_test"
        families = frozenset({"teleport"})

    for cls, pattern in ((NoName, "must be a Python identifier"), (WrongFamily, "does not declare the family 'order'"),
                         (Unknown, "unknown hook families")):
        with pytest.raises(PluginError, match=pattern):
            register_plugin(cls)
    with pytest.raises(PluginError, match="already registered"):
        register_plugin(type("Dup", (Plugin,), {"name": "ddpm_head", "families": frozenset({"head"})}))


def test_conflicts(registry):
    a = register_plugin(type("A", (Plugin,), {"name": "conf_a", "families": frozenset({"order"}), "conflicts": ("conf_b",)}))
    b = register_plugin(type("B", (Plugin,), {"name": "conf_b", "families": frozenset({"head"})}))
    c = register_plugin(type("C", (Plugin,), {"name": "conf_c", "families": frozenset({"order"})}))
    with pytest.raises(PluginError, match="'conf_a' and 'conf_b' conflict"):
        build_plugin_manager([a(), b()])
    with pytest.raises(PluginError, match="exclusive hook family 'order'"):
        build_plugin_manager([a(), c()])


def test_unknown_plugin_and_bad_params(registry):
    @dataclass
    class Cfg:
        rate: float = 0.5

        def __post_init__(self):
            if not 0 < self.rate <= 1:
                raise ValueError(f"rate={self.rate}: must be in (0, 1]")

    register_plugin(type("P", (Plugin,), {"name": "param_test", "families": frozenset({"head"}), "Config": Cfg}))
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.name: unknown plugin 'param_tst'\. Did you mean 'param_test'\?"):
        resolve_policy({"plugins": [{"name": "param_tst"}]})
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.params\.rte: Key 'rte' not in 'Cfg'"):
        resolve_policy({"plugins": [{"name": "param_test", "params": {"rte": 1}}]})
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.params\.rate: Value 'fast'"):
        resolve_policy({"plugins": [{"name": "param_test", "params": {"rate": "fast"}}]})
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.params: rate=2\.0: must be in \(0, 1\]"):
        resolve_policy({"plugins": [{"name": "param_test", "params": {"rate": 2}}]})
    assert resolve_policy({"plugins": [{"name": "param_test"}]}, overrides=["param_test.rate=0.25"]).plugin_configs[0][1].rate == 0.25
    with pytest.raises(ConfigError, match="built-in and always present"):
        resolve_policy({"plugins": [{"name": "ddpm_head"}]})
    with pytest.raises(ConfigError, match="not a built-in"):
        resolve_policy({"disable": ["param_test"]})


def test_disabling_the_forward_builtin_without_replacement(registry, tiny_model):
    policy = resolve_policy({"sampler": {"num_iter": 1, "head_steps": 2}, "disable": ["full_recompute"]})
    with pytest.raises(PluginError, match="no plugin planned the forward pass"):
        Sampler(tiny_model, policy).generate(labels=[0])


def test_entry_point_example_plugin(registry, monkeypatch, tmp_path, tiny_model):
    """The worked example of docs/plugins.md, discovered through a real entry point."""
    fake_distribution(tmp_path, "marcache-head-anneal", {"marcache": {"head_anneal": "marcache_head_anneal:HeadAnneal"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(plugin_mod, "_ENTRY_POINTS_LOADED", False)
    assert "head_anneal" in available_plugins()
    policy = resolve_policy({"sampler": {"num_iter": 4}, "plugins": [{"name": "head_anneal", "params": {"start": 20, "end": 5}}]})
    report = Sampler(tiny_model, policy).generate(labels=[3], seed=0).report
    assert [list(s["head_rows_by_steps"]) for s in report["steps"]] == [["20"], ["15"], ["10"], ["5"]]
    assert report["engagement"]["head_anneal"]["head_steps_total"] > 0
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.params: start=1"):
        resolve_policy({"plugins": [{"name": "head_anneal", "params": {"start": 1}}]})
    sys.modules.pop("marcache_head_anneal", None)


def test_cli_errors_are_one_line_exit_2(registry, tmp_path, capsys):
    class Typo(Plugin):
        name = "cli_typo_test"
        families = frozenset({"head"})

        def marcache_head_pln(self, step, plan, z):
            pass

    register_plugin(Typo)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sampler: {num_iter: [1, 2\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("plugins:\n  - name: cli_typo_test\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("plugins:\n  - name: lazymarr\n")
    conflict = tmp_path / "conflict.yaml"
    register_plugin(type("O1", (Plugin,), {"name": "cli_order_1", "families": frozenset({"order"})}))
    register_plugin(type("O2", (Plugin,), {"name": "cli_order_2", "families": frozenset({"order"})}))
    conflict.write_text("plugins:\n  - name: cli_order_1\n  - name: cli_order_2\n")
    out = tmp_path / "out"
    cases = [
        (["policy", "validate", str(bad_yaml)], "not valid YAML"),
        (["policy", "validate", str(unknown)], "unknown plugin 'lazymarr'"),
        (["generate", "--model", "mar_tiny", "--policy", str(typo), "--out", str(out)], "cli_typo_test"),
        (["generate", "--model", "mar_tiny", "--policy", str(conflict), "--out", str(out)], "exclusive hook family"),
        (["generate", "--model", "mar_tiny", "--num-images", "x"], "invalid int value"),
        (["generate", "--model", "mar_tiny", "sampler.num_iter=0", "--out", str(out)], "sampler.num_iter: must be >= 1"),
        (["generate", "--checkpoint", str(tmp_path / "missing.pth"), "--out", str(out)], "no such file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("marcache: error:") and message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists(), "nothing may be written when inputs are invalid"
