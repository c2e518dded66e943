"""Plugin base class, the plugin registry, entry-point discovery and the plugin manager.

A plugin is a class with a ``name``, the hook ``families`` it claims, an optional ``conflicts`` list,
and a ``Config`` dataclass holding its parameters (validated by OmegaConf from policy YAML). Its hook
implementations are methods named after the specs in :mod:`marcache.hookspecs`.

Registration validates everything that can be checked without running (torch-fidelity style):
identifier name, uniqueness, known families, a dataclass config, that every ``marcache_*``
method belongs to a declared family, and the declared ``search_space`` (:mod:`marcache.search_space`).
The manager calls :meth:`pluggy.PluginManager.check_pending` after loading, so a misspelled hook name
fails loudly at startup.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import importlib.metadata
from collections import Counter
from typing import Any, ClassVar, Iterable, Optional

import pluggy

from . import hookspecs
from .errors import PluginError
from .hookspecs import hookimpl
from .search_space import check_search_space

ENTRY_POINT_GROUP = "marcache"

#: hook families and the hooks that belong to them. ``exclusive`` families accept one plugin per
#: policy (besides the built-in fallback); the others compose by refining plans in policy order.
FAMILIES: dict[str, dict[str, Any]] = {
    "order": {"hooks": {"marcache_token_order"}, "exclusive": True},
    "schedule": {"hooks": {"marcache_step_schedule"}, "exclusive": True},
    "order_refine": {"hooks": {"marcache_refine_order"}, "exclusive": False},
    "guidance": {"hooks": {"marcache_cfg_scale"}, "exclusive": False},
    "features": {"hooks": {"marcache_forward_plan"}, "exclusive": False},
    "cfg_reuse": {"hooks": {"marcache_forward_plan"}, "exclusive": False},
    "head": {"hooks": {"marcache_head_plan"}, "exclusive": False},
    "accounting": {"hooks": set(), "exclusive": False},
}
#: hooks any plugin may implement whatever its families
UNIVERSAL_HOOKS = {
    "marcache_configure",
    "marcache_generation_start",
    "marcache_step_end",
    "marcache_generation_end",
    "marcache_report",
}


@dataclasses.dataclass
class NoParams:
    """Config of a plugin without parameters."""


class Plugin:
    """Base class of every marcache plugin (built-in or third-party).

    Subclasses set ``name``, ``families``, optionally ``conflicts`` and ``Config``, and implement hooks
    as methods (``@hookimpl`` is only needed for options such as ``tryfirst``). ``self.engagement``
    counts what the plugin did; it is reported automatically under the plugin's name.
    """

    name: ClassVar[str] = ""
    families: ClassVar[frozenset] = frozenset()
    conflicts: ClassVar[tuple] = ()
    builtin: ClassVar[bool] = False
    Config: ClassVar[type] = NoParams
    description: ClassVar[str] = ""
    #: tunable parameters ({Config field: Int/Float/Categorical}, see marcache.search_space); None: not
    #: tunable, {}: tunable on/off only
    search_space: ClassVar[Optional[dict]] = None

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        self.engagement: Counter = Counter()

    def report_section(self) -> dict:
        """What this plugin adds to the run report (default: its engagement counters)."""
        return dict(self.engagement)

    @hookimpl
    def marcache_report(self) -> Optional[dict]:
        section = self.report_section()
        return {self.name: section} if section else None

    @classmethod
    def implemented_hooks(cls) -> list[str]:
        return sorted(n for n in dir(cls) if n.startswith("marcache_") and callable(getattr(cls, n)))


_REGISTRY: dict[str, type[Plugin]] = {}
_ENTRY_POINTS_LOADED = False


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Register a plugin class (usable as a decorator). Raises :class:`PluginError` if malformed."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginError(f"{cls!r} is not a subclass of marcache.plugin.Plugin")
    name = cls.name
    if not name or not name.isidentifier():
        raise PluginError(f"plugin class {cls.__name__}: name {name!r} must be a Python identifier")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise PluginError(f"plugin {name!r} is already registered by {_REGISTRY[name].__module__}")
    unknown = set(cls.families) - set(FAMILIES)
    if unknown:
        raise PluginError(f"plugin {name!r}: unknown hook families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    if not dataclasses.is_dataclass(cls.Config):
        raise PluginError(f"plugin {name!r}: Config must be a dataclass")
    allowed = set(UNIVERSAL_HOOKS).union(*(FAMILIES[f]["hooks"] for f in cls.families))
    for hook in cls.implemented_hooks():
        if hook in _all_spec_names() and hook not in allowed:
            owners = [f for f, spec in FAMILIES.items() if hook in spec["hooks"]]
            raise PluginError(f"plugin {name!r} implements {hook} but does not declare the family {' or '.join(owners)!r}")
    check_search_space(cls)
    _REGISTRY[name] = cls
    return cls


def _all_spec_names() -> set[str]:
    return {n for n in dir(hookspecs) if n.startswith("marcache_")}


def load_entry_points() -> None:
    """Register third-party plugin classes advertised under the ``marcache`` entry-point group.

    An entry point may name a :class:`Plugin` subclass or a module; a module contributes every
    Plugin subclass it defines.
    """
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party package must name itself
            raise PluginError(f"entry point {ep.name!r} ({ep.value}) failed to import: {exc}") from None
        classes = [obj] if isinstance(obj, type) else [
            v for v in vars(obj).values() if isinstance(v, type) and issubclass(v, Plugin) and v is not Plugin and v.name
        ]
        for cls in classes:
            if cls.name not in _REGISTRY:
                register_plugin(cls)


def available_plugins() -> dict[str, type[Plugin]]:
    """All registered plugin classes (built-ins, then entry points), by name."""
    from marcache.plugins import discover

    discover()  # built-ins register on import
    load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_plugin_class(name: str) -> type[Plugin]:
    plugins = available_plugins()
    if name not in plugins:
        close = difflib.get_close_matches(name, plugins, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PluginError(f"unknown plugin {name!r}.{hint} Known plugins: {', '.join(plugins)} (see `marcache plugins`)")
    return plugins[name]


def builtin_plugin_names() -> list[str]:
    """The official sampler's plugins, present in every policy unless disabled (sorted by name)."""
    return [n for n, c in available_plugins().items() if c.builtin]


