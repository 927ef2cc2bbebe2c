"""The request pipeline: every stage a request goes through, in one place.

    request_start -> classify -> pre_routing -> route + provider call
        -> (stream_chunk per event) -> post_response -> request_end

Start and PreRouting failures fail the request; everything after the answer exists is
best effort: errors are reported to on_error observers and the answer still goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
import msgspec
import structlog

from proxy import dispatch
from proxy.alongside import Alongside
from proxy.canonical import (
    CLASSIFYING,
    Request,
    Response,
    StreamAccumulator,
    StreamEnd,
    StreamEvent,
    StreamStart,
    fingerprint,
    response_events,
)
from proxy.config import RoutingConfig
from proxy.context import Attempt, PipelineError, RequestContext
from proxy.dispatch import (
    HookFailed,
    call_impl,
    check_reported,
    finish_call,
    finish_impl,
    implementations,
    is_awaitable,
    start_impl,
)
from proxy.errors import BadRequest, ProxyError, Untranslatable, UpstreamError
from proxy.limits import account_usage
from proxy.plugins import SELF, PluginHost
from proxy.providers import Provider
from proxy.record import ms
from proxy.routing import Router, Target, is_context_length, is_transient

log = structlog.get_logger("hookproxy.pipeline")
T = TypeVar("T")


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()
"""Returned by a stream_chunk hook to drop the event."""


class Pipeline:
    def __init__(self, host: PluginHost, router: Router, providers: dict[str, Provider], *,
                 routing: RoutingConfig | None = None, plugin_timeout: float = 10.0,
                 classifier_timeout: float = 1.0,
                 on_finish: Callable[[RequestContext], None] | None = None) -> None:
        self.pm = host.pm
        self.host = host
        # Finished requests whose records wait for their answer to go out, or for the
        # records before them (see _end).
        self._order: deque[_Finishing] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeper_loop: asyncio.AbstractEventLoop | None = None
        self.router = router
        self.providers = providers
        self.routing = routing or RoutingConfig()
        self.plugin_timeout = plugin_timeout
        self.classifier_timeout = classifier_timeout
        self.on_finish = on_finish
        # hookproxy's own classifiers are linear and bounded: they run inline.
        self.inline_classifiers = frozenset(
            name for name, info in host.installed.items()
            if info.kind == "classifier" and info.package == SELF)

    # --- entry points -------------------------------------------------------------------

    async def run(self, ctx: RequestContext,
                  call: Callable[[Provider, Target], Awaitable[Response]] | None = None
                  ) -> Response:
        """Runs a non-streaming request to its answer, or raises ``ProxyError``. ``call``
        makes the provider call instead of a chat completion (embeddings), with the same
        routing, retries and fallback."""
        try:
            response = await self._before_provider(ctx)
            if response is None:
                response = await (self._call_provider_alongside(ctx) if call is None
                                  else self._with_fallback(ctx, call))
            else:
                await _admit(ctx, ())
            return await self._post_response(ctx, response)
        except ProxyError as exc:
            await self._fail(ctx, exc)
            raise
        except asyncio.CancelledError:
            _client_left(ctx)
            raise
        except Exception as exc:
            _internal_error(ctx, exc)
            raise
        finally:
            self._end(ctx)

    async def open_stream(self, ctx: RequestContext) -> AsyncIterator[list[StreamEvent]]:
        """Runs a streaming request up to its first event and returns the whole stream.

        Anything that fails before the first event raises here, while the client can still
        get an error status; a failure later raises from the iterator.
        """
        try:
            response = await self._before_provider(ctx)
            if response is not None:
                await _admit(ctx, ())
                events: AsyncIterator[list[StreamEvent]] = _replay(response)
            else:
                events = await self._open_provider_stream_alongside(ctx)
            first = await anext(events)
        except ProxyError as exc:
            await self._fail(ctx, exc)
            self._end(ctx)
            raise
        except Exception as exc:
            _internal_error(ctx, exc)
            self._end(ctx)
            raise
        except BaseException:
            self._end(ctx)
            raise
        return self._stream(ctx, first, events)

    # --- stages -------------------------------------------------------------------------

    async def _before_provider(self, ctx: RequestContext) -> Response | None:
        started = time.perf_counter()
        response = await self._stage(ctx, "request_start")
        if response is None:
            await self._classify(ctx)
            response = await self._stage(ctx, "pre_routing")
        ctx.timings["plugins_before"] = time.perf_counter() - started
        if response is not None:
            ctx.provider, ctx.model = "plugin", ctx.short_circuited_by
        return response

    async def _stage(self, ctx: RequestContext, hook: str) -> Response | None:
        """Start or PreRouting: a plugin may change the request, answer it or reject it."""
        impls = implementations(self.pm, hook, ctx.plugin_settings)
        # A plugin that reports its changes (``reports_changes``) says whether it changed
        # something; another's change is seen by comparing the request's encoding after it
        # with the one before it.
        before: bytes | None = None
        for name, impl in impls:
            arguments = (ctx, ctx.plugin_settings[name])
            reporting = impl.reports
            if before is None and (dispatch.CHECK_REPORTS or not reporting):
                before = fingerprint(ctx.request)
            said = ctx.changes
            try:
                # call_impl, written out: most hooks are sync, and need no time bound.
                result = start_impl(name, hook, impl, arguments)
                if is_awaitable(result):
                    result = await finish_call(name, hook, impl, arguments, result,
                                               self._timeout(name))
            except ProxyError as exc:
                ctx.plugin_actions[name] = "rejected"
                exc.stage = hook
                raise
            except HookFailed as exc:
                # Stopped part way (a timeout the operator skips), even a hook that reports
                # its changes may not have said what it had changed.
                ctx.may_have_changed()
                before = None
                failure = self.stage_failure(ctx, hook, name, exc)
                if failure is None:
                    continue
                raise failure from exc.error
            if isinstance(result, Response):
                ctx.plugin_actions[name] = "short_circuit"
                ctx.short_circuited_by = name
                return result
            if reporting and not dispatch.CHECK_REPORTS:
                if ctx.changes != said:
                    ctx.plugin_actions.setdefault(name, "modified")
                    before = None
                continue
            after = fingerprint(ctx.request)
            if reporting:
                check_reported(ctx, hook, name, after != before, said)
            if after != before:
                ctx.plugin_actions.setdefault(name, "modified")
                before = after
        return None

    def stage_failure(self, ctx: RequestContext, hook: str, name: str,
                      exc: HookFailed) -> ProxyError | None:
        """A plugin failed in a stage that fails the request: the error the client gets
        (a 504 for a timeout), or None when the operator chose to skip a slow plugin."""
        timed_out = isinstance(exc.error, TimeoutError)
        if timed_out and self.host.on_timeout.get(name) == "skip":
            # The operator chose: a slow plugin is passed over, not waited for.
            self._hook_error(ctx, hook, name, exc)
            ctx.plugin_actions[name] = "timed_out"
            return None
        ctx.plugin_actions[name] = "timed_out" if timed_out else "failed"
        _log_failure(ctx, hook, name, exc)
        return ProxyError(504 if timed_out else 500,
                          f"Plugin {name!r} {_describe(exc.error)} in {hook}" if timed_out
                          else f"Plugin {name!r} failed in {hook}: {_describe(exc.error)}",
                          code="plugin_timeout" if timed_out else "plugin_error",
                          stage=hook, plugin=name)

    async def _classify(self, ctx: RequestContext) -> None:
        impls = implementations(self.pm, "classify", ctx.classifier_settings)
        if not impls:
            return
        shared = ctx.request.__dict__
        shared[CLASSIFYING] = {}  # what classifiers share while the request cannot change
        try:
            await self._classify_with(ctx, impls)
        finally:
            shared.pop(CLASSIFYING, None)

    async def _classify_with(self, ctx: RequestContext, impls: list[tuple[str, Any]]) -> None:
        started = time.perf_counter()
        results: list[tuple[str, Iterable[str]]] = []
        pending: list[tuple[str, Any]] = []
        for name, impl in impls:
            arguments = (ctx, ctx.classifier_settings[name])
            if name not in self.inline_classifiers and not inspect.iscoroutinefunction(
                    impl.function):
                # Another package's sync classifier runs in a worker thread of its own pool,
                # so that however long it takes, the event loop (and aiohttp's DNS lookups
                # in the default pool) keep going; it is bounded like the rest.
                if _classifier_threads.busy >= CLASSIFIER_THREADS:
                    await self._classifier_failed(ctx, name, ProxyError(
                        503, "every classifier thread is busy with slower requests",
                        code="classifier_busy"))
                    continue
                pending.append((name, _classifier_threads.run(start_impl, name, "classify",
                                                              impl, arguments)))
                continue
            try:
                result = start_impl(name, "classify", impl, arguments)
            except (HookFailed, ProxyError) as exc:
                await self._classifier_failed(ctx, name, exc)
                continue
            if is_awaitable(result):
                pending.append((name, result))
            else:
                results.append((name, result or ()))

        # Sync classifiers have already run; async ones run side by side, each bounded.
        if pending:
            results.extend(await asyncio.gather(*(self._finish_classifier(ctx, n, a)
                                                  for n, a in pending)))
        operator_tags: set[str] = set()
        for name, tags in results:
            from_client = name in ctx.client_classifiers
            for tag in map(str, tags):
                if tag not in ctx.tags:
                    ctx.tags.append(tag)
                if not from_client:
                    operator_tags.add(tag)
        if ctx.client_classifiers:
            ctx.client_tags = set(ctx.tags) - operator_tags
        ctx.timings["classify"] = time.perf_counter() - started

    async def _finish_classifier(self, ctx: RequestContext, name: str, awaitable: Any
                                 ) -> tuple[str, Iterable[str]]:
        try:
            return name, await finish_impl(name, "classify", awaitable,
                                           self.classifier_timeout) or ()
        except (HookFailed, ProxyError) as exc:
            await self._classifier_failed(ctx, name, exc)
            return name, ()

    async def _classifier_failed(self, ctx: RequestContext, name: str,
                                 exc: HookFailed | ProxyError) -> None:
        error = exc.error if isinstance(exc, HookFailed) else exc
        ctx.classifier_errors[name] = _describe(error)
        await self._report(ctx, PipelineError(stage="classify", plugin=name,
                                              message=_describe(error),
                                              type=type(error).__name__, exception=error))

    async def _call_provider_alongside(self, ctx: RequestContext) -> Response:
        """The provider call, with the alongside_call checks running beside it."""
        impls = implementations(self.pm, "alongside_call", ctx.plugin_settings)
        if not impls:
            return await self._with_fallback(ctx, functools.partial(_complete, ctx))
        checks = Alongside(self, ctx, impls)
        try:
            ctx.response = await checks.race(self._call_provider(ctx))
            await checks.settle()
            return ctx.response
        finally:
            checks.cancel()

    async def _open_provider_stream_alongside(self, ctx: RequestContext
                                              ) -> AsyncIterator[list[StreamEvent]]:
        impls = implementations(self.pm, "alongside_call", ctx.plugin_settings)
        if not impls:
            return await self._open_provider_stream(ctx)
        return Alongside(self, ctx, impls).guard_stream(self._open_provider_stream(ctx))

    async def _call_provider(self, ctx: RequestContext) -> Response:
        return await self._with_fallback(ctx, functools.partial(_complete, ctx))

    async def _open_provider_stream(self, ctx: RequestContext
                                    ) -> AsyncIterator[list[StreamEvent]]:
        async def open_stream(provider: Provider, target: Target
                              ) -> AsyncIterator[list[StreamEvent]]:
            body = _unchanged_body(ctx, provider, target)
            events = provider.stream(_request_for(ctx, body), target.model, ctx.client_format,
                                     body, ctx.upstream_header_items())
            try:
                first = await anext(events)
            except StopAsyncIteration:
                raise UpstreamError(502, f"Provider {target.provider} sent an empty stream",
                                    code="upstream_empty") from None
            except BaseException:
                await _aclose(events)
                raise
            return _prepend(first, events)

        events = await self._with_fallback(ctx, open_stream)
        ctx.timings["first_token"] = time.perf_counter() - ctx.started
        return events

    async def _with_fallback(self, ctx: RequestContext,
                             call: Callable[[Provider, Target], Awaitable[T]]) -> T:
        """Tries the routed targets in order: transient failures are retried with backoff,
        then the next target is tried; other errors end the request at once, except a
        context-length error, which moves on to a target with a larger context. For a
        stream, all of this happens before its first byte reaches the client."""
        last_error: UpstreamError | None = None
        untranslatable: Untranslatable | None = None
        context_floor: int | None = None
        targets = self.router.route_targets(ctx)
        if ctx.admissions:
            await _admit(ctx, targets)
        for target in targets:
            if context_floor is not None and target.context <= context_floor:
                continue
            provider = self.providers[target.provider]
            for retry in range(self.routing.retries + 1):
                ctx.provider, ctx.model = target.provider, target.model
                # A provider may speak the client's format beside its own (the Responses
                # API beside Chat Completions).
                ctx.provider_format = (ctx.client_format if ctx.client_format in
                                       getattr(provider, "formats", ()) else provider.format)
                ctx.price = target.prices
                started = time.perf_counter()
                try:
                    result = await call(provider, target)
                except BadRequest:
                    # The rest of the request, decoded only now (this target needs it
                    # encoded again), is the client's mistake: no provider was called, and
                    # the answer must not name one.
                    ctx.provider = ctx.model = None
                    raise
                except Untranslatable as exc:
                    # Not for this target's format: the next target may take it as it is.
                    exc.message = f"{exc.message} (provider {target.provider})"
                    exc.args = (exc.message,)
                    record_attempt(ctx, started, UpstreamError(400, exc.message,
                                                              code=exc.code))
                    untranslatable = exc
                    break
                except UpstreamError as exc:
                    record_attempt(ctx, started, exc)
                    last_error = exc
                    if is_context_length(exc):
                        context_floor = target.context
                        break
                    if not is_transient(exc):
                        raise
                    self.router.record_failure(target)
                    if retry == self.routing.retries or self.router.cooling(target):
                        break
                    await asyncio.sleep(self.router.backoff(retry, exc))
                    continue
                self.router.record_success(target, record_attempt(ctx, started))
                return result
        if last_error is None and untranslatable is not None:
            raise untranslatable
        assert last_error is not None
        raise last_error

    async def _stream(self, ctx: RequestContext, first: list[StreamEvent],
                      events: AsyncIterator[list[StreamEvent]]
                      ) -> AsyncIterator[list[StreamEvent]]:
        """Passes the provider's batches on, each event through the stream_chunk hooks.

        The stream's end event is held back until post_response has run, so that a plugin
        there can still refuse the answer (the client then gets an error event instead of
        the end). A stream_chunk hook that produces an end event ends the stream there."""
        accumulator = StreamAccumulator()
        chunk_impls = implementations(self.pm, "stream_chunk", ctx.plugin_settings)
        batch = first
        held: list[StreamEvent] = []
        try:
            while True:
                if chunk_impls:
                    batch = await self._chunks(ctx, chunk_impls, batch)
                ended = False
                for position, item in enumerate(batch):
                    if isinstance(item, StreamEnd):
                        # What follows an end (a plugin's or the provider's) is not sent.
                        batch, held, ended = batch[:position], [item], True
                        break
                for item in batch:
                    accumulator.add(item)
                ctx.stream_chunks += len(batch)
                if batch:
                    yield batch
                if ended:
                    break
                try:
                    batch = await anext(events)
                except StopAsyncIteration:
                    break
            for item in held:
                accumulator.add(item)
            response = accumulator.response
            response.model = response.model or (ctx.model or "")
            await self._post_response(ctx, response)
            if held:
                ctx.stream_chunks += len(held)
                yield held
        except ProxyError as exc:
            ctx.response = accumulator.response
            ctx.failed_at_chunk = ctx.stream_chunks
            await self._fail(ctx, exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            ctx.response = accumulator.response
            _client_left(ctx)
            raise
        except Exception as exc:
            ctx.response = accumulator.response
            ctx.failed_at_chunk = ctx.stream_chunks
            _internal_error(ctx, exc)
            raise
        finally:
            # The client may have left and this task may be cancelled: finish regardless.
            with anyio.CancelScope(shield=True):
                await _aclose(events)
            self._end(ctx)

    async def _chunks(self, ctx: RequestContext, impls: list[tuple[str, Any]],
                      batch: list[StreamEvent]) -> list[StreamEvent]:
        """Runs the stream_chunk hooks over a batch. Events that carry the provider's
        bytes keep them only while no hook changed them or the events that came in the
        same provider event (a group: its first event has the bytes, the rest b"")."""
        out: list[StreamEvent] = []
        group = 0  # where in ``out`` the current group began
        group_changed = False
        # Hooks that report their changes say whether they changed an event in place;
        # for others, a copy of each event tells.
        reporting = all(impl.reports for _, impl in impls)
        copy = dispatch.CHECK_REPORTS or not reporting
        for event in batch:
            if event.raw != b"":
                group, group_changed = len(out), False
            before = msgspec.structs.replace(event) if copy and event.raw is not None else None
            said = ctx.changes
            produced = await self._chunk(ctx, impls, event)
            kept = len(produced) == 1 and produced[0] is event
            if reporting and before is not None and kept and event != before and \
                    ctx.changes == said:
                raise ProxyError(500, "A stream_chunk hook marked reports_changes changed an "
                                      "event without calling ctx.changed()",
                                 code="plugin_error", stage="stream_chunk")
            if event.raw is not None and not group_changed and not (
                    kept and (ctx.changes == said if reporting else event == before)):
                group_changed = True
                for item in out[group:]:
                    item.raw = None
            if group_changed:
                for item in produced:
                    item.raw = None
            out.extend(produced)
        return out

    async def _chunk(self, ctx: RequestContext, impls: list[tuple[str, Any]],
                     event: StreamEvent) -> list[StreamEvent]:
        """Runs the stream_chunk hooks over one event; each may keep, replace, drop or
        expand (return a list) what the hooks before it produced."""
        events = [event]
        for name, impl in impls:
            produced: list[StreamEvent] = []
            for item in events:
                arguments = (ctx, item, ctx.plugin_settings[name])
                try:
                    result = start_impl(name, "stream_chunk", impl, arguments)
                    if is_awaitable(result):
                        result = await finish_impl(name, "stream_chunk", result,
                                                   self._timeout(name))
                except ProxyError as exc:
                    # A Reject mid-stream ends it with an error event in the client's format.
                    ctx.plugin_actions[name] = "rejected"
                    exc.stage, exc.plugin = "stream_chunk", name
                    raise
                except HookFailed as exc:
                    # Once per request in the log and to on_error; the rest are counted.
                    failures = ctx.chunk_failures.get(name, 0)
                    ctx.chunk_failures[name] = failures + 1
                    if not failures:
                        self._hook_error(ctx, "stream_chunk", name, exc)
                    result = None
                if result is None or result is item or (
                        result is DROP and isinstance(item, StreamStart | StreamEnd)):
                    produced.append(item)
                    continue
                ctx.plugin_actions.setdefault(name, "modified")
                if isinstance(result, list):
                    produced.extend(result)
                elif result is not DROP:
                    produced.append(result)
            events = produced
        return events

    async def _post_response(self, ctx: RequestContext, response: Response) -> Response:
        ctx.response = response
        for name, impl in implementations(self.pm, "post_response", ctx.plugin_settings):
            reporting = impl.reports
            before = fingerprint(response) if dispatch.CHECK_REPORTS or not reporting else None
            said = ctx.changes
            arguments = (ctx, response, ctx.plugin_settings[name])
            try:
                result = start_impl(name, "post_response", impl, arguments)
                if is_awaitable(result):
                    result = await finish_call(name, "post_response", impl, arguments,
                                               result, self._timeout(name))
            except ProxyError as exc:
                # A Reject here refuses the answer: the client gets this error instead.
                ctx.plugin_actions[name] = "rejected"
                exc.stage, exc.plugin = "post_response", name
                raise
            except HookFailed as exc:
                self._hook_error(ctx, "post_response", name, exc)
                continue
            if isinstance(result, Response):
                response = ctx.response = result
                ctx.plugin_actions.setdefault(name, "modified")
                ctx.raw_response = None
                continue
            if before is None:
                changed = ctx.changes != said
            else:
                changed = fingerprint(response) != before
                if reporting:
                    check_reported(ctx, "post_response", name, changed, said)
            if changed:
                ctx.plugin_actions.setdefault(name, "modified")
                ctx.raw_response = None
        return response

    def _end(self, ctx: RequestContext) -> None:
        """The request is over for the client. What observes it — on_error for each error,
        then request_end, then the record — runs once the answer has gone out, so that no
        observer ever delays an answer: in a task of its own when there are hooks to run
        (``drain`` awaits these at shutdown), else as the answer goes out. Records leave
        in the order requests finished."""
        ctx.timings["total"] = time.perf_counter() - ctx.started
        loop = asyncio.get_running_loop()
        entry = _Finishing(ctx, None, loop.time())
        self._order.append(entry)
        _waiting.add(self)
        self._arm_sweeper(loop)
        if ctx.errors or ctx.chunk_failures or implementations(
                self.pm, "request_end", ctx.plugin_settings):
            entry.task = True
            _track(loop.create_task(self._after(ctx, entry)))
        elif ctx.answered is None:  # nobody will say when the answer went out
            loop.call_soon(self._answered, entry)
        else:
            ctx.answered.add_callback(functools.partial(self._answered, entry))

    def _answered(self, entry: _Finishing) -> None:
        if entry.ready:
            return  # waited for too long already
        self._account(entry)
        self._flush()

    def _account(self, entry: _Finishing) -> None:
        """Charges the request's usage to its limits; its record may go then."""
        assert entry.ctx is not None
        try:
            account_usage(entry.ctx)
        except Exception:
            log.exception("record_failed", request_id=entry.ctx.request_id)
        entry.ready = True

    async def _after(self, ctx: RequestContext, entry: _Finishing) -> None:
        try:
            if ctx.answered is not None and not ctx.answered.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ANSWER_WAIT):
                        await ctx.answered.wait()
            account_usage(ctx)
            await self._observe(ctx)
        finally:
            entry.ready = True
            if entry.detached:  # the ones after it stopped waiting for it
                self._publish(entry)
            else:
                self._flush()

    def _flush(self) -> None:
        """Publishes the records at the head of the order that are ready."""
        order = self._order
        while order and order[0].ready:
            self._publish(order.popleft())
        if not order:
            _waiting.discard(self)

    def _publish(self, entry: _Finishing) -> None:
        try:
            if entry.publish is not None:
                entry.publish()
            elif self.on_finish is not None and entry.ctx is not None:
                self.on_finish(entry.ctx)
        except Exception:
            log.exception("record_failed",
                          request_id=entry.ctx.request_id if entry.ctx else None)
        finally:
            if entry.ctx is not None:
                _drop_tracebacks(entry.ctx)

    def _arm_sweeper(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None or self._sweeper_loop is not loop:
            self._sweeper_loop = loop
            self._sweeper = loop.call_later(ANSWER_WAIT, self._sweep)

    def _sweep(self) -> None:
        """Records that waited ``ANSWER_WAIT`` (for an answer that did not go out, or for
        the ones before them) wait no longer."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        self.release(loop.time() - ANSWER_WAIT)
        if self._order:
            self._sweeper_loop = loop
            self._sweeper = loop.call_later(
                max(self._order[0].since + ANSWER_WAIT - loop.time(), 1.0), self._sweep)

    def release(self, before: float | None = None) -> None:
        """Stops the records of requests that finished before ``before`` (all, for None)
        from waiting: for their answer, or, if their hooks still run, in the order."""
        detached = False
        for entry in self._order:
            if before is not None and entry.since > before:
                break
            if entry.ready:
                continue
            if entry.task:
                entry.detached = detached = True
            else:
                self._account(entry)
        if detached:
            self._order = deque(e for e in self._order if not e.detached)
        self._flush()

    def in_order(self, publish: Callable[[], None]) -> None:
        """Calls ``publish`` (a record of a request that never reached the pipeline) once
        the records of the requests that finished before it have gone out."""
        if not self._order:
            publish()
            return
        entry = _Finishing(None, publish, asyncio.get_running_loop().time())
        entry.ready = True
        self._order.append(entry)

    async def _observe(self, ctx: RequestContext) -> None:
        for name, count in ctx.chunk_failures.items():
            if count > 1:
                log.warning("plugin_failed_repeatedly", request_id=ctx.request_id,
                            plugin=name, hook="stream_chunk", failures=count,
                            status=ctx.status)
        for error in list(ctx.errors):
            await self._observe_error(ctx, error)
        for name, impl in implementations(self.pm, "request_end", ctx.plugin_settings):
            arguments = (ctx, ctx.plugin_settings[name])
            try:
                await call_impl(name, "request_end", impl, arguments, self._timeout(name))
            except (HookFailed, ProxyError) as exc:
                error = self._hook_error(ctx, "request_end", name, exc)
                await self._observe_error(ctx, error)

    def _timeout(self, plugin: str) -> float:
        return self.host.timeouts.get(plugin, self.plugin_timeout)

    # --- errors -------------------------------------------------------------------------

    async def _fail(self, ctx: RequestContext, exc: ProxyError) -> None:
        """The request failed with ``exc``: record it and tell the observers."""
        ctx.status = exc.status
        ctx.raised = exc
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        ctx.error = PipelineError(stage=exc.stage, plugin=exc.plugin, status=exc.status,
                                  message=exc.message, type=exc.code or type(exc).__name__,
                                  exception=cause)
        await self._report(ctx, ctx.error)

    def _hook_error(self, ctx: RequestContext, hook: str, plugin: str,
                    exc: HookFailed | ProxyError) -> PipelineError:
        error = exc.error if isinstance(exc, HookFailed) else exc
        if ctx.plugin_actions.get(plugin) != "timed_out":
            ctx.plugin_actions[plugin] = "failed"
        if isinstance(exc, HookFailed):
            _log_failure(ctx, hook, plugin, exc)
        found = PipelineError(stage=hook, plugin=plugin, message=_describe(error),
                              type=type(error).__name__, exception=error)
        ctx.errors.append(found)
        return found

    async def _report(self, ctx: RequestContext, error: PipelineError) -> None:
        """Keeps ``error`` for the record and the on_error observers, who see it once the
        answer has gone out."""
        ctx.errors.append(error)
        # The status only where it is the one the client gets.
        status = {"status": error.status} if error is ctx.error else {}
        log.warning("request_error", request_id=ctx.request_id, stage=error.stage,
                    plugin=error.plugin, error=error.message, **status)

    async def _observe_error(self, ctx: RequestContext, error: PipelineError) -> None:
        for name, impl in implementations(self.pm, "on_error", ctx.plugin_settings):
            arguments = (ctx, error, ctx.plugin_settings[name])
            try:
                await call_impl(name, "on_error", impl, arguments, self._timeout(name))
            except (HookFailed, ProxyError) as exc:
                log.warning("on_error_failed", request_id=ctx.request_id, plugin=name,
                            error=str(exc))


def _drop_tracebacks(ctx: RequestContext) -> None:
    """Everything that observes a failed request has seen its errors: their tracebacks,
    whose frames hold the context (a cycle, which only the cycle collector would free,
    with the whole request in it), go. The exceptions stay, for what keeps the context."""
    if ctx.raised is None and ctx.error is None and not ctx.errors:
        return  # most requests
    pending = [ctx.raised, *(error.exception for error in (*ctx.errors, ctx.error)
                             if error is not None)]
    seen: set[int] = set()
    while pending and len(seen) < 64:  # with their causes and contexts
        exception = pending.pop()
        if exception is not None and id(exception) not in seen:
            seen.add(id(exception))
            exception.__traceback__ = None
            pending += (exception.__cause__, exception.__context__)


class _Finishing:
    """A finished request's place in the order records leave in: its context (or, for a
    request refused before the pipeline, what publishes its record)."""

    __slots__ = ("ctx", "detached", "publish", "ready", "since", "task")

    def __init__(self, ctx: RequestContext | None, publish: Callable[[], None] | None,
                 since: float) -> None:
        self.ctx = ctx
        self.publish = publish
        self.since = since
        self.ready = False
        self.task = False
        self.detached = False


class _Threads:
    """A small thread pool for other packages' sync classifiers, with a count of the
    threads in use (a classifier past its time bound still holds one until it returns)."""

    def __init__(self, size: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=size,
                                       thread_name_prefix="hookproxy-classify")
        self.busy = 0

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        self.busy += 1
        future = asyncio.get_running_loop().run_in_executor(self.pool, function, *args)
        future.add_done_callback(self._release)
        return await asyncio.shield(future)

    def _release(self, _: object) -> None:
        self.busy -= 1


CLASSIFIER_THREADS = 4
_classifier_threads = _Threads(CLASSIFIER_THREADS)
_after_tasks: set[asyncio.Task[None]] = set()
# Pipelines with records still waiting (see Pipeline._end).
_waiting: set[Pipeline] = set()
# Observers wait this long at most for the server to say the answer went out.
ANSWER_WAIT = 60.0


def _track(task: asyncio.Task[None]) -> None:
    """Keeps a task that observes finished requests until it is done (see ``drain``)."""
    _after_tasks.add(task)
    task.add_done_callback(_after_tasks.discard)


async def drain(timeout: float = 10.0) -> None:
    """Waits (at most ``timeout`` seconds) for what observes finished requests; records
    still waiting then (for an answer that will not go out now) are published."""
    if _after_tasks:
        await asyncio.wait(list(_after_tasks), timeout=timeout)
    for pipeline in list(_waiting):
        pipeline.release()


def observing() -> bool:
    """Whether what observes finished requests (hooks, records) has work left. (Safe to
    ask from another thread: the set is copied in one step.)"""
    return bool(_after_tasks) or any(pipeline._order for pipeline in list(_waiting))


def _log_failure(ctx: RequestContext, hook: str, plugin: str, exc: HookFailed) -> None:
    """A plugin's exception, with its traceback, once per request and plugin."""
    if plugin in ctx.logged_failures:
        return
    ctx.logged_failures.add(plugin)
    error = exc.error
    log.warning("plugin_failed", request_id=ctx.request_id, plugin=plugin, hook=hook,
                error=_describe(error),
                exc_info=None if isinstance(error, TimeoutError) else error)


