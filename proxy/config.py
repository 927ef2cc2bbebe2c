"""config.toml, decoded into msgspec Structs that refuse unknown keys.

Every problem is a ``ConfigError`` whose message names the file and the key, so that
``hookproxy check`` and ``hookproxy serve`` can print it instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import structlog

log = structlog.get_logger("hookproxy.config")
ProviderType = Literal["openai", "anthropic", "mock"]

DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "mock": "",
}


class ConfigError(Exception):
    """A config that cannot be used; the message names the file and key."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = 8080
    # Request bodies larger than this get a 413.
    max_body_bytes: int = 20 * 1024 * 1024
    # Seconds an async plugin hook may take before it counts as failed.
    plugin_timeout: float = 10.0
    # Seconds each classifier may take; a slow one only loses its own tags.
    classifier_timeout: float = 1.0
    # Requests with more messages than this get a 400.
    max_messages: int = 10_000
    # A request's own `hookproxy` field (the plugin and classifier settings it adds or
    # overrides) larger than this, as JSON, gets a 400: what a client may hand to a
    # pattern engine, a keyword automaton or a settings cache stays small.
    max_request_settings_bytes: int = 64 * 1024
    # The memo of per-message work (decoded messages, classifier verdicts, redaction
    # findings, guard verdicts) that makes a resent history cheap: bytes kept, and
    # entries kept, at most.
    memo_bytes: int = 64 * 1024 * 1024
    memo_entries: int = 200_000
    # Seconds an idle client connection stays open; longer than clients' own idle expiry
    # (5 s in httpx, which both SDKs use), so that a client never reuses one the proxy is
    # closing at that moment.
    keepalive_timeout: float = 75.0
    # Without [auth] keys, serve binds only to loopback unless this is true.
    allow_unauthenticated: bool = False
    # A request's line and headers together; larger gets a 431 and the connection closes.
    max_header_bytes: int = 64 * 1024
    # Seconds a client has to send a request's headers, from connecting or from the
    # request's first byte; a slower one is disconnected.
    header_timeout: float = 10.0
    # Seconds a client has to send a request's body, from the end of its headers; a
    # slower one gets a 408 and the connection closes.
    body_timeout: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # Host header values served (DNS rebinding defence), "*.example.com" for subdomains,
    # "*" for any. Empty: loopback names and the bound address (any, when bound to all
    # interfaces).
    allowed_hosts: list[str] = []
    # Processes serving the port ("auto": one per core). More than one needs [store] for
    # limits and the cache, which must be shared to hold.
    workers: int | Literal["auto"] = 1


class ProviderConfig(_Strict):
    type: ProviderType
    # Defaults to the vendor's public API for openai and anthropic.
    base_url: str = ""
    # Name of the environment variable holding the key; never the key itself.
    api_key_env: str | None = None
    # Seconds for the whole upstream call (a stream: until its last byte).
    timeout: float = 120.0
    # Anthropic requires max_tokens; requests that do not say get this.
    default_max_tokens: int = 4096
    headers: dict[str, str] = {}
    enabled: bool = True
    # mock only: seconds to wait before each streamed chunk.
    chunk_delay: float = 0.0
    # openai only: the server has the Responses API (POST /responses): a Responses client's
    # request goes to it as it came, instead of translated to Chat Completions.
    responses: bool = False
    # Caps on what is read from this provider; past any of them the answer is a 502.
    # An answer's body as it comes over the network (a stream is not capped as a whole)...
    max_response_bytes: int = 32 * 1024 * 1024
    # ...and once decompressed (gzip/deflate), so that a small bomb cannot inflate.
    max_decompressed_bytes: int = 64 * 1024 * 1024
    # One server-sent event still waiting for its end in a stream.
    max_event_bytes: int = 4 * 1024 * 1024


Strategy = Literal["fallback", "round_robin", "weighted", "least_latency", "cheapest"]


class TargetConfig(_Strict):
    provider: str
    # The provider's own name for the model; defaults to the group's ``name``.
    model: str = ""
    # Relative share of traffic under the ``weighted`` strategy.
    weight: float = 1.0
    # Prices in currency units per million tokens, for ``cheapest`` and for cost in the log.
    input_price: float = 0.0
    output_price: float = 0.0
    # Prices of input tokens read from and written to the provider's prompt cache; unset:
    # the input price.
    cache_read_price: float | None = None
    cache_write_price: float | None = None
    # Context window in tokens (0: unknown); a context-length error falls back to a
    # target with a larger one.
    context: int = 0


class ModelConfig(_Strict):
    # The name clients ask for.
    name: str
    # Shorthand for a single target: provider (+ model, prices, context).
    provider: str = ""
    model: str = ""
    input_price: float = 0.0
    output_price: float = 0.0
    cache_read_price: float | None = None
    cache_write_price: float | None = None
    context: int = 0
    # Or several targets, tried in the order the strategy gives.
    targets: list[TargetConfig] = []
    strategy: Strategy = "fallback"


