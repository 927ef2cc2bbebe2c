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
    daily_budget_warn = 0.8         # crossing 80% is a warning (log, metric, record)

Keys are accepted as ``Authorization: Bearer <key>`` (OpenAI SDK) and ``x-api-key``
(Anthropic SDK), compared as SHA-256 digests in constant time. The key's name, never the
key, goes on ``ctx.caller`` and into the log.

Limits are exact under concurrency, across workers and replicas: before the provider is
called, the request reserves what it may cost — its estimated prompt plus ``max_tokens``
(or ``[auth].reserve_output_tokens``), in tokens and in money at the dearest target that
may answer it — against every limit at once, in one atomic step of the process's
``proxy.store.Store``; it is refused with a 429 if that does not fit. Once it is over, the
reservation is replaced by what it used (an estimate for a stream cut off midway).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import os
import time
from collections.abc import Sequence
from typing import Any

import structlog

from proxy import Reject, RequestContext, hookimpl, reports_changes
from proxy.config import AuthConfig, KeyConfig
from proxy.limits import MICRO, Ledger, charged, reservation
from proxy.routing import Target
from proxy.settings import settings_as, settings_error
from proxy.store import Admission, Charge, Store, StoreUnavailable

log = structlog.get_logger("hookproxy.auth")
_digests: dict[int, tuple[AuthConfig, dict[str, str]]] = {}
# Seconds a reservation lasts when nobody settles it (its worker died mid-request).
HOLD_TTL = 900.0


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


def caller_name(config: AuthConfig, headers: dict[str, str]) -> str:
    """The name of the key ``headers`` (lower-case names) carry; a 401 if there is none or
    it is no key of ``config``."""
    secret = presented_key(headers)
    if not secret:
        raise Reject(401, "Missing API key: send it as 'Authorization: Bearer <key>' or "
                          "'x-api-key: <key>'", code="missing_api_key")
    name = identify(key_digests(config), secret)
    if name is None:
        raise Reject(401, "Invalid API key", code="invalid_api_key")
    return name


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


@hookimpl(tryfirst=True)
@reports_changes  # changes nothing in the request
async def request_start(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, AuthConfig)
    name = ctx.caller = caller_name(config, ctx.headers)
    key = config.keys[name]
    if key.share_cache:
        ctx.tenant = ""  # the pool of keys that share
    # Judged by routing against every target that could answer (proxy.routing.refused_by).
    ctx.allow_models(key.models, f"key '{name}'")
    if key.rpm or key.tpm or key.daily_budget or key.monthly_budget:
        limits = ctx.scratch["auth"] = KeyLimits(name, key, config, ctx.store, time.time())
        ctx.admissions.append(limits.admit)


@hookimpl
async def request_end(ctx: RequestContext, settings: dict[str, Any]) -> None:
    limits: KeyLimits | None = ctx.scratch.get("auth")
    if limits is not None:
        await limits.settle(ctx)


class _Limit:
    """One of a key's limits in the window the request started in."""

    __slots__ = ("charge", "kind", "label", "reset")

    def __init__(self, kind: str, label: str, charge: Charge, reset: float) -> None:
        self.kind, self.label, self.charge, self.reset = kind, label, charge, reset


