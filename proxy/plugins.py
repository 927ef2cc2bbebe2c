"""Finding, loading and enabling plugins and classifiers.

Installed packages declare them as entry points in the groups ``hookproxy.plugins`` and
``hookproxy.classifiers``; hookproxy's own built-ins are declared the same way. An entry
point from another distribution with the same name as a built-in replaces the built-in.
"""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

import msgspec
import pluggy

from proxy import hookspecs, memo
from proxy.config import Config, ConfigError
from proxy.dispatch import (
    HookFailed,
    call_impl_sync,
    forget_implementations,
    implementations,
)
from proxy.errors import BadRequest

PLUGIN_GROUP = "hookproxy.plugins"
CLASSIFIER_GROUP = "hookproxy.classifiers"
GROUPS = {PLUGIN_GROUP: "plugin", CLASSIFIER_GROUP: "classifier"}
_encode = msgspec.json.Encoder().encode
SELF = "hookproxy"
# Keys of a [plugins.NAME] table that are hookproxy's, not the plugin's settings.
RESERVED = frozenset({"enabled", "locked"})


class PluginInfo(msgspec.Struct):
    name: str
    kind: str  # "plugin" or "classifier"
    package: str
    version: str
    hooks: list[str] = []
    enabled: bool = False
    error: str | None = None


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("hookproxy")
    pm.add_hookspecs(hookspecs)
    return pm