class RouteConfig(_Strict):
    """A routing rule: when everything given matches, the request goes to model ``to``."""

    to: str
    tags_all: list[str] = []
    tags_any: list[str] = []
    # Globs on the requested model and on the caller's key name.
    model: str = ""
    caller: str = ""
    # Let tags from classifiers whose settings a request changed match this rule.
    allow_client_tags: bool = False


class RoutingConfig(_Strict):
    # Retries per target on transient failures (429, 5xx, connection errors, timeouts).
    retries: int = 2
    # First retry delay in seconds; doubles each retry, with jitter, up to backoff_max.
    backoff: float = 0.25
    backoff_max: float = 5.0
    # A provider's Retry-After is honoured up to this many seconds.
    retry_after_max: float = 10.0
    # A target failing this many times within cooldown_window seconds is skipped for
    # cooldown seconds.
    cooldown_failures: int = 3
    cooldown_window: float = 60.0
    cooldown: float = 30.0
    # Seed for the weighted strategy's choices (None: random).
    seed: int | None = None


class LogConfig(_Strict):
    # JSONL request log, relative to the config file's folder; "" turns it off.
    path: str = "logs/requests.jsonl"
    # Request and response bodies in the record: "none", "truncated" or "full".
    bodies: Literal["none", "truncated", "full"] = "truncated"
    # With bodies = "truncated": strings longer than this are cut.
    truncate_chars: int = 2000
    # No record (log line and dashboard event) is larger: a body is shown as a bounded
    # view (its first and newest messages), and a record still over this goes without
    # its bodies.
    max_record_bytes: int = 256 * 1024
    # Rotate the file past this size, keeping this many old files (requests.jsonl.1 ...).
    max_bytes: int = 50 * 1024 * 1024
    keep: int = 5
    # Lines waiting to be written; past this they are dropped and counted, not waited for.
    queue_size: int = 10_000


class DashboardConfig(_Strict):
    # Recent records held in memory for new and reconnecting dashboard subscribers: at
    # most this many, and at most held_bytes of them.
    held: int = 1000
    held_bytes: int = 32 * 1024 * 1024
    # Seconds between keep-alive comments on an idle /dashboard/events stream.
    keepalive: float = 15.0
    # Records a subscriber may fall behind by before it is dropped (it then reconnects
    # and resumes from what is held).
    subscriber_queue: int = 1000


class ResponsesConfig(_Strict):
    """Responses stored for ``previous_response_id`` and ``GET /v1/responses/{id}``."""

    # Seconds a stored response is kept, and how many are kept at most (the least
    # recently used go first).
    store_ttl: float = 86400.0
    store_entries: int = 10_000


class KeyConfig(_Strict):
    """One client key. Its secret is given by environment variable or as a SHA-256 hash."""

    key_env: str = ""
    key_sha256: str = ""
    # Globs of the model names this key may ask for.
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    # Limits; 0 means none. Budgets are in the currency of the configured prices.
    rpm: int = 0
    tpm: int = 0
    daily_budget: float = 0.0
    monthly_budget: float = 0.0
    # Fractions of each budget whose crossing is a warning (app log, metric, record); 0: none.
    daily_budget_warn: float = 0.8
    monthly_budget_warn: float = 0.8
    # Cache entries are this key's own unless this is true: then they are shared with the
    # other keys that share (and with requests without a key).
    share_cache: bool = False


class AuthConfig(_Strict):
    keys: dict[str, KeyConfig] = {}
    # The key for /dashboard, /dashboard/events, /metrics and /admin/* once keys exist.
    admin_key_env: str = ""
    admin_key_sha256: str = ""
    # Seconds a dashboard login lasts; a changed admin key ends every session at once.
    admin_session_ttl: float = 12 * 3600.0
    # Output tokens reserved against tpm and budgets for a request that names no
    # max_tokens.
    reserve_output_tokens: int = 4096


class StoreConfig(_Strict):
    """Where shared state lives: in the process (one worker), or in Redis."""

    # "redis://host:6379/0", "rediss://..." or "unix:///path"; "": in the process.
    url: str = ""
    # Put before every key, so that several hookproxy instances can share one Redis.
    prefix: str = "hookproxy:"
    # Seconds a Redis call may take before it counts as failed.
    timeout: float = 0.5
    # Connections to Redis per process, at most; calls beyond wait for one (within timeout).
    connections: int = 64
    # While Redis cannot be reached: limits refuse requests ("closed", a 503) or let them
    # through unchecked ("open"); the cache is skipped ("open") or refuses ("closed").
    limits_on_error: Literal["closed", "open"] = "closed"
    cache_on_error: Literal["closed", "open"] = "open"
    # Records the dashboard's shared stream (a Redis Stream) keeps for replay.
    feed_length: int = 1000
    # In the process: values kept at most (least recently used go first).
    max_entries: int = 100_000


