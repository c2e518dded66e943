"""Policies: which plugins run, with which parameters, on which sampler settings (OmegaConf).

A policy YAML::

    name: lazymar
    sampler: {num_iter: null, cfg: null, cfg_schedule: linear, temperature: null, head_steps: null}
    backend: {name: auto, dtype: float32}
    plugins:                       # in the order they refine plans
      - name: some_plugin
        params: {warmup_steps: 5}
    disable: []                    # built-ins to drop

Everything is validated in struct mode: unknown keys, wrong types and out-of-range values raise
:class:`~marcache.errors.ConfigError` with the file and the full key path. Plugin ``params`` are
validated against each plugin's own ``Config`` dataclass. Overrides use ``key=value``:
``sampler.num_iter=32``, ``backend.dtype=bfloat16`` or ``<plugin>.<param>=value``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, MarcacheError, PluginError
from .plans import HEAD_STEPS_MAX, HEAD_STEPS_MIN
from .plugin import Plugin, available_plugins, builtin_plugin_names, get_plugin_class
from .safety import check_finite_fields, refuse_resolvers

DTYPES = ("float32", "bfloat16", "float16")
#: documented bounds of the float sampler settings (published MAR settings: cfg <= ~4, temperature ~1)
MAX_CFG = 100.0
MAX_TEMPERATURE = 10.0


@dataclass
class SamplerConfig:
    """Official ``sample_tokens`` arguments (+ the head-step count). ``null`` = the model's default
    (registered per model: e.g. 64 steps and cfg 2.9 / 3.0 / 3.2 for MAR-B / L / H)."""

    num_iter: Optional[int] = None
    cfg: Optional[float] = None
    cfg_schedule: Optional[str] = None
    temperature: Optional[float] = None
    head_steps: Optional[int] = None  # None: the model's num_sampling_steps
    clip_denoised: Optional[bool] = None  # clamp predicted x_0 to [-1, 1] (pixel-space models; False = reference)

    def __post_init__(self):
        _check(self.num_iter is None or self.num_iter >= 1, "sampler.num_iter", "must be >= 1")
        # finite and bounded (docs/safety.md): inf/NaN/1e308 would write noise and Infinity into report.json
        _check(self.cfg is None or (math.isfinite(self.cfg) and 1.0 <= self.cfg <= MAX_CFG), "sampler.cfg",
               f"must be in [1, {MAX_CFG:g}] (1.0 disables guidance), got {self.cfg}")
        _check(self.temperature is None or (math.isfinite(self.temperature) and 0 < self.temperature <= MAX_TEMPERATURE),
               "sampler.temperature", f"must be in (0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        _check(self.head_steps is None or HEAD_STEPS_MIN <= self.head_steps <= HEAD_STEPS_MAX, "sampler.head_steps",
               f"must be in [{HEAD_STEPS_MIN}, {HEAD_STEPS_MAX}] or null (see marcache.plans.HEAD_STEPS_MIN)")


@dataclass
class BackendConfig:
    name: str = "auto"  # auto (cuda on a CUDA device, else reference) | reference | cuda | any registered backend
    dtype: str = "float32"  # autocast dtype of the transformer and head: float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        _check(self.dtype in DTYPES, "backend.dtype", f"must be one of {', '.join(DTYPES)}")


@dataclass
class PluginSpec:
    name: str = MISSING
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyConfig:
    name: str = "policy"
    description: str = ""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    plugins: List[PluginSpec] = field(default_factory=list)
    disable: List[str] = field(default_factory=list)


class _FieldError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


@dataclass
class ResolvedPolicy:
    """A validated policy: its config and the plugin instances (built-ins first, then the policy's)."""

    def sampler_settings(self, model) -> dict:
        """Sampler settings with nulls filled from the model's registered defaults."""
        defaults = getattr(model, "sampling_defaults", None) or {}
        s = self.config.sampler
        out = {k: getattr(s, k) if getattr(s, k) is not None else defaults.get(k)
               for k in ("num_iter", "cfg", "cfg_schedule", "temperature", "clip_denoised")}
        out["clip_denoised"] = bool(out["clip_denoised"])
        out["head_steps"] = s.head_steps or len(model.diffloss.gen_diffusion.betas)
        return out

    config: PolicyConfig
    source: str
    plugin_configs: list = field(default_factory=list)  # [(class, config instance)] of the policy's plugins

    def instantiate(self) -> list[Plugin]:
        """Fresh plugin instances: enabled built-ins (fallbacks) followed by the policy's plugins."""
        plugins = available_plugins()
        builtins = [plugins[n]() for n in builtin_plugin_names() if n not in self.config.disable]
        return builtins + [cls(cfg) for cls, cfg in self.plugin_configs]

    def with_sampler(self, **settings) -> "ResolvedPolicy":
        """A copy with some sampler settings replaced (validated like the YAML keys)."""
        if not settings:
            return self
        try:
            sampler = dataclasses.replace(self.config.sampler, **settings)
        except _FieldError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{self.source}: sampler: {exc}") from None
        return ResolvedPolicy(dataclasses.replace(self.config, sampler=sampler), self.source, list(self.plugin_configs))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self.config) | {
            "plugins": [{"name": cls.name, "params": dataclasses.asdict(cfg)} for cls, cfg in self.plugin_configs]
        }

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


