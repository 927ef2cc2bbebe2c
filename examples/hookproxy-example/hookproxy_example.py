"""An example hookproxy plugin, the one the plugin author's guide walks through.

    [plugins.example]
    blocked = ["launch codes"]      # reject prompts containing these (403)
    pong = true                      # answer "ping" with "pong" without calling a provider
    note = "Keep answers short."     # added to the system prompt
    shout = false                    # upper-case every answer, streamed or not
    route_to = ""                    # force this model
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from proxy import (
    PipelineError,
    Reject,
    RequestContext,
    Response,
    StreamEvent,
    TextDelta,
    TextPart,
    hookimpl,
)
from proxy.settings import client_adjustable, settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    blocked: list[str] = []
    # A request may set these two for itself; the rest is the operator's alone.
    pong: Annotated[bool, client_adjustable] = True
    note: str = ""
    shout: Annotated[bool, client_adjustable] = False
    route_to: str = ""


# What this plugin observed; a real plugin would send these somewhere.
ERRORS: list[PipelineError] = []
FINISHED: list[str] = []


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl
def request_start(ctx: RequestContext, settings: dict[str, Any]) -> Response | None:
    config = settings_as(settings, Settings)
    prompt = ctx.request.prompt_text().lower()
    for phrase in config.blocked:
        if phrase.lower() in prompt:
            raise Reject(403, f"Requests about {phrase!r} are not allowed here")
    last = ctx.request.messages[-1].text.strip().lower() if ctx.request.messages else ""
    if config.pong and last == "ping":
        return Response(id=f"pong-{ctx.request_id}", model=ctx.request.model,
                        content=[TextPart(text="pong")])
    if config.note:
        ctx.request.system.append(TextPart(text=config.note))
    return None


@hookimpl
def pre_routing(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, Settings)
    if config.route_to:
        ctx.force_model = config.route_to


@hookimpl
def stream_chunk(ctx: RequestContext, event: StreamEvent, settings: dict[str, Any]) -> Any:
    if settings_as(settings, Settings).shout and isinstance(event, TextDelta):
        return TextDelta(index=event.index, text=event.text.upper())
    return None


@hookimpl
def post_response(ctx: RequestContext, response: Response, settings: dict[str, Any]) -> None:
    if settings_as(settings, Settings).shout and not ctx.stream:
        for part in response.content:
            if isinstance(part, TextPart):
                part.text = part.text.upper()


@hookimpl
async def on_error(ctx: RequestContext, error: PipelineError) -> None:
    ERRORS.append(error)


@hookimpl
def request_end(ctx: RequestContext) -> None:
    FINISHED.append(ctx.request_id)
