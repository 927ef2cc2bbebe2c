"""Every hook a hookproxy plugin can implement.

A hook implementation may take any subset of the arguments named here, and may be a plain
function or ``async def``. ``settings`` is always the plugin's own settings: its
``[plugins.NAME]`` (or ``[classifiers.NAME]``) table from config.toml, merged with what the
request asked for itself under the ``hookproxy`` field.

Stages run in this order: request_start, classify, pre_routing, (provider call, with
alongside_call beside it, stream_chunk per chunk), post_response, request_end. on_error
sees every failure. startup, config_reloaded and shutdown mark the life of the process.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("hookproxy")
hookimpl = pluggy.HookimplMarker("hookproxy")


@hookspec
def request_start(ctx: Any, settings: dict[str, Any]) -> Any:
    """Start: the request is decoded and nothing else has happened.

    May change ``ctx.request`` in place. Return a ``Response`` to answer the request
    yourself (short-circuit: routing and the provider call are skipped, post_response and
    request_end still run; a streaming request receives it as a stream). Raise
    ``Reject(status, message)`` to refuse it. Return ``None`` to let it go on.
    Sync or awaitable.
    """


@hookspec
def classify(ctx: Any, settings: dict[str, Any]) -> Any:
    """Tagging: return an iterable of tags (strings) for this request, or ``None``.

    Classifiers run side by side after request_start; their tags are merged into
    ``ctx.tags``. Must not change the request. A classifier that raises or runs past its
    time bound only loses its own tags. Sync or awaitable.
    """


@hookspec
def pre_routing(ctx: Any, settings: dict[str, Any]) -> Any:
    """PreRouting: the tags are known, the provider is not chosen yet.

    May change ``ctx.request``; may set ``ctx.force_provider`` and/or ``ctx.force_model``
    to choose the target. Return a ``Response`` to short-circuit, raise ``Reject`` to
    refuse, ``None`` to go on. Sync or awaitable.
    """


@hookspec
def alongside_call(ctx: Any, settings: dict[str, Any]) -> Any:
    """Runs beside the provider call, from the moment it starts (a moderation check that
    adds no latency). Not called when a plugin answered the request itself.

    Raise ``Reject`` to cancel the provider call: the client gets that error in its own
    format. Return (anything) to let the answer go. The answer never goes out before
    every alongside_call has returned, but its time overlaps the provider's, so only the
    part that outlasts the provider adds to the answer's latency. A stream starts as soon
    as the provider sends its first event; only its end waits for these hooks, and a
    rejection after the first event ends the stream with an error event in the client's
    format instead. An exception, or a timeout under ``on_timeout = "fail"``, fails the
    request (500 / 504) like one in pre_routing; with ``on_timeout = "skip"`` a slow one
    is passed over. Async (a sync one runs on the event loop before the call starts).
    """


@hookspec
def stream_chunk(ctx: Any, event: Any, settings: dict[str, Any]) -> Any:
    """Each stream event on its way to the client (streaming requests only).

    Return a replacement event, a list of events, ``DROP`` to drop this event, or ``None``
    to leave it. ``StreamStart`` and ``StreamEnd`` cannot be dropped; producing a
    ``StreamEnd`` ends the stream there. Raise ``Reject`` to end the stream with an error
    event in the client's format. Other errors are logged once per request and the stream
    goes on. Sync or awaitable.
    """


@hookspec
def post_response(ctx: Any, response: Any, settings: dict[str, Any]) -> Any:
    """PostResponse: the whole response is known (for a stream: assembled after its end).

    May change ``response`` in place or return a replacement ``Response`` (for a stream,
    the change reaches the log and later hooks, not the bytes already sent). Raise
    ``Reject`` to refuse the answer: the client gets that error instead (a stream: an error
    event in place of its end). Other errors are logged and the response still goes out.
    Sync or awaitable.
    """


@hookspec
def request_end(ctx: Any, settings: dict[str, Any]) -> Any:
    """End: always runs once per request, answered, rejected or failed.

    Observe only: ``ctx.response``, ``ctx.error``, ``ctx.status``, ``ctx.timings``. Runs
    after the answer has gone out, so it never delays it. Errors are logged. Sync or
    awaitable.
    """


@hookspec
def on_error(ctx: Any, error: Any, settings: dict[str, Any]) -> Any:
    """Observes every failure: a plugin's exception, a rejection, an upstream error or
    timeout. ``error`` is a ``PipelineError`` (stage, plugin, status, message,
    exception). Runs after the answer has gone out, before request_end. Errors raised here
    are logged and ignored. Sync or awaitable.
    """


@hookspec
def validate_settings(settings: dict[str, Any]) -> Any:
    """Checked once at startup for each enabled plugin and classifier, and again when a
    request overrides its settings.

    Return ``None`` if ``settings`` are usable, or a message saying what is wrong (or raise
    ``ValueError`` with it); serve then refuses to start, naming the plugin. Sync only.
    """


@hookspec
def startup(app: Any, settings: dict[str, Any]) -> Any:
    """The process is starting (or a reload turned this plugin on): set up what the
    plugin keeps for its life. ``app`` is the ``PluginApp``: ``app.session`` (the shared
    HTTP client session), ``app.store``, ``app.spawn(...)``, ``app.log``, ``app.config``.

    Runs before the first request is served, in hook order, each bounded by the plugin's
    timeout. An exception or a timeout stops serve from starting, naming the plugin (in a
    reload, it is logged and the reload's answer names it). Sync or awaitable.
    """


@hookspec
def config_reloaded(app: Any, settings: dict[str, Any]) -> Any:
    """The config was reloaded and this plugin, running before, is still on; ``settings``
    are its new settings. Requests already in flight finish with the old ones. Errors are
    logged and named in the reload's answer; the new config stays. Sync or awaitable.
    """


@hookspec
def shutdown(app: Any, settings: dict[str, Any]) -> Any:
    """The process is stopping, requests in flight have finished and the background
    tasks have been awaited: release what startup set up. Runs once for each plugin whose
    startup ran, bounded by its timeout; errors are logged. Sync or awaitable.
    """
