"""Finding, loading and enabling plugins and classifiers.

Installed packages declare them as entry points in the groups ``hookproxy.plugins`` and
``hookproxy.classifiers``; hookproxy's own built-ins are declared the same way. An entry
point from another distribution with the same name as a built-in replaces the built-in.
"""

from __future__ import annotations

import importlib
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
from proxy.errors import BadRequest, ProxyError
from proxy.settings import client_adjustable_fields

PLUGIN_GROUP = "hookproxy.plugins"
CLASSIFIER_GROUP = "hookproxy.classifiers"
GROUPS = {PLUGIN_GROUP: "plugin", CLASSIFIER_GROUP: "classifier"}
_encode = msgspec.json.Encoder().encode
SELF = "hookproxy"
CODE = "(registered in code)"  # the package of a plugin added with PluginHost.add
# Keys of a [plugins.NAME] table that are hookproxy's, not the plugin's settings.
RESERVED = frozenset({"enabled", "locked", "per_request", "client_settings", "timeout",
                      "on_timeout"})


class PluginInfo(msgspec.Struct):
    name: str
    kind: str  # "plugin" or "classifier"
    package: str
    version: str
    hooks: list[str] = []
    enabled: bool = False
    error: str | None = None
    # The settings the plugin marks client-adjustable in its ``Settings`` Struct.
    client_settings: list[str] = []


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
        # What a request may do: switch these on, and set these settings of each.
        self.per_request: set[str] = set()
        self.adjustable: dict[str, frozenset[str]] = {}
        # Per-plugin hook time limits, and what a timeout does: "fail" the request (a 504)
        # or "skip" the plugin.
        self.timeouts: dict[str, float] = {}
        self.on_timeout: dict[str, str] = {}
        # Installed packages that make any config unusable until fixed (two packages with
        # one plugin name, a plugin with no hooks): check and serve refuse to go on.
        self.fatal: list[str] = []
        self.max_request_settings_bytes = 64 * 1024

    def discover(self) -> None:
        """Imports every installed plugin; failures are recorded, not raised.

        Another package's plugin of the same name replaces a built-in; two other packages
        with the same name is an error on that name, naming both."""
        importlib.invalidate_caches()  # packages installed since the process started
        for group, kind in GROUPS.items():
            chosen: dict[str, md.EntryPoint] = {}
            clashes: dict[str, set[str]] = {}
            for ep in md.entry_points(group=group):
                earlier = chosen.get(ep.name)
                if earlier is None or _package(earlier) == SELF:
                    chosen[ep.name] = ep
                elif _package(ep) not in (SELF, _package(earlier)):
                    clashes.setdefault(ep.name, {_package(earlier)}).add(_package(ep))
            for ep in chosen.values():
                self.load(ep, kind)
            for name, packages in clashes.items():
                self.installed[name].error = (
                    f"more than one package registers the {kind} {name!r}: "
                    f"{', '.join(sorted(packages))}; uninstall all but one")
                self.fatal.append(self.installed[name].error or "")

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
            if "no hook implementations" in info.error:
                self.fatal.append(f"{info.error} (package {package})")

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
        if not hooks:
            self.pm.unregister(plugin)
            raise ConfigError(f"{kind} {name!r} has no hook implementations (no function "
                              "marked @hookimpl): nothing would ever call it")
        for caller in self.pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper):
                    self.pm.unregister(plugin)
                    raise ConfigError(
                        f"plugin {name!r}: {caller.name} is a wrapper; hookproxy hooks "
                        "may not be wrappers")
        if info is None:
            info = PluginInfo(name=name, kind=kind, package=CODE, version="")
            self.installed[name] = info
        info.hooks = sorted(hooks)
        info.client_settings = sorted(client_adjustable_fields(getattr(plugin, "Settings",
                                                                       None)))
        return info

    def keep_registered_in_code(self, previous: PluginHost) -> None:
        """Registers again what was registered on ``previous`` in code (``add``), not
        through an entry point: a reload keeps it (tests, embedding)."""
        for name, info in previous.installed.items():
            plugin = previous.pm.get_plugin(name)
            if info.package == CODE and plugin is not None and name not in self.installed:
                self.add(plugin, name, info.kind)

    def enable(self, config: Config) -> None:
        """Turns on what config.toml enables; a plugin that is missing, failed to load or
        rejects its settings is a ConfigError naming it."""
        self.enabled, self.enabled_classifiers = {}, {}
        self.configured, self.locked, self.per_request, self.adjustable = {}, set(), set(), {}
        self.timeouts, self.on_timeout = {}, {}
        if self.fatal:
            raise ConfigError("installed plugins: " + "; ".join(self.fatal))
        self.max_request_settings_bytes = config.server.max_request_settings_bytes
        # The memo plugins and classifiers share is bounded by the same config.
        memo.configure(config.server.memo_bytes, config.server.memo_entries)
        for section, kind, target in (("plugins", "plugin", self.enabled),
                                      ("classifiers", "classifier", self.enabled_classifiers)):
            for name, table in getattr(config, section).items():
                settings = {k: v for k, v in table.items() if k not in RESERVED}
                self.configured[name] = settings
                where = f"{config.source}: [{section}.{name}]"
                info = self.installed.get(name)
                self._request_rights(name, table, info, where)
                if not table.get("enabled", True):
                    if info:
                        info.enabled = False
                    if name not in self.per_request:
                        continue
                if info is None:
                    known = ", ".join(sorted(n for n, i in self.installed.items()
                                             if i.kind == kind)) or "none"
                    raise ConfigError(f"{where}: no {kind} named {name!r} is installed "
                                      f"(installed: {known})")
                if info.error:
                    raise ConfigError(f"{where}: {kind} {name!r} cannot be used: {info.error}")
                if not table.get("enabled", True):
                    continue  # only per request: checked with what each request adds
                problem = self.settings_error(name, settings)
                if problem:
                    raise ConfigError(f"{where}: {problem}")
                info.enabled = True
                target[name] = settings
        if config.auth.keys:
            self._enable_auth(config)

    def active(self) -> dict[str, dict[str, Any]]:
        """Every plugin and classifier that may run on this config, by name, with its
        configured settings: what config.toml enables, and what a request may switch on.
        (The lifecycle hooks run for these.)"""
        available = {name: self.configured.get(name, {}) for name in sorted(self.per_request)
                     if name in self.installed and not self.installed[name].error}
        return {**available, **self.enabled_classifiers, **self.enabled}

    def _request_rights(self, name: str, table: dict[str, Any], info: PluginInfo | None,
                        where: str) -> None:
        """What the operator lets a request do with this plugin: ``per_request = true``
        lets a request switch it on; ``client_settings`` names the settings a request may
        set (default: those the plugin marks client-adjustable); ``locked = true``: none."""
        per_request = table.get("per_request", False)
        chosen = table.get("client_settings")
        if not isinstance(per_request, bool) or not isinstance(table.get("locked", False),
                                                               bool):
            raise ConfigError(f"{where}: per_request and locked must be true or false")
        if chosen is not None and not (isinstance(chosen, list)
                                       and all(isinstance(c, str) for c in chosen)):
            raise ConfigError(f"{where}: client_settings must be a list of setting names")
        timeout, on_timeout = table.get("timeout"), table.get("on_timeout", "fail")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
                    not 0 < timeout <= 3600:
                raise ConfigError(f"{where}: timeout must be a number of seconds (0-3600]")
            self.timeouts[name] = float(timeout)
        if on_timeout not in ("fail", "skip"):
            raise ConfigError(f"{where}: on_timeout must be \"fail\" or \"skip\"")
        self.on_timeout[name] = on_timeout
        if per_request:
            self.per_request.add(name)
        if table.get("locked"):
            self.locked.add(name)
            self.adjustable[name] = frozenset()
        elif chosen is not None:
            self.adjustable[name] = frozenset(chosen)
        elif info is not None:
            self.adjustable[name] = frozenset(info.client_settings)

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
        self.configured["auth"] = settings
        self.locked.add("auth")
        self.adjustable["auth"] = frozenset()

    def settings_error(self, name: str, settings: dict[str, Any]) -> str | None:
        """What the plugin's validate_settings hook says is wrong, or None."""
        for plugin, impl in implementations(self.pm, "validate_settings", {name: settings}):
            try:
                problem = call_impl_sync(plugin, "validate_settings", impl, (settings,))
            except HookFailed as exc:
                return f"plugin {plugin!r} rejected its settings: {exc.error}"
            if problem:
                return f"plugin {plugin!r}: {problem}"
        return None

    def for_request(self, field: object) -> tuple[dict[str, dict[str, Any]],
                                                  dict[str, dict[str, Any]], frozenset[str]]:
        """The plugins and classifiers for one request, and the classifiers whose settings
        the request changed: what config.toml enables, plus what the request's
        ``hookproxy`` field adds or overrides::

            {"hookproxy": {"plugins": {"NAME": {...settings...} | true},
                           "classifiers": {"NAME": {...} | true}}}

        The operator decides what this may do. A request may switch on only what the
        config marks ``per_request = true``, and set only the settings the plugin marks
        client-adjustable (or the config lists in ``client_settings``); nothing of a
        ``locked`` table. It cannot switch off or weaken anything else the config enables.
        """
        if field is None:
            return self.enabled, self.enabled_classifiers, _NONE
        size = len(_encode(field))
        if size > self.max_request_settings_bytes:
            raise BadRequest(f"Invalid request: `hookproxy` is {size:,} bytes of JSON; at most "
                             f"{self.max_request_settings_bytes:,} are accepted",
                             code="request_settings_too_large")
        if not isinstance(field, dict) or set(field) - {"plugins", "classifiers"}:
            raise BadRequest("Invalid request: `hookproxy` must be an object with "
                             "`plugins` and/or `classifiers`")
        chosen = []
        client_set: set[str] = set()
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
                if name not in base and name not in self.per_request:
                    raise _forbidden(f"{where}: the {kind} {name!r} is not available per "
                                     "request on this proxy")
                if value is True:
                    value = {}
                if not isinstance(value, dict):
                    raise BadRequest(f"Invalid request: {where} must be true or an object "
                                     "of settings")
                refused = sorted(set(value) - self.adjustable.get(name, frozenset()))
                if refused:
                    why = ("its settings are locked by the proxy's config"
                           if name in self.locked else
                           f"a request may set only {_names(self.adjustable.get(name))}")
                    raise _forbidden(f"{where}: may not set {_names(refused)} of {name!r}: "
                                     f"{why}")
                settings = {**self.configured.get(name, {}), **value}
                if value or name not in base:
                    problem = self.settings_error(name, settings)
                    if problem:
                        raise BadRequest(f"Invalid request: {where}: {problem}")
                if value and kind == "classifier":
                    client_set.add(name)
                result[name] = settings
            chosen.append(result)
        return chosen[0], chosen[1], frozenset(client_set)


_NONE: frozenset[str] = frozenset()


def _package(ep: md.EntryPoint) -> str:
    return ep.dist.name if ep.dist else "?"


def _names(names: Any) -> str:
    return ", ".join(f"`{n}`" for n in sorted(names or ())) or "none of them"


def _forbidden(message: str) -> ProxyError:
    return ProxyError(403, f"Not allowed: {message}", code="not_allowed", stage="request")
