"""Turning the requested model (and a plugin's choice) into the targets to call."""

from __future__ import annotations

import msgspec

from proxy.config import Config
from proxy.context import RequestContext
from proxy.errors import ProxyError


class Target(msgspec.Struct, frozen=True):
    provider: str
    model: str


class Router:
    def __init__(self, config: Config, providers: set[str], skipped: dict[str, str]) -> None:
        self.providers = providers
        self.skipped = skipped
        self.models = {m.name: Target(m.provider, m.model) for m in config.models}

    def model_names(self) -> list[str]:
        return [name for name, t in self.models.items() if t.provider in self.providers]

    def route_targets(self, ctx: RequestContext) -> list[Target]:
        """The targets to try in order. A name in [[models]] wins; ``provider/model``
        addresses a provider directly; ``ctx.force_provider``/``force_model`` override."""
        name = ctx.force_model or ctx.request.model
        target = self.models.get(name)
        if ctx.force_provider:
            target = Target(ctx.force_provider, target.model if target else name)
        elif target is None:
            provider, slash, model = name.partition("/")
            if slash and (provider in self.providers or provider in self.skipped):
                target = Target(provider, model)
        if target is None:
            raise ProxyError(404, f"The model `{name}` does not exist on this proxy "
                                  f"(known: {', '.join(self.model_names()) or 'none'})",
                             code="model_not_found", stage="route")
        if target.provider not in self.providers:
            why = self.skipped.get(target.provider, "it is not configured")
            raise ProxyError(404, f"The model `{name}` needs provider `{target.provider}`, "
                                  f"which is not available: {why}",
                             code="model_not_found", stage="route")
        return [target]
