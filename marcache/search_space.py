"""Search-space declarations: which parameters of a plugin's ``Config`` are tunable, over which range.

A plugin declares its space beside its config, as a class attribute mapping ``Config`` field names to
:class:`Int`, :class:`Float` or :class:`Categorical`::

    class FTS(Plugin):
        Config = FTSConfig
        search_space = {"beta": Float(0.02, 0.5, log=True), "detail_steps": Int(10, 100, log=True)}

``search_space = None`` (the default) means "not tunable"; ``{}`` means "tunable on/off, no parameters".
Parameters of several plugins that must agree (LazyMAR's two caches share step types) declare one
``key``: the tuner samples one value for every parameter with that key.

Registration validates the declaration (:func:`check_search_space`): known fields, a range of the
field's type, ``low <= high``, ``log`` only over positive values, and both ends (every choice) accepted
by the ``Config`` itself; a bad declaration is refused with one line. This module imports nothing
heavy: plugins import it at registration time, the tuner (Optuna) lives in :mod:`marcache.tuning`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

from .errors import PluginError


@dataclass(frozen=True)
class Int:
    """Integers in ``[low, high]`` (both included); ``log``: sampled uniformly in log space."""

    low: int
    high: int
    log: bool = False
    key: Optional[str] = None

    def values(self) -> tuple:
        return (self.low, self.high)

    def describe(self) -> str:
        return f"int [{self.low}, {self.high}]" + (" log" if self.log else "")


@dataclass(frozen=True)
class Float:
    """Floats in ``[low, high]``; ``log``: sampled uniformly in log space."""

    low: float
    high: float
    log: bool = False
    key: Optional[str] = None

    def values(self) -> tuple:
        return (self.low, self.high)

    def describe(self) -> str:
        return f"float [{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


@dataclass(frozen=True)
class Categorical:
    """One of ``choices`` (str, int, float, bool or None)."""

    choices: tuple
    key: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))

    def values(self) -> tuple:
        return self.choices

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


Param = Union[Int, Float, Categorical]


def _field_kinds(config_cls: type) -> dict[str, set]:
    """``{field: {int, float, ...}}`` from the dataclass annotations (``Optional[int]`` -> ``{int, NoneType}``)."""
    hints = typing.get_type_hints(config_cls)
    kinds = {}
    for f in dataclasses.fields(config_cls):
        hint = hints.get(f.name, Any)
        args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
        kinds[f.name] = set(args)
    return kinds


def check_param(owner: str, config_cls: type, name: str, param: Any) -> None:
    """Refuse (with one :class:`PluginError` line) a range that ``config_cls`` would not accept.

    ``owner`` starts the message, e.g. ``"plugin 'fts': search_space"``."""
    label = f"{owner}[{name!r}]"
    kinds = _field_kinds(config_cls)
    if name not in kinds:
        close = difflib.get_close_matches(name, kinds, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PluginError(f"{label}: {config_cls.__name__} has no field {name!r}{hint}; fields: {', '.join(kinds) or 'none'}")
    if not isinstance(param, (Int, Float, Categorical)):
        raise PluginError(f"{label}: {param!r} is not a marcache.search_space Int, Float or Categorical")
    kind = kinds[name]
    if isinstance(param, (Int, Float)):
        want = int if isinstance(param, Int) else float
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in param.values()):
            raise PluginError(f"{label} = {param.describe()}: bounds must be finite numbers")
        if isinstance(param, Int) and not all(isinstance(v, int) for v in param.values()):
            raise PluginError(f"{label} = {param.describe()}: Int bounds must be integers (use Float for a real range)")
        if Any not in kind and want not in kind and not (want is int and float in kind):
            raise PluginError(f"{label} = {param.describe()}: the field is {_kind_text(kind)}, not {want.__name__}")
        if param.low > param.high:
            raise PluginError(f"{label} = {param.describe()}: low > high; swap the bounds")
        if param.log and param.low <= 0:
            raise PluginError(f"{label} = {param.describe()}: a log range needs low > 0")
    elif not param.choices:
        raise PluginError(f"{label}: Categorical needs at least one choice")
    elif len(set(map(repr, param.choices))) != len(param.choices):
        raise PluginError(f"{label} = {param.describe()}: choices must be distinct")
    for value in param.values():
        try:
            config_cls(**{name: value})
        except Exception as exc:  # the config's own validation decides what a valid value is
            raise PluginError(f"{label} = {param.describe()}: {name}={value!r} is refused by {config_cls.__name__} "
                              f"({str(exc).splitlines()[0]}); fix the declared range") from None


def _kind_text(kind: set) -> str:
    return " or ".join(getattr(k, "__name__", str(k)) for k in kind)


def check_search_space(cls) -> None:
    """Validate ``cls.search_space`` (called by :func:`marcache.plugin.register_plugin`)."""
    space = getattr(cls, "search_space", None)
    if space is None:
        return
    if not isinstance(space, dict):
        raise PluginError(f"plugin {cls.name!r}: search_space must be a dict {{field: Int/Float/Categorical}} or None")
    for name, param in space.items():
        check_param(f"plugin {cls.name!r}: search_space", cls.Config, name, param)


def describe_space(cls) -> list[str]:
    """One line per tunable parameter (``marcache plugins --tunable``)."""
    lines = []
    for name, param in (cls.search_space or {}).items():
        default = getattr(cls.Config(), name)
        shared = f", shared as {param.key!r}" if param.key else ""
        lines.append(f"{name}: {param.describe()} (default {default!r}{shared})")
    return lines
