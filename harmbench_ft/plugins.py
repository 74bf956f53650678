"""The plugin manager and the one registry of named things (defenses, tasks, judges, backends, executors).

Built-in plugins (package ``hft_bench_plugins``) and third-party packages are found the same way:
through the ``hft_bench`` entry-point group. A plugin that fails to import is recorded and reported;
it only breaks runs that ask for something it would have registered. So does one that names an unknown hook
or whose registration hook raises.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

import pluggy

from harmbench_ft import hookspecs
from harmbench_ft.errors import PluginError, UsageError

KINDS = ("defenses", "tasks", "judges", "backends", "executors")

pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)


@dataclass
class LoadFailure:
    entry_point: str
    distribution: str
    error: str


@dataclass
class PluginState:
    loaded: bool = False
    failures: list[LoadFailure] = field(default_factory=list)
    # plugin name -> distribution "name version" (or "(registered in-process)")
    distributions: dict[str, str] = field(default_factory=dict)
    registration_failures: list[LoadFailure] = field(default_factory=list)  # from the last registry build


_state = PluginState()
_registry: Registry | None = None


def load_plugins(rescan: bool = False) -> None:
    """Load every ``hft_bench`` entry point once; record, don't raise, on import failures.

    ``rescan=True`` looks again for entry points installed since (a notebook, a test).
    """
    global _registry
    if _state.loaded and not rescan:
        return
    _state.loaded = True
    if rescan:
        _state.failures.clear()
        _registry = None
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "(unknown distribution)"
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)  # a hookimpl whose arguments the spec does not have is refused here
        except Exception as exc:  # a broken plugin must not break the others
            _state.failures.append(LoadFailure(f"{ep.name} = {ep.value}", dist, f"{type(exc).__name__}: {exc}"))
            continue
        unknown = _unknown_hooks(plugin)
        if unknown:  # a misspelled hook name is reported like a failed import, not a silent no-op, nor fatal to all
            pm.unregister(plugin)
            _state.failures.append(LoadFailure(f"{ep.name} = {ep.value}", dist, f"unknown hook(s) {', '.join(unknown)} (misspelled?); the hooks are in harmbench_ft/hookspecs.py"))
            continue
        _state.distributions[ep.name] = dist
    pm.check_pending()


def _unknown_hooks(plugin: Any) -> list[str]:
    """Hook names a plugin implements that no hookspec defines."""
    return sorted(name for name, caller in vars(pm.hook).items() if not name.startswith("_") and not caller.has_spec() and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()))


def register_plugin(plugin: Any, name: str) -> None:
    """Register an in-process plugin (tests, notebooks); the registry is rebuilt on next use."""
    global _registry
    pm.register(plugin, name=name)
    pm.check_pending()
    _state.distributions[name] = "(registered in-process)"
    _registry = None


def unregister_plugin(name: str) -> None:
    global _registry
    pm.unregister(name=name)
    _state.distributions.pop(name, None)
    _registry = None


def load_failures() -> list[LoadFailure]:
    """Plugins that failed to import, named an unknown hook, or whose registration hook raised."""
    get_registry()
    return [*_state.failures, *_state.registration_failures]


@dataclass
class Entry:
    name: str
    obj: Any
    plugin: str  # plugin (entry point) name that registered it
    distribution: str


class Registry:
    """Named objects of each kind, with where each came from; a duplicate name is an error."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, obj: Any, plugin: str) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind[:-1]} without a string 'name': {obj!r}")
        dist = _state.distributions.get(plugin, "(unknown distribution)")
        if name in self.entries[kind]:
            first = self.entries[kind][name]
            raise PluginError(
                f"{kind[:-1]} {name!r} is registered twice: by plugin {first.plugin!r} ({first.distribution}) "
                f"and by plugin {plugin!r} ({dist}); uninstall or rename one of them"
            )
        self.entries[kind][name] = Entry(name, obj, plugin, dist)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.entries[kind][name].obj
        except KeyError:
            known = ", ".join(self.names(kind)) or "(none)"
            hint = ""
            failures = [*_state.failures, *_state.registration_failures]
            if failures:
                broken = "; ".join(f.entry_point for f in failures)
                hint = f" (plugins that failed to load: {broken}; see 'hft-bench plugins')"
            raise UsageError(f"unknown {kind[:-1]} {name!r}; known: {known}{hint}") from None


def get_registry() -> Registry:
    """Build the registry once by calling every registration hook, plugin by plugin."""
    global _registry
    if _registry is not None:
        return _registry
    load_plugins()
    registry = Registry()
    failed: dict[str, LoadFailure] = {}
    for kind in KINDS:
        hook = getattr(pm.hook, f"hft_register_{kind}")
        for impl in hook.get_hookimpls():
            if impl.plugin_name in failed:
                continue
            try:
                impl.function(register=lambda obj, _kind=kind, _plugin=impl.plugin_name: registry.add(_kind, obj, _plugin))
            except PluginError:  # a name clash or a malformed registration: the contract itself, reported as such
                raise
            except Exception as exc:  # a hook that raises loses its plugin, not every command
                name = impl.plugin_name
                failed[name] = LoadFailure(f"{name} (hft_register_{kind})", _state.distributions.get(name, "(unknown distribution)"), f"{type(exc).__name__}: {exc}")
                for entries in registry.entries.values():
                    for key in [k for k, e in entries.items() if e.plugin == name]:
                        del entries[key]
    _state.registration_failures = list(failed.values())
    _registry = registry
    return registry


def describe_plugins() -> list[dict[str, Any]]:
    """What `hft-bench plugins` prints: each distribution with its plugins and what they register."""
    registry = get_registry()
    rows: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        for entry in registry.entries[kind].values():
            row = rows.setdefault(entry.distribution, {"distribution": entry.distribution, "plugins": set()})
            row["plugins"].add(entry.plugin)
            row.setdefault(kind, []).append(entry.name)
    out = []
    for row in rows.values():
        row["plugins"] = sorted(row["plugins"])
        out.append(row)
    for failure in [*_state.failures, *_state.registration_failures]:
        out.append({"distribution": failure.distribution, "plugins": [failure.entry_point], "error": failure.error})
    return sorted(out, key=lambda r: r["distribution"])


def emit(hook_name: str, event: Any) -> None:
    """Call a lifecycle hook on every plugin."""
    load_plugins()
    getattr(pm.hook, hook_name)(event=event)