class MarcachePluginManager(pluggy.PluginManager):
    """pluggy manager that also treats undecorated ``marcache_*`` methods as hook implementations
    (as pytest does for ``pytest_*``), so a misspelled hook is caught by ``check_pending``."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("marcache_") and callable(getattr(plugin, name, None)):
            opts = {}
        return opts


def check_conflicts(plugins: Iterable[Plugin]) -> None:
    """One clear line for declared conflicts or two plugins claiming an exclusive family."""
    plugins = list(plugins)
    names = {p.name for p in plugins}
    for p in plugins:
        for other in p.conflicts:
            if other in names:
                raise PluginError(f"plugins {p.name!r} and {other!r} conflict (declared by {p.name!r}); remove one from the policy")
    for family, spec in FAMILIES.items():
        if not spec["exclusive"]:
            continue
        claimants = [p.name for p in plugins if family in p.families and not p.builtin]
        if len(claimants) > 1:
            raise PluginError(f"plugins {claimants[0]!r} and {claimants[1]!r} both claim the exclusive hook family {family!r}; keep one")


def _validation_line(exc: pluggy.PluginValidationError) -> str:
    """pluggy's message in one line, keeping what names the problem (e.g. an argument the hookspec
    lacks) rather than its first line ("Plugin 'x' for hook 'y'")."""
    lines = str(exc).splitlines()
    hook = next((ln.split("'")[3] for ln in lines if ln.startswith("Plugin '") and ln.count("'") >= 4), None)
    detail = next((ln for ln in lines if ln.startswith("Argument(s)")), None)
    if hook and detail:
        spec = getattr(hookspecs, hook, None)
        names = ", ".join(inspect.signature(spec).parameters) if spec is not None else "?"
        return f"{hook}: {detail.replace('hookimpl', 'implementation')} (it accepts: {names})"
    return "; ".join(lines)


def hook_calls(pm: pluggy.PluginManager, name: str) -> list[tuple[str, Any, list[str]]]:
    """``(plugin name, function, argument names)`` of a hook's implementations in the order pluggy
    calls them, so the loop can call them one at a time and check each plugin's result."""
    impls = getattr(pm.hook, name).get_hookimpls()
    return [(impl.plugin_name, impl.function, list(impl.argnames)) for impl in reversed(impls)]


def build_plugin_manager(plugins: list[Plugin]) -> MarcachePluginManager:
    """Register ``plugins`` so refine hooks run in list order, then validate every hook name.

    pluggy calls plain implementations last-registered-first, so the list is registered in reverse:
    the first plugin of a policy refines a plan first, the last one has the final word.
    """
    check_conflicts(plugins)
    pm = MarcachePluginManager()
    for plugin in reversed(plugins):
        try:
            pm.register(plugin, name=plugin.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {plugin.name!r}: {_validation_line(exc)}") from None
        except ValueError as exc:
            raise PluginError(f"plugin {plugin.name!r} listed twice in the policy ({exc})") from None
    for plugin in plugins:  # pm.check_pending(), with the plugin's name and a suggestion
        for hook in plugin.implemented_hooks():
            if hook not in _all_spec_names():
                close = difflib.get_close_matches(hook, _all_spec_names(), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise PluginError(f"plugin {plugin.name!r}: unknown hook {hook}{hint}; hooks are listed in marcache/hookspecs.py")
    pm.check_pending()
    return pm
