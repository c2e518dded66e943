"""The search space of ``marcache tune``: which plugins may be switched on, their parameters, the sampler.

Without ``--space`` the space is every tunable plugin (``marcache plugins --tunable``) with its declared
ranges, plus ``sampler.num_iter`` in ``[default / 4, default]`` and ``sampler.head_steps`` in
``[default / 5, default]`` (log) of the model. A space file narrows or extends that::

    sampler:                      # omit the key for the defaults above; {} = sampler settings fixed
      num_iter: {int: [4, 16]}
      head_steps: {int: [10, 50], log: true}
      cfg: 2.5                    # a plain value is fixed
    plugins:                      # listed in refine order; only these may be switched on
      gtr_order:
      gtr_schedule:
        params: {rates: [4.6, 16.0, 128.0], head_max: {int: [10, 50], log: true}}
      fts: {requires: [gtr_schedule]}   # offered only when gtr_schedule is on

A parameter range is ``{int: [low, high]}``, ``{float: [low, high]}`` (either with ``log: true``) or
``{choices: [...]}``; anything else is a fixed value. Ranges are validated like declared ones
(:func:`marcache.search_space.check_param`). Optuna parameter names: ``use.<plugin>``,
``<plugin>.<param>`` (or the declared ``key``) and ``sampler.<name>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import ConfigError, PluginError
from ..search_space import Categorical, Float, Int, check_param

RANGE_KEYS = {"int", "float", "choices"}


@dataclass
class PluginChoice:
    """One plugin the search may switch on: its fixed parameters and its ranges by parameter name."""

    name: str
    always: bool = False
    fixed: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)
    requires: list = field(default_factory=list)  # plugins listed earlier that must be on for this one
    conflicts: frozenset = frozenset()  # declared conflicts, both directions


@dataclass
class TuneSpace:
    sampler_space: dict
    sampler_fixed: dict
    plugins: list
    source: str

    def suggest(self, trial) -> dict:
        """Sample a raw policy mapping (validated later by :func:`marcache.policy.resolve_policy`)."""
        sampler = dict(self.sampler_fixed)
        for name, param in self.sampler_space.items():
            sampler[name] = suggest(trial, f"sampler.{name}", param)
        plugins, on = [], set()
        for choice in self.plugins:
            # a plugin whose requirement is off or which conflicts with one already on is not offered
            # (the trial would only be pruned); a plugin marked always is offered regardless
            possible = set(choice.requires) <= on and not (choice.conflicts & on)
            if not choice.always and not (possible and trial.suggest_categorical(f"use.{choice.name}", [False, True])):
                continue
            on.add(choice.name)
            params = dict(choice.fixed)
            for name, param in choice.space.items():
                params[name] = suggest(trial, param.key or f"{choice.name}.{name}", param)
            plugins.append({"name": choice.name, "params": params})
        return {"name": f"tune-trial-{trial.number}", "sampler": sampler, "plugins": plugins}

    def describe(self) -> dict:
        """JSON-able description (stored with the study: a rerun must search the same space)."""
        def ranges(space):
            return {k: v.describe() + (f" as {v.key}" if v.key else "") for k, v in space.items()}

        return {"sampler": ranges(self.sampler_space), "sampler_fixed": self.sampler_fixed,
                "plugins": [{"name": c.name, "always": c.always, "fixed": c.fixed, "space": ranges(c.space),
                             "requires": c.requires} for c in self.plugins]}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True, default=str).encode()).hexdigest()[:10]


def suggest(trial, name: str, param) -> Any:
    if isinstance(param, Int):
        return trial.suggest_int(name, param.low, param.high, log=param.log)
    if isinstance(param, Float):
        return trial.suggest_float(name, param.low, param.high, log=param.log)
    return trial.suggest_categorical(name, list(param.choices))


def _parse_range(value: Any, where: str):
    """A range mapping -> Int/Float/Categorical; anything else -> None (a fixed value)."""
    if not (isinstance(value, dict) and set(value) & RANGE_KEYS):
        return None
    kinds = set(value) & RANGE_KEYS
    extra = set(value) - RANGE_KEYS - {"log"}
    if len(kinds) != 1 or extra:
        raise ConfigError(f"{where}: a range is {{int: [low, high]}}, {{float: [low, high]}} (optionally with log: true) "
                          f"or {{choices: [...]}}, got {value}")
    kind = kinds.pop()
    if kind == "choices":
        if not isinstance(value["choices"], list) or "log" in value:
            raise ConfigError(f"{where}: choices must be a list (and take no log), got {value}")
        return Categorical(tuple(value["choices"]))
    bounds = value[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2):
        raise ConfigError(f"{where}: {kind} needs [low, high], got {bounds!r}")
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if kind == "float":
        try:
            return Float(float(bounds[0]), float(bounds[1]), log=log)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: float bounds must be numbers, got {bounds!r}") from None
    return Int(bounds[0], bounds[1], log=log)


def _checked(owner: str, config_cls: type, name: str, param) -> None:
    try:
        check_param(owner, config_cls, name, param)
    except PluginError as exc:
        raise ConfigError(str(exc)) from None


def default_sampler_space(settings: dict) -> dict:
    """``num_iter`` in [steps / 4, steps], ``head_steps`` in [head / 5, head] (log) of the baseline's settings."""
    steps, head = int(settings.get("num_iter") or 64), int(settings["head_steps"])
    return {"num_iter": Int(max(1, steps // 4), steps), "head_steps": Int(max(2, head // 5), head, log=True)}


def load_space(path: Optional[str], model, baseline_settings: Optional[dict] = None) -> TuneSpace:
    """The default space (``path`` None) or a space file, validated; one :class:`ConfigError` line if bad.

    ``baseline_settings``: the baseline's resolved sampler settings (default: the model's), which the
    default sampler ranges scale from."""
    from ..plugin import available_plugins, get_plugin_class
    from ..policy import SamplerConfig

    if path is None:
        raw, src = {}, "<default space>"
    else:
        p = Path(path)
        src = str(p)
        if not p.is_file():
            raise ConfigError(f"--space {src}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{src}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict) or set(raw) - {"sampler", "plugins"}:
            raise ConfigError(f"{src}: a space file is a mapping with the keys sampler and plugins")

    sampler_space, sampler_fixed = {}, {}
    if "sampler" not in raw:
        if baseline_settings is None:
            from ..policy import load_policy

            baseline_settings = load_policy("baseline").sampler_settings(model)
        sampler_space = default_sampler_space(baseline_settings)
    else:
        for name, value in (raw["sampler"] or {}).items():
            where = f"{src}: sampler.{name}"
            param = _parse_range(value, where)
            if param is None:
                try:
                    SamplerConfig(**{name: value})
                except TypeError:
                    raise ConfigError(f"{where}: not a sampler setting (see `marcache policy show baseline`)") from None
                except ValueError as exc:
                    raise ConfigError(f"{src}: {exc}") from None
                sampler_fixed[name] = value
            else:
                _checked(f"{src}: sampler", SamplerConfig, name, param)
                sampler_space[name] = param

    entries = raw.get("plugins")
    if entries is None:
        entries = {n: None for n, c in available_plugins().items() if c.search_space is not None and not c.builtin}
    if not isinstance(entries, dict):
        raise ConfigError(f"{src}: plugins must be a mapping {{plugin: {{always: bool, params: {{...}}}}}}")
    plugins, shared = [], {}
    for name, entry in entries.items():
        where = f"{src}: plugins.{name}"
        try:
            cls = get_plugin_class(name)
        except PluginError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if cls.builtin:
            raise ConfigError(f"{where}: {name!r} is a built-in and always present; list only additional plugins")
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - {"always", "params", "requires"}:
            raise ConfigError(f"{where}: expected a mapping with the keys always, requires and params (or nothing)")
        requires = entry.get("requires") or []
        if not isinstance(requires, list) or any(r not in entries or list(entries).index(r) >= list(entries).index(name) for r in requires):
            raise ConfigError(f"{where}.requires: a list of plugins listed before {name!r} in the space, got {requires!r}")
        conflicts = set(cls.conflicts) | {n for n, c in available_plugins().items() if name in c.conflicts}
        choice = PluginChoice(name, always=bool(entry.get("always", False)), requires=list(requires),
                              conflicts=frozenset(conflicts))
        choice.space = dict(cls.search_space or {})
        for pname, value in (entry.get("params") or {}).items():
            param = _parse_range(value, f"{where}.params.{pname}")
            if param is None:
                choice.space.pop(pname, None)
                choice.fixed[pname] = value
            else:
                declared = (cls.search_space or {}).get(pname)
                if declared is not None and declared.key:  # a narrowed shared range keeps its key
                    param = type(param)(*[getattr(param, f) for f in param.__dataclass_fields__ if f != "key"], key=declared.key)
                _checked(f"{where}.params", cls.Config, pname, param)
                choice.space[pname] = param
        for pname, param in choice.space.items():
            if param.key:
                other = shared.setdefault(param.key, (name, param))
                if other[1] != param:
                    raise ConfigError(f"{where}.params.{pname}: shared key {param.key!r} has the range {param.describe()} here "
                                      f"but {other[1].describe()} in {other[0]}; give both the same range")
        plugins.append(choice)
    return TuneSpace(sampler_space, sampler_fixed, plugins, src)