class Config(_Strict):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    providers: dict[str, ProviderConfig] = {}
    models: list[ModelConfig] = []
    routes: list[RouteConfig] = []
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    # [plugins.NAME] and [classifiers.NAME]: ``enabled`` plus the plugin's own settings.
    plugins: dict[str, dict[str, Any]] = {}
    classifiers: dict[str, dict[str, Any]] = {}
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    responses: ResponsesConfig = msgspec.field(default_factory=ResponsesConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    # Where this config was read from, for messages.
    source: str = "<config>"


_AT = re.compile(r" - at `\$\.?(.*)`$")


def _explain(exc: msgspec.ValidationError, source: str, prefix: str = "") -> str:
    message = str(exc)
    match = _AT.search(message)
    if not match:
        return f"{source}: {message}" + (f" (at key `{prefix}`)" if prefix else "")
    where = ".".join(p for p in (prefix, match.group(1)) if p) or "(top level)"
    return f"{source}: {message[: match.start()]} (at key `{where}`)"


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    # Tables keyed by name are checked one by one so that an error can name the table
    # (msgspec reports a dict value's path as `providers[...]`).
    for section, where, kind in (("providers", "providers", ProviderConfig),
                                 ("auth", "auth.keys", KeyConfig)):
        tables = data.get(section)
        if section == "auth" and isinstance(tables, dict):
            tables = tables.get("keys")
        for name, table in (tables or {}).items() if isinstance(tables, dict) else ():
            try:
                msgspec.convert(table, kind)
            except msgspec.ValidationError as exc:
                raise ConfigError(_explain(exc, source, f"{where}.{name}")) from None
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None
    config.source = source
    for name, provider in config.providers.items():
        provider.base_url = (provider.base_url or DEFAULT_BASE_URLS[provider.type]).rstrip("/")
        if provider.type != "mock" and not provider.base_url:
            raise ConfigError(f"{source}: providers.{name}.base_url is required")
        if provider.timeout <= 0:
            raise ConfigError(f"{source}: providers.{name}.timeout must be positive")
        if "/" in name:
            raise ConfigError(f"{source}: provider name {name!r} must not contain '/'")
        if provider.responses and provider.type != "openai":
            raise ConfigError(f"{source}: providers.{name}.responses: only an openai "
                              f"provider can have the Responses API, not {provider.type}")
    seen: set[str] = set()
    # Clients are inconsistent about case: names that differ only in it are a trap.
    folded: dict[str, str] = {}
    for i, model in enumerate(config.models):
        _check_model(model, f"{source}: models[{i}]", config)
        if model.name in seen:
            raise ConfigError(f"{source}: models[{i}].name {model.name!r} is defined twice")
        other = folded.get(model.name.casefold())
        if other is not None:
            raise ConfigError(f"{source}: models[{i}].name {model.name!r} differs from "
                              f"{other!r} only in case; give them distinct names")
        seen.add(model.name)
        folded[model.name.casefold()] = model.name
    for i, route in enumerate(config.routes):
        if route.to not in seen:
            raise ConfigError(f"{source}: routes[{i}].to names {route.to!r}, which is not a "
                              f"[[models]] name (known: {', '.join(sorted(seen)) or 'none'})")
    for name, key in config.auth.keys.items():
        if bool(key.key_env) == bool(key.key_sha256):
            raise ConfigError(f"{source}: auth.keys.{name}: give one of key_env or key_sha256")
        if key.key_sha256 and not re.fullmatch(r"[0-9a-f]{64}", key.key_sha256):
            raise ConfigError(f"{source}: auth.keys.{name}.key_sha256 must be 64 hex digits")
    if config.responses.store_ttl <= 0 or config.responses.store_entries < 1:
        raise ConfigError(f"{source}: responses.store_ttl and responses.store_entries must "
                          "be positive")
    _check_store(config)
    routing = config.routing
    if routing.retries < 0 or routing.cooldown_failures < 1:
        raise ConfigError(f"{source}: routing.retries must be >= 0 and "
                          "routing.cooldown_failures >= 1")
    for section in ("plugins", "classifiers"):
        for name, settings in getattr(config, section).items():
            if not isinstance(settings.get("enabled", True), bool):
                raise ConfigError(f"{source}: {section}.{name}.enabled must be true or false")
    return config


def _check_store(config: Config) -> None:
    source, store = config.source, config.store
    if store.url and urllib.parse.urlsplit(store.url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{source}: store.url must be a redis://, rediss:// or unix:// URL")
    if store.timeout <= 0 or min(store.feed_length, store.max_entries, store.connections) < 1:
        raise ConfigError(f"{source}: store.timeout, store.connections, store.feed_length "
                          "and store.max_entries must be positive")
    workers = config.server.workers
    if isinstance(workers, int) and workers < 1:
        raise ConfigError(f"{source}: server.workers must be at least 1, or \"auto\"")
    for name, key in config.auth.keys.items():
        for field in ("daily_budget_warn", "monthly_budget_warn"):
            if not 0 <= getattr(key, field) < 1:
                raise ConfigError(f"{source}: auth.keys.{name}.{field} must be a fraction "
                                  "of the budget, at least 0 and below 1")
    if config.auth.reserve_output_tokens < 1:
        raise ConfigError(f"{source}: auth.reserve_output_tokens must be positive")


def _check_model(model: ModelConfig, where: str, config: Config) -> None:
    if model.provider and model.targets:
        raise ConfigError(f"{where}: give either provider or targets, not both")
    if model.provider:
        model.targets = [TargetConfig(provider=model.provider, model=model.model,
                                      input_price=model.input_price,
                                      output_price=model.output_price,
                                      cache_read_price=model.cache_read_price,
                                      cache_write_price=model.cache_write_price,
                                      context=model.context)]
    if not model.targets:
        raise ConfigError(f"{where}: needs a provider or a list of targets")
    for j, target in enumerate(model.targets):
        key = f"{where}.provider" if model.provider else f"{where}.targets[{j}].provider"
        if target.provider not in config.providers:
            known = ", ".join(config.providers) or "none"
            raise ConfigError(f"{key} names {target.provider!r}, which is not in [providers] "
                              f"(known: {known})")
        if target.weight <= 0:
            raise ConfigError(f"{where}.targets[{j}].weight must be a positive number, "
                              f"not {target.weight:g}")
        if min(target.input_price, target.output_price, target.context,
               target.cache_read_price or 0.0, target.cache_write_price or 0.0) < 0:
            raise ConfigError(f"{where}.targets[{j}]: prices and context must not be negative")
        target.model = target.model or model.name


# The source named by a config that came from the package, not from a file.
BUILTIN_SOURCE = "<built-in default>"
DEFAULT_PATH = "config.toml"


def packaged_text(name: str) -> str:
    """A file shipped inside the package: ``default.toml`` (what serve runs on when there
    is no config file) or ``starter.toml`` (the annotated config ``hookproxy init`` writes).
    """
    return resources.files("proxy").joinpath(name).read_text(encoding="utf-8")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Reads ``path``; with None, ./config.toml if there is one, else the built-in
    default (the mock provider on loopback), whose log goes to the current folder."""
    if path is None:
        path = DEFAULT_PATH if Path(DEFAULT_PATH).exists() else BUILTIN_SOURCE
    source = str(path)
    if source == BUILTIN_SOURCE:
        return _from_text(packaged_text("default.toml"), source, Path.cwd())
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    return _from_text(text, source, Path(path).parent)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_warnings(config: Config, environ: os._Environ[str] | dict[str, str] | None = None
                    ) -> list[str]:
    """What in ``config`` works but is probably not what the operator wants."""
    env = os.environ if environ is None else environ
    warnings = []
    for name, provider in config.providers.items():
        url = urllib.parse.urlsplit(provider.base_url)
        if provider.enabled and url.scheme == "http" and not _is_loopback_host(
                url.hostname or ""):
            warnings.append(f"{config.source}: providers.{name}.base_url is plain http to "
                            f"{url.hostname}: its API key and every prompt cross the network "
                            "unencrypted; use https")
    admin = config.auth.admin_key_env
    if admin and not env.get(admin):
        effect = ("the dashboard, /metrics and /admin refuse everyone"
                  if config.auth.keys and not config.auth.admin_key_sha256 else
                  "set it before the admin key is needed")
        warnings.append(f"{config.source}: auth.admin_key_env names {admin}, which is not "
                        f"set: {effect}")
    return warnings


def _from_text(text: str, source: str, folder: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    config = parse_config(data, source)
    if config.log.path and not Path(config.log.path).is_absolute():
        config.log.path = str(folder / config.log.path)
    for warning in config_warnings(config):
        log.warning(warning)
    return config


def available_providers(config: Config, environ: os._Environ[str] | dict[str, str] | None = None
                        ) -> tuple[dict[str, ProviderConfig], dict[str, str]]:
    """Splits the configured providers into usable ones and skipped ones (name -> why)."""
    env = os.environ if environ is None else environ
    usable: dict[str, ProviderConfig] = {}
    skipped: dict[str, str] = {}
    for name, provider in config.providers.items():
        if not provider.enabled:
            skipped[name] = "enabled = false"
        elif provider.api_key_env and not env.get(provider.api_key_env):
            skipped[name] = f"environment variable {provider.api_key_env} is not set"
        else:
            usable[name] = provider
    return usable, skipped
