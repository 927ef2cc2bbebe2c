"""An example hookproxy plugin, the one the plugin author's guide walks through.

    [plugins.example]
    blocked = ["launch codes"]      # reject prompts containing these (403)
    pong = true                      # answer "ping" with "pong" without calling a provider
    note = "Keep answers short."     # added to the system prompt
    shout = false                    # upper-case every answer, streamed or not
    route_to = ""                    # force this model
    quota = 0                        # requests per caller and minute (0: no limit), counted
                                     # in the shared store; x-example-quota-remaining says
                                     # what is left
    moderation_url = ""              # POST each prompt here, beside the provider call
                                     # ({"text": ...} -> {"allowed": bool, "reason": str});
                                     # a refusal cancels the call

It shows the pieces a plugin has: the shared HTTP session (``ctx.session``), the store
(``ctx.store``), a response header, an upstream header, annotations in the record, the
request's logger, background work (``ctx.spawn``) and the lifecycle hooks.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import aiohttp
import msgspec

from proxy import (
    PipelineError,
    PluginApp,
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
    quota: int = 0
    moderation_url: str = ""


class Verdict(msgspec.Struct):
    allowed: bool
    reason: str = ""


_verdict = msgspec.json.Decoder(Verdict).decode
# What this plugin observed; a real plugin would send these somewhere.
ERRORS: list[PipelineError] = []
FINISHED: list[str] = []
# Its life: ("startup" | "reloaded" | "shutdown", settings), and the usage reports its
# background tasks delivered.
LIFE: list[tuple[str, dict[str, Any]]] = []
REPORTED: list[dict[str, Any]] = []


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl
def startup(app: PluginApp, settings: dict[str, Any]) -> None:
    LIFE.append(("startup", settings))
    app.log.info("example plugin ready", quota=settings_as(settings, Settings).quota)


@hookimpl
def config_reloaded(settings: dict[str, Any]) -> None:
    LIFE.append(("reloaded", settings))


@hookimpl
def shutdown(settings: dict[str, Any]) -> None:
    LIFE.append(("shutdown", settings))


@hookimpl
async def request_start(ctx: RequestContext, settings: dict[str, Any]) -> Response | None:
    config = settings_as(settings, Settings)
    prompt = ctx.request.prompt_text().lower()
    for phrase in config.blocked:
        if phrase.lower() in prompt:
            raise Reject(403, f"Requests about {phrase!r} are not allowed here")
    if config.quota:
        await _count_against_quota(ctx, config.quota)
    ctx.upstream_headers["x-example-caller"] = ctx.caller or "anonymous"
    last = ctx.request.messages[-1].text.strip().lower() if ctx.request.messages else ""
    if config.pong and last == "ping":
        return Response(id=f"pong-{ctx.request_id}", model=ctx.request.model,
                        content=[TextPart(text="pong")])
    if config.note:
        ctx.request.system.append(TextPart(text=config.note))
    return None


async def _count_against_quota(ctx: RequestContext, quota: int) -> None:
    """One more request for this caller this minute, in the store every worker shares."""
    minute = int(time.time() // 60)
    used = await ctx.store.incr(f"example:quota:{ctx.caller or '-'}:{minute}", 1, 120)
    left = max(quota - used, 0)
    ctx.response_headers["x-example-quota-remaining"] = left  # on the answer or the 429
    ctx.annotate("quota_used", used)
    if used > quota:
        raise Reject(429, f"Quota of {quota} requests a minute used up",
                     headers={"retry-after": str(60 - int(time.time()) % 60)})


@hookimpl
def pre_routing(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, Settings)
    if config.route_to:
        ctx.force_model = config.route_to


@hookimpl
async def alongside_call(ctx: RequestContext, settings: dict[str, Any]) -> None:
    """Asks the moderation service while the provider is already answering."""
    url = settings_as(settings, Settings).moderation_url
    if not url:
        return
    text = ctx.request.prompt_text()[-20_000:]
    try:
        async with ctx.session.post(url, json={"text": text},
                                    timeout=aiohttp.ClientTimeout(total=5)) as answer:
            answer.raise_for_status()
            verdict = _verdict(await answer.read())
    except (aiohttp.ClientError, TimeoutError, msgspec.ValidationError,
            msgspec.DecodeError) as exc:
        # Fail closed: without a verdict, the answer does not go out.
        ctx.log.warning("moderation unavailable", error=str(exc))
        raise Reject(503, "The moderation service is unavailable") from None
    ctx.annotate("moderation", "allowed" if verdict.allowed else verdict.reason)
    if not verdict.allowed:
        raise Reject(403, f"Refused by moderation: {verdict.reason}", code="moderated")


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
    usage = ctx.response.usage if ctx.response is not None else None

    async def report() -> None:
        # A real plugin would POST this to a billing service with ctx.session; it runs
        # after the answer and is awaited at shutdown.
        REPORTED.append({"request_id": ctx.request_id, "status": ctx.status,
                         "output_tokens": usage.output_tokens if usage else 0})

    ctx.spawn(report())