class KeyLimits:
    """A request's reservation against its key's limits, and its settlement."""

    def __init__(self, name: str, key: KeyConfig, config: AuthConfig, store: Store,
                 now: float) -> None:
        self.name, self.key, self.store = name, key, store
        self.default_output = config.reserve_output_tokens
        self.scope = f"auth:{name}"
        self.hold = ""
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        minute, to_minute = int(now // 60), 60 - now % 60
        to_midnight = 86400 - now % 86400
        self.limits: list[_Limit] = []
        for kind, label, limit, window, ttl, reset in (
                ("rpm", "requests", key.rpm, f"rpm:{minute}", 120, to_minute),
                ("tpm", "tokens", key.tpm, f"tpm:{minute}", 120, to_minute),
                ("daily", "daily", round(key.daily_budget * MICRO), f"day:{day}",
                 2 * 86400, to_midnight),
                ("monthly", "monthly", round(key.monthly_budget * MICRO),
                 f"month:{day[:7]}", 32 * 86400, _to_next_month(now))):
            if limit:
                charge = Charge(f"{self.scope}:{window}", 0, limit, ttl, held=kind != "rpm")
                self.limits.append(_Limit(kind, label, charge, reset))

    async def admit(self, ctx: RequestContext, targets: Sequence[Target]) -> None:
        """Reserves one request, its tokens and its cost; a plugin's answer (no targets)
        counts as a request and costs nothing."""
        tokens, micro = reservation(ctx, targets, self.default_output) if targets else (0, 0)
        amounts = {"rpm": 1, "tpm": tokens, "daily": micro, "monthly": micro}
        charges = [_with(limit.charge, amounts[limit.kind],
                         # Nothing to reserve: counted (for the headers), never refused.
                         limit.charge.limit if amounts[limit.kind] else 0)
                   for limit in self.limits]
        self.hold = ctx.request_id
        ctx.limits = Ledger(reserved_tokens=tokens, reserved_cost=micro / MICRO)
        try:
            admission = await self.store.reserve(self.scope, self.hold, charges, HOLD_TTL)
        except StoreUnavailable:
            self.hold = ""
            if not self.store.fail_open("limits"):
                raise Reject(503, f"The limits of key '{self.name}' cannot be checked: the "
                                  "shared store is unreachable; retry shortly",
                             code="limits_unavailable", headers={"retry-after": "1"}) from None
            ctx.limits.unchecked = True
            return
        for name, value in self._headers(admission).items():
            ctx.response_headers[name] = value
        if not admission.admitted:
            self.hold = ""
            raise self._refusal(admission, charges)

    async def settle(self, ctx: RequestContext) -> None:
        """Replaces the reservation with what the request used."""
        ledger = ctx.limits
        if not self.hold or not isinstance(ledger, Ledger):
            return
        tokens, micro, estimated = charged(ctx)
        ledger.tokens, ledger.cost, ledger.estimated = tokens, micro / MICRO, estimated
        held = [limit for limit in self.limits if limit.charge.held]
        if not held:  # requests only: nothing was held
            return
        amounts = {"tpm": tokens, "daily": micro, "monthly": micro}
        try:
            totals = await self.store.settle(
                self.scope, self.hold,
                [_with(limit.charge, amounts[limit.kind], 0) for limit in held])
        except StoreUnavailable:
            log.warning("limits_not_settled", key=self.name, request_id=ctx.request_id,
                        tokens=tokens, cost=micro / MICRO,
                        note="the store is unreachable; the settlement is applied when "
                             "it is back (else the reservation lapses by itself)")
            ledger.unchecked = True
            return
        for limit, total in zip(held, totals, strict=True):
            warn = {"daily": self.key.daily_budget_warn,
                    "monthly": self.key.monthly_budget_warn}.get(limit.kind, 0.0)
            threshold = warn * limit.charge.limit
            if warn and total - micro < threshold <= total:
                ledger.warnings.append(limit.kind)
                log.warning("budget_warning", key=self.name, budget=limit.kind,
                            spent=total / MICRO, limit=limit.charge.limit / MICRO,
                            warn_at=warn, request_id=ctx.request_id)

    def _headers(self, admission: Admission) -> dict[str, str]:
        """What is left, as OpenAI's and Anthropic's own limits say it."""
        headers = {}
        for limit, total in zip(self.limits, admission.totals, strict=True):
            ceiling = limit.charge.limit
            left = max(ceiling - total, 0)
            if limit.kind in ("rpm", "tpm"):
                headers[f"x-ratelimit-limit-{limit.label}"] = str(ceiling)
                headers[f"x-ratelimit-remaining-{limit.label}"] = str(left)
                headers[f"x-ratelimit-reset-{limit.label}"] = f"{limit.reset:.0f}s"
            else:
                headers[f"x-ratelimit-limit-budget-{limit.label}"] = _money(ceiling)
                headers[f"x-ratelimit-remaining-budget-{limit.label}"] = _money(left)
        return headers

    def _refusal(self, admission: Admission, charges: list[Charge]) -> Reject:
        limit = self.limits[admission.refused]
        amount, ceiling = charges[admission.refused].amount, limit.charge.limit
        total = admission.totals[admission.refused]
        retry = {"retry-after": str(int(limit.reset) + 1)}
        name = self.name
        if limit.kind == "rpm":
            return Reject(429, f"Rate limit for key '{name}': {ceiling} requests per minute",
                          code="rate_limit_rpm", headers=retry)
        alone = amount > ceiling  # waiting will not help: the request is too large
        if limit.kind == "tpm":
            why = (f"this request alone may use {amount} (its prompt and max_tokens); "
                   "lower max_tokens" if alone else
                   f"{total} are used or reserved, this request may use {amount}")
            return Reject(429, f"Rate limit for key '{name}': {ceiling} tokens per minute: "
                               f"{why}", code="rate_limit_tpm", headers=retry)
        why = (f"this request alone may cost {_money(amount)}; lower max_tokens" if alone
               else f"{_money(total)} is spent or reserved, this request may cost up to "
                    f"{_money(amount)}")
        return Reject(429, f"Budget for key '{name}': the {limit.kind} budget of "
                           f"{ceiling / MICRO:g} cannot cover this request: {why}",
                      code="budget_exhausted", headers=retry)


def _with(charge: Charge, amount: int, limit: int) -> Charge:
    return Charge(charge.key, amount, limit, charge.ttl, charge.held)


def _money(micro: int) -> str:
    return f"{micro / MICRO:.6f}"


def _to_next_month(now: float) -> float:
    year, month = time.gmtime(now)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return max(1.0, calendar.timegm((year, month, 1, 0, 0, 0)) - now)
