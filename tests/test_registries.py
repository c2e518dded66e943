"""Registries drive discovery: built-in plugins and backends without hand-kept lists, third-party
backends through entry points like plugins."""

import ast
import sys
from pathlib import Path

import pytest
import torch

import marcache.backends.base as backend_base
from marcache.backends import available_backends, get_backend
from marcache.cli import main
from marcache.plugin import available_plugins
from marcache.testing import fake_distribution

ROOT = Path(__file__).parents[1]


def _registered_names(folder: Path, decorator: str) -> set[str]:
    """``name = "..."`` of every class decorated with ``decorator`` in the package's source files."""
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == decorator for d in node.decorator_list):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "name":
                        names.add(stmt.value.value)
    return names


def test_every_builtin_plugin_module_is_discovered():
    in_source = _registered_names(ROOT / "plugins", "register_plugin")
    assert {"random_order", "flop_counter", "trace", "recap"} <= in_source
    assert in_source <= set(available_plugins())
    assert "from . import" not in (ROOT / "plugins" / "__init__.py").read_text()  # no hand-kept list


def test_every_builtin_backend_module_is_discovered():
    in_source = _registered_names(ROOT / "backends", "register_backend")
    assert in_source == {"reference", "cuda"} and in_source <= set(available_backends())
    assert "shape_only" not in available_backends()  # counting only, never an execution backend


def test_third_party_backend_through_an_entry_point(monkeypatch, tmp_path, capsys):
    pkg = tmp_path / "my_backend_pkg.py"
    pkg.write_text(
        "from marcache.backends import ReferenceBackend\n\n"
        "class LoudBackend(ReferenceBackend):\n"
        "    name = 'loud'\n"
        "    calls = 0\n\n"
        "    def run_forward(self, step, plan):\n"
        "        LoudBackend.calls += 1\n"
        "        return super().run_forward(step, plan)\n")
    fake_distribution(tmp_path, "my-backend-pkg", {"marcache.backends": {"loud": "my_backend_pkg:LoudBackend"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backend_base, "_REGISTRY", dict(backend_base._REGISTRY))
    monkeypatch.setattr(backend_base, "_DISCOVERED", False)
    assert "loud" in available_backends()
    assert get_backend("loud", "cpu").name == "loud"
    out = tmp_path / "out"
    assert main(["generate", "--model", "mar_tiny", "--backend", "loud", "--labels", "1", "--out", str(out),
                 "--no-progress", "sampler.num_iter=2", "sampler.head_steps=2"]) == 0
    assert sys.modules["my_backend_pkg"].LoudBackend.calls == 2
    sys.modules.pop("my_backend_pkg", None)


def test_bad_backend_registration_is_one_line():
    from marcache.backends import Backend, register_backend
    from marcache.errors import ConfigError

    with pytest.raises(ConfigError, match="already registered"):
        register_backend(type("Dup", (Backend,), {"name": "reference", "run_forward": None, "run_head": None}))
    with pytest.raises(ConfigError, match="other than 'auto'"):
        register_backend(type("Auto", (Backend,), {"name": "auto"}))
    with pytest.raises(ConfigError, match="not a subclass"):
        register_backend(torch.nn.Module)