def _internal_error(ctx: RequestContext, exc: Exception) -> None:
    """A bug of hookproxy's own: the client gets a 500, and the record must say so."""
    ctx.status = 500
    ctx.error = PipelineError(stage="proxy", status=500, type="internal_error",
                              message=f"Internal error in hookproxy: {type(exc).__name__}",
                              exception=exc)


def _client_left(ctx: RequestContext) -> None:
    ctx.status = 499
    ctx.error = PipelineError(stage="stream" if ctx.stream else "request", status=499,
                              type="client_disconnected",
                              message="The client left before the answer was complete")


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}"


async def _complete(ctx: RequestContext, provider: Provider, target: Target) -> Response:
    """One call to ``target`` for a non-streaming request (see ``_with_fallback``)."""
    body = _unchanged_body(ctx, provider, target)
    response, ctx.raw_response = await provider.complete(
        _request_for(ctx, body), target.model, ctx.client_format, body,
        ctx.upstream_header_items())
    return response


async def _admit(ctx: RequestContext, targets: Sequence[Target]) -> None:
    """The limits of ``ctx.admissions`` (the auth plugin's) reserve what the request may
    cost, or refuse it, before any provider is called."""
    for admit in ctx.admissions:
        await admit(ctx, targets)


def record_attempt(ctx: RequestContext, started: float,
                   error: UpstreamError | None = None) -> float:
    """Notes one call to the provider in ``ctx`` (its attempts and upstream time); returns
    how long it took."""
    elapsed = time.perf_counter() - started
    ctx.timings["upstream"] = ctx.timings.get("upstream", 0.0) + elapsed
    ctx.attempts.append(Attempt(
        provider=ctx.provider or "", model=ctx.model or "",
        # 0: the provider gave no HTTP answer (connection failed, timed out).
        status=error.upstream_status if error else 200,
        error=error.message if error else None,
        latency_ms=ms(elapsed)))
    return elapsed


def _unchanged_body(ctx: RequestContext, provider: Provider, target: Target) -> bytes | None:
    """The client's body as it came, when nothing changed it and ``target`` takes it as it
    is (the provider speaks its format, under the same model name)."""
    if (ctx.raw_body is not None and ctx.provider_format == ctx.client_format
            and target.model == ctx.request_fields.model
            and not any(a != "rejected" for a in ctx.plugin_actions.values())):
        return ctx.raw_body
    return None


def _request_for(ctx: RequestContext, body: bytes | None) -> Request:
    """What the provider is given besides ``body``: with the client's body as it came, the
    top-level fields do (the rest of the request need not be decoded); without it, the
    whole request, to be encoded."""
    return ctx.request_fields if body is not None else ctx.request


async def _replay(response: Response) -> AsyncIterator[list[StreamEvent]]:
    yield response_events(response)


async def _prepend(first: list[StreamEvent], rest: AsyncIterator[list[StreamEvent]]
                   ) -> AsyncIterator[list[StreamEvent]]:
    yield first
    try:
        async for batch in rest:
            yield batch
    finally:
        await _aclose(rest)


async def _aclose(events: AsyncIterator[list[StreamEvent]]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
