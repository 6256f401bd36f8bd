"""Plugins by name: the built-ins, ones registered in code, and third-party ones found through the
Python entry-point group ``loft_ext.plugins`` (``[project.entry-points."loft_ext.plugins"]`` in a
package's pyproject.toml: ``name = "package.module:PluginClass"``).

The recipe's flags map to built-in names (``--earlybird`` -> ``earlybird``); ``--plugins a,b`` adds
any registered or discovered plugin, created with no arguments.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..errors import ConfigError
from .base import Plugin

ENTRY_POINT_GROUP = "loft_ext.plugins"

# built-ins by import path, so that listing them imports nothing heavy
BUILTIN = {
    "progress": "loft_ext.plugins.progress:Progress",
    "filter_distance": "loft_ext.plugins.distance:FilterDistance",
    "distance_stop": "loft_ext.plugins.distance:DistanceStop",
    "earlybird": "loft_ext.plugins.earlybird:EarlyBird",
    "nonfinite_guard": "loft_ext.plugins.guard:NonFiniteGuard",
    "preemption": "loft_ext.plugins.preemption:Preemption",
    "save_weights": "loft_ext.plugins.snapshots:SaveWeights",
    "ticket_drawer": "loft_ext.tickets.plugins:TicketDrawer",
    "mask_enforcement": "loft_ext.tickets.plugins:MaskEnforcement",
}
_registered: dict[str, type] = {}


class PluginNotFound(ConfigError):
    """No plugin of that name is built in, registered or installed."""


def register_plugin(name: str, cls: type | None = None):
    """Register ``cls`` (a Plugin subclass) under ``name``; usable as a decorator."""
    def add(cls):
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise ConfigError(f"register_plugin({name!r}): {cls!r} is not a subclass of loft_ext.Plugin")
        _registered[name] = cls
        return cls
    return add(cls) if cls is not None else add


def _load(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def available_plugins() -> dict[str, str]:
    """name -> where it comes from (built-in import path, 'registered', or the entry point's value)."""
    out = dict(BUILTIN)
    out.update({ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)})
    out.update({name: "registered" for name in _registered})
    return out


def plugin_class(name: str) -> type:
    if name in _registered:
        return _registered[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            break
    else:
        if name not in BUILTIN:
            raise PluginNotFound(f"no plugin named {name!r}; available: {', '.join(sorted(available_plugins()))} "
                                 f"(install a package that declares it in the entry-point group {ENTRY_POINT_GROUP!r}, "
                                 "or call loft_ext.register_plugin)")
        cls = _load(BUILTIN[name])
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ConfigError(f"plugin {name!r} resolves to {cls!r}, which is not a subclass of loft_ext.Plugin")
    return cls


def create_plugin(name: str, **kwargs) -> Plugin:
    """An instance of the plugin ``name`` (built-in, registered or discovered) created with ``kwargs``."""
    cls = plugin_class(name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"plugin {name!r} cannot be created with {sorted(kwargs)}: {exc}") from None