class PluginHost:
    """The plugin manager plus what is installed and what the config turns on."""

    def __init__(self) -> None:
        self.pm = new_plugin_manager()
        self.installed: dict[str, PluginInfo] = {}
        # name -> settings, for what config.toml enables.
        self.enabled: dict[str, dict[str, Any]] = {}
        self.enabled_classifiers: dict[str, dict[str, Any]] = {}
        # Every configured table's settings, enabled or not, and the locked names.
        self.configured: dict[str, dict[str, Any]] = {}
        self.locked: set[str] = set()
        self.max_request_settings_bytes = 64 * 1024

    def discover(self) -> None:
        """Imports every installed plugin; failures are recorded, not raised."""
        for group, kind in GROUPS.items():
            chosen: dict[str, md.EntryPoint] = {}
            for ep in md.entry_points(group=group):
                # Another package's plugin of the same name replaces a built-in.
                if ep.name not in chosen or (ep.dist and ep.dist.name != SELF):
                    chosen[ep.name] = ep
            for ep in chosen.values():
                self.load(ep, kind)

    def load(self, ep: md.EntryPoint, kind: str) -> None:
        """Imports one entry point and registers it; a failure is kept on its PluginInfo."""
        package = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        info = PluginInfo(name=ep.name, kind=kind, package=package, version=version)
        self.installed[ep.name] = info
        try:
            plugin = ep.load()
        except Exception as exc:
            info.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
            return
        try:
            self.add(plugin, ep.name, kind, info)
        except ConfigError as exc:
            info.error = str(exc)

    def add(self, plugin: object, name: str, kind: str = "plugin",
            info: PluginInfo | None = None) -> PluginInfo:
        """Registers a plugin object (a module or any object with hookimpls) by name."""
        forget_implementations()
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise ConfigError(f"plugin {name!r}: {exc}") from None
        hooks = [caller.name for caller in self.pm.get_hookcallers(plugin) or ()]
        for caller in self.pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper):
                    self.pm.unregister(plugin)
                    raise ConfigError(
                        f"plugin {name!r}: {caller.name} is a wrapper; hookproxy hooks "
                        "may not be wrappers")
        if info is None:
            info = PluginInfo(name=name, kind=kind, package="(registered in code)",
                              version="")
            self.installed[name] = info
        info.hooks = sorted(hooks)
        return info

    def enable(self, config: Config) -> None:
        """Turns on what config.toml enables; a plugin that is missing, failed to load or
        rejects its settings is a ConfigError naming it."""
        self.enabled, self.enabled_classifiers = {}, {}
        self.max_request_settings_bytes = config.server.max_request_settings_bytes
        # The memo plugins and classifiers share is bounded by the same config.
        memo.configure(config.server.memo_bytes, config.server.memo_entries)
        for section, kind, target in (("plugins", "plugin", self.enabled),
                                      ("classifiers", "classifier", self.enabled_classifiers)):
            for name, table in getattr(config, section).items():
                settings = {k: v for k, v in table.items() if k not in RESERVED}
                self.configured[name] = settings
                if table.get("locked"):
                    self.locked.add(name)
                info = self.installed.get(name)
                if not table.get("enabled", True):
                    if info:
                        info.enabled = False
                    continue
                where = f"{config.source}: [{section}.{name}]"
                if info is None:
                    known = ", ".join(sorted(n for n, i in self.installed.items()
                                             if i.kind == kind)) or "none"
                    raise ConfigError(f"{where}: no {kind} named {name!r} is installed "
                                      f"(installed: {known})")
                if info.error:
                    raise ConfigError(f"{where}: {kind} {name!r} cannot be used: {info.error}")
                problem = self.settings_error(name, settings)
                if problem:
                    raise ConfigError(f"{where}: {problem}")
                info.enabled = True
                target[name] = settings
        if config.auth.keys:
            self._enable_auth(config)

    def _enable_auth(self, config: Config) -> None:
        """[auth.keys] switch on the ``auth`` plugin, which no request may override."""
        info = self.installed.get("auth")
        if info is None or info.error:
            why = info.error if info else "it is not installed"
            raise ConfigError(f"{config.source}: [auth] needs the auth plugin: {why}")
        settings = msgspec.to_builtins(config.auth)
        problem = self.settings_error("auth", settings)
        if problem:
            raise ConfigError(f"{config.source}: [auth]: {problem}")
        info.enabled = True
        self.enabled = {"auth": settings, **self.enabled}
        self.locked.add("auth")

    def settings_error(self, name: str, settings: dict[str, Any]) -> str | None:
        """What the plugin's validate_settings hook says is wrong, or None."""
        for plugin, impl in implementations(self.pm, "validate_settings", {name: settings}):
            try:
                problem = call_impl_sync(plugin, "validate_settings", impl,
                                         {"settings": settings})
            except HookFailed as exc:
                return f"plugin {plugin!r} rejected its settings: {exc.error}"
            if problem:
                return f"plugin {plugin!r}: {problem}"
        return None

    def for_request(self, field: object) -> tuple[dict[str, dict[str, Any]],
                                                  dict[str, dict[str, Any]]]:
        """The plugins and classifiers for one request: what config.toml enables, plus
        what the request's ``hookproxy`` field adds or overrides::

            {"hookproxy": {"plugins": {"NAME": {...settings...} | true},
                           "classifiers": {"NAME": {...} | true}}}

        A request cannot switch off what the config enables, nor change the settings of
        a plugin whose table says ``locked = true``.
        """
        if field is None:
            return self.enabled, self.enabled_classifiers
        size = len(_encode(field))
        if size > self.max_request_settings_bytes:
            raise BadRequest(f"Invalid request: `hookproxy` is {size:,} bytes of JSON; at most "
                             f"{self.max_request_settings_bytes:,} are accepted",
                             code="request_settings_too_large")
        if not isinstance(field, dict) or set(field) - {"plugins", "classifiers"}:
            raise BadRequest("Invalid request: `hookproxy` must be an object with "
                             "`plugins` and/or `classifiers`")
        chosen = []
        for section, kind, base in (("plugins", "plugin", self.enabled),
                                    ("classifiers", "classifier", self.enabled_classifiers)):
            overrides = field.get(section) or {}
            if not isinstance(overrides, dict):
                raise BadRequest(f"Invalid request: `hookproxy.{section}` must be an object")
            result = dict(base)
            for name, value in overrides.items():
                where = f"`hookproxy.{section}.{name}`"
                info = self.installed.get(name)
                if info is None or info.kind != kind or info.error:
                    raise BadRequest(f"Invalid request: {where}: no usable {kind} named "
                                     f"{name!r}")
                if value is True:
                    value = {}
                if not isinstance(value, dict):
                    raise BadRequest(f"Invalid request: {where} must be true or an object "
                                     "of settings")
                if value and name in self.locked:
                    raise BadRequest(f"Invalid request: {where}: the settings of {name!r} "
                                     "are locked by the proxy's config")
                settings = {**self.configured.get(name, {}), **value}
                problem = self.settings_error(name, settings) if value else None
                if problem:
                    raise BadRequest(f"Invalid request: {where}: {problem}")
                result[name] = settings
            chosen.append(result)
        return chosen[0], chosen[1]
