"""param_limits: defaults and caps for sampling parameters, optionally per model.

    [plugins.param_limits]
    max_tokens = 4096                  # ceiling on max_tokens (and its value when the
                                       # request names none)
    temperature_min = 0.0              # clamp range for temperature
    temperature_max = 1.0
    defaults = { max_tokens = 1024 }   # set when the request does not say
    [plugins.param_limits.models."gpt-4o*"]   # glob on the requested model; these win
    max_tokens = 2048
    defaults = { temperature = 0.2 }
"""

from __future__ import annotations

import fnmatch
import operator
from typing import Any

import msgspec

from proxy import RequestContext, hookimpl, reports_changes
from proxy.dispatch import no_plugin_context
from proxy.settings import settings_as, settings_error


class Defaults(msgspec.Struct, forbid_unknown_fields=True):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    max_tokens: int | None = None
    temperature_min: float | None = None
    temperature_max: float | None = None
    defaults: Defaults = msgspec.field(default_factory=Defaults)


class Settings(Limits, forbid_unknown_fields=True):
    models: dict[str, Limits] = {}


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


def _defaults(ctx: RequestContext, limits: Limits) -> None:
    for name in _LIMITED:
        default = getattr(limits.defaults, name)
        if default is not None and getattr(ctx.request, name) is None:
            setattr(ctx.request, name, default)


def _caps(ctx: RequestContext, limits: Limits, generates: bool) -> None:
    request = ctx.request
    if limits.max_tokens is not None:
        if request.max_tokens is not None:
            request.max_tokens = min(request.max_tokens, limits.max_tokens)
        elif generates:
            # Left out, the provider's own maximum would apply: the ceiling is the most.
            request.max_tokens = limits.max_tokens
    if request.temperature is not None:
        if limits.temperature_min is not None:
            request.temperature = max(request.temperature, limits.temperature_min)
        if limits.temperature_max is not None:
            request.temperature = min(request.temperature, limits.temperature_max)


_LIMITED = ("max_tokens", "temperature", "top_p")
# Endpoints whose requests generate no output: a max_tokens is not theirs to be given.
_NO_OUTPUT = ("/count_tokens", "/embeddings")
_limited = operator.attrgetter(*_LIMITED)
_NO_DEFAULTS = Defaults()


@hookimpl(trylast=True)
@reports_changes
@no_plugin_context
def pre_routing(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, Settings)
    request = ctx.request
    # Model-specific limits come first so that their defaults win over the general ones;
    # every cap that applies is then enforced.
    chosen = [limits for pattern, limits in config.models.items()
              if fnmatch.fnmatchcase(request.model, pattern)] if config.models else []
    chosen.append(config)
    before = _limited(request)
    for limits in chosen:
        if limits.defaults != _NO_DEFAULTS:
            _defaults(ctx, limits)
    generates = not ctx.endpoint.endswith(_NO_OUTPUT)
    for limits in chosen:
        _caps(ctx, limits, generates)
    if _limited(request) != before:
        ctx.changed()