def policy_path(name_or_path: str | os.PathLike) -> Path:
    """A file path, or the name of a policy shipped in ``marcache.policies`` (``baseline``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    shipped = importlib.resources.files("marcache.policies") / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = ", ".join(list_shipped_policies())
    raise ConfigError(f"policy {str(name_or_path)!r}: no such file and no shipped policy of that name (shipped: {names})")


def list_shipped_policies() -> list[str]:
    root = importlib.resources.files("marcache.policies")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _fmt(exc: OmegaConfBaseException) -> str:
    msg = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    return f"{key}: {msg}" if key else msg


def load_policy(name_or_path: str | os.PathLike | None = "baseline", overrides: Optional[list[str]] = None) -> ResolvedPolicy:
    """Load, override and validate a policy. Raises :class:`ConfigError` with one line on any problem."""
    path = policy_path(name_or_path or "baseline")
    src = str(path)
    if not path.is_file():
        raise ConfigError(f"{src}: no such policy file")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come from PyYAML with several lines
        raise ConfigError(f"{src}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raw = OmegaConf.create({})
    if not OmegaConf.is_dict(raw):
        raise ConfigError(f"{src}: a policy must be a mapping with keys sampler/backend/plugins/disable")
    return resolve_policy(raw, src, overrides)


def _check_shape(raw: Any, source: str) -> None:
    """Container shapes OmegaConf's merge would fail on with a TypeError: say which key, and what it needs."""
    plugins = raw.get("plugins") if isinstance(raw, dict) else None
    if plugins is None:
        return
    if not isinstance(plugins, list):
        raise ConfigError(f"{source}: plugins: must be a list of {{name: ..., params: {{...}}}} entries, "
                          f"got a {type(plugins).__name__}")
    for i, spec in enumerate(plugins):
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: plugins[{i}]: must be a mapping {{name: ..., params: {{...}}}}, got {spec!r:.60}")
        params = spec.get("params", {})
        if not isinstance(params, dict):
            got = "null" if params is None else f"a {type(params).__name__}"
            raise ConfigError(f"{source}: plugins[{i}].params: must be a mapping of parameter: value "
                              f"(e.g. {{num_stages: 3}}; omit it for the defaults), got {got}")


