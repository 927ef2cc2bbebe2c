"""auth: client keys, allowed models, and per-key limits (requests and tokens per minute,
spending per day and per month). Switched on by ``[auth.keys.NAME]`` tables in
config.toml rather than by a [plugins] table:

    [auth.keys.team-a]
    key_env = "TEAM_A_KEY"          # or key_sha256 = "<64 hex digits>"
    models = ["gpt-*", "mock-*"]    # globs; default: every model
    rpm = 60                        # requests per minute (0: no limit)
    tpm = 100000                    # tokens per minute
    daily_budget = 5.0              # spending from the configured prices
    monthly_budget = 100.0

Keys are accepted as ``Authorization: Bearer <key>`` (OpenAI SDK) and ``x-api-key``
(Anthropic SDK), compared as SHA-256 digests in constant time. The key's name, never the
key, goes on ``ctx.caller`` and into the log. Counters live behind ``proxy.store.Store``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import time
from typing import Any

from proxy import Reject, RequestContext, hookimpl
from proxy.config import AuthConfig
from proxy.settings import settings_as, settings_error
from proxy.store import MemoryStore, Store

MICRO = 1_000_000  # budgets are counted in millionths
store: Store = MemoryStore(max_entries=100_000)
_digests: dict[int, tuple[AuthConfig, dict[str, str]]] = {}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_digests(config: AuthConfig) -> dict[str, str]:
    """Key name -> SHA-256 of its secret; raises ValueError for an unset variable."""
    found = _digests.get(id(config))
    if found is not None and found[0] is config:
        return found[1]
    digests = {}
    for name, key in config.keys.items():
        if key.key_env:
            secret = os.environ.get(key.key_env)
            if not secret:
                raise ValueError(f"auth.keys.{name}.key_env: environment variable "
                                 f"{key.key_env} is not set")
            digests[name] = digest(secret)
        else:
            digests[name] = key.key_sha256
    _digests[id(config)] = (config, digests)
    return digests


def presented_key(headers: dict[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return headers.get("x-api-key")


def identify(digests: dict[str, str], secret: str) -> str | None:
    """The name of the key ``secret`` is, comparing against every key in constant time."""
    presented = digest(secret)
    found = None
    for name, expected in digests.items():
        if hmac.compare_digest(presented, expected):
            found = name
    return found


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    problem = settings_error(settings, AuthConfig)
    if problem is None:
        try:
            key_digests(settings_as(settings, AuthConfig))
        except ValueError as exc:
            return str(exc)
    return problem


def _windows(now: float) -> tuple[str, str, str, float]:
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    month = day[:7]
    minute = str(int(now // 60))
    to_midnight = 86400 - now % 86400
    return minute, day, month, to_midnight


@hookimpl(tryfirst=True)
async def request_start(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, AuthConfig)
    secret = presented_key(ctx.headers)
    if not secret:
        raise Reject(401, "Missing API key: send it as 'Authorization: Bearer <key>' or "
                          "'x-api-key: <key>'", code="missing_api_key")
    name = identify(key_digests(config), secret)
    if name is None:
        raise Reject(401, "Invalid API key", code="invalid_api_key")
    ctx.caller = name
    key = config.keys[name]
    model = ctx.request.model
    if not any(fnmatch.fnmatchcase(model, pattern) for pattern in key.models):
        raise Reject(403, f"Key '{name}' may not use model '{model}'",
                     code="model_not_allowed")
    now = time.time()
    minute, day, month, to_midnight = _windows(now)
    to_next_minute = str(max(1, int(60 - now % 60)))
    if key.rpm:
        count = await store.incr(f"auth:rpm:{name}:{minute}", 1, 120)
        if count > key.rpm:
            raise Reject(429, f"Rate limit for key '{name}': {key.rpm} requests per minute",
                         code="rate_limit_rpm", headers={"retry-after": to_next_minute})
    if key.tpm:
        tokens = int(await store.get(f"auth:tpm:{name}:{minute}") or 0)
        if tokens >= key.tpm:
            raise Reject(429, f"Rate limit for key '{name}': {key.tpm} tokens per minute",
                         code="rate_limit_tpm", headers={"retry-after": to_next_minute})
    for budget, window, label, wait in (
            (key.daily_budget, f"day:{day}", "daily", to_midnight),
            (key.monthly_budget, f"month:{month}", "monthly", None)):
        if not budget:
            continue
        spent = int(await store.get(f"auth:spend:{name}:{window}") or 0) / MICRO
        if spent >= budget:
            seconds = wait if wait is not None else _to_next_month(now)
            raise Reject(429, f"Budget for key '{name}': the {label} budget of {budget:g} "
                              f"is spent ({spent:.4f})", code="budget_exhausted",
                         headers={"retry-after": str(int(seconds) + 1)})


def _to_next_month(now: float) -> float:
    year, month = time.gmtime(now)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    start = time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone
    return max(1.0, start - now)


@hookimpl
async def request_end(ctx: RequestContext, settings: dict[str, Any]) -> None:
    if ctx.caller is None or ctx.response is None:
        return
    usage = ctx.response.usage
    minute, day, month, _ = _windows(time.time())
    tokens = usage.input_tokens + usage.output_tokens
    if tokens:
        await store.incr(f"auth:tpm:{ctx.caller}:{minute}", tokens, 120)
    cost = ctx.cost
    if cost:
        micro = round(cost * MICRO)
        await store.incr(f"auth:spend:{ctx.caller}:day:{day}", micro, 2 * 86400)
        await store.incr(f"auth:spend:{ctx.caller}:month:{month}", micro, 32 * 86400)