def resolve_policy(raw: Any, source: str = "<policy>", overrides: Optional[list[str]] = None) -> ResolvedPolicy:
    """Validate a raw mapping (dict or DictConfig) as a policy."""
    schema = OmegaConf.structured(PolicyConfig)
    plain = OmegaConf.to_container(raw, resolve=False) if OmegaConf.is_config(raw) else raw
    refuse_resolvers(plain, source)
    _check_shape(plain, source)
    try:
        cfg = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_fmt(exc)}") from None
    except (TypeError, ValueError) as exc:  # container-type clashes not caught by _check_shape
        raise ConfigError(f"{source}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; "
                          f"see the policy format in docs/plugins.md") from None
    plugin_overrides = _apply_overrides(cfg, overrides or [], source)
    try:
        policy: PolicyConfig = OmegaConf.to_object(cfg)
    except _FieldError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_fmt(exc)}") from None

    known = available_plugins()
    for name in policy.disable:
        if name not in known or not known[name].builtin:
            raise ConfigError(f"{source}: disable: {name!r} is not a built-in plugin (built-ins: {', '.join(n for n, c in known.items() if c.builtin)})")
    resolved = ResolvedPolicy(policy, source)
    listed = [spec.name for spec in policy.plugins]
    twice = next((name for i, name in enumerate(listed) if name in listed[:i]), None)
    if twice is not None:
        raise ConfigError(f"{source}: plugins: {twice!r} is listed twice; list each plugin once (merge their params)")
    for name in plugin_overrides:
        if name not in listed:
            raise ConfigError(f"{source}: override for plugin {name!r}, which the policy does not list (listed: {', '.join(listed) or 'none'})")
    for i, spec in enumerate(policy.plugins):
        try:
            cls = get_plugin_class(spec.name)
        except PluginError as exc:
            raise ConfigError(f"{source}: plugins[{i}].name: {exc}") from None
        if cls.builtin:
            raise ConfigError(f"{source}: plugins[{i}]: {spec.name!r} is a built-in and always present; list only additional plugins")
        params = dict(spec.params or {}) | plugin_overrides.get(spec.name, {})
        spec.params = params  # the policy (reports, cross-plugin checks) shows the overridden values
        resolved.plugin_configs.append((cls, plugin_config(cls, params, f"{source}: plugins[{i}].params")))
    return resolved


def plugin_config(cls: type[Plugin], params: dict, where: str) -> Any:
    """Validate ``params`` against ``cls.Config`` (unknown keys, types, non-finite floats, ranges)."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls.Config), params)
        values = OmegaConf.to_container(node)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}.{_fmt(exc)}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    # non-finite floats are refused before __post_init__ compares them (NaN passes `x <= 0` checks)
    check_finite_fields(values, where)
    try:
        return OmegaConf.to_object(node)
    except _FieldError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}.{_fmt(exc)}") from None
    except (TypeError, ValueError, OverflowError, MarcacheError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _apply_overrides(cfg, overrides: list[str], source: str) -> dict[str, dict]:
    """Apply ``sampler.*`` / ``backend.*`` / top-level overrides; return ``{plugin: {param: value}}``."""
    plugin_params: dict[str, dict] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. sampler.num_iter=32")
        key, value = item.split("=", 1)
        refuse_resolvers(value, f"override {item!r}")
        head = key.split(".", 1)[0]
        if head in ("sampler", "backend", "name", "description"):
            try:
                OmegaConf.update(cfg, key, _parse_value(value), merge=True)
            except OmegaConfBaseException as exc:
                raise ConfigError(f"override {item!r}: {_fmt(exc)}") from None
        elif "." in key:
            plugin, param = key.split(".", 1)
            plugin_params.setdefault(plugin, {})[param] = _parse_value(value)
        else:
            raise ConfigError(f"override {item!r}: unknown key {key!r}; use sampler.X, backend.X or <plugin>.<param>")
    return plugin_params


def _parse_value(value: str) -> Any:
    """YAML scalar semantics for command-line values: ``32`` -> int, ``null`` -> None, ``a`` -> str."""
    try:
        return yaml.safe_load(value) if value != "" else value
    except yaml.YAMLError:
        return value
