"""The ``alongside_call`` hooks: checks that run beside the provider call and can cancel it.

They start as the provider call starts, each in a task of its own. A check that rejects
cancels the call (or, for a stream that has begun, ends it with an error event); the
answer, or a stream's end event, waits for every check to finish. So a check costs the
answer only the time by which it outlasts the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.canonical import StreamEnd, StreamEvent
from proxy.context import Attempt, RequestContext
from proxy.dispatch import HookFailed, call_impl
from proxy.errors import ProxyError
from proxy.record import ms

if TYPE_CHECKING:
    from proxy.pipeline import Pipeline

T = TypeVar("T")
HOOK = "alongside_call"


class Alongside:
    """One request's alongside_call checks, running."""

    def __init__(self, pipeline: Pipeline, ctx: RequestContext,
                 impls: list[tuple[str, Any]]) -> None:
        self.pipeline = pipeline
        self.ctx = ctx
        self.started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._check(name, impl)) for name, impl in impls]

    async def _check(self, name: str, impl: Any) -> None:
        ctx = self.ctx
        arguments = (ctx, ctx.plugin_settings[name])
        try:
            await call_impl(name, HOOK, impl, arguments, self.pipeline._timeout(name))
        except ProxyError as exc:
            ctx.plugin_actions[name] = "rejected"
            exc.stage, exc.plugin = HOOK, name
            raise
        except HookFailed as exc:
            failure = self.pipeline.stage_failure(ctx, HOOK, name, exc)
            if failure is not None:
                raise failure from exc.error
        finally:
            ctx.timings[HOOK] = time.perf_counter() - self.started

    def _raise_if_failed(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def race(self, work: Awaitable[T], calling: bool = True) -> T:
        """``work`` (the provider call, or a stream's next batch), cancelled if a check
        rejects before it is done. ``calling``: ``work`` makes the provider call (and the
        record shows the call the check cancelled)."""
        job = asyncio.ensure_future(work)
        try:
            while True:
                self._raise_if_failed()
                pending = [task for task in self.tasks if not task.done()]
                if not pending:
                    return await job
                await asyncio.wait([job, *pending], return_when=asyncio.FIRST_COMPLETED)
                self._raise_if_failed()
                if job.done():
                    return job.result()
        except ProxyError as exc:
            if not job.done():
                await _cancel(job)
                if calling:
                    self._note_cancelled_call(exc)
            raise
        finally:
            if not job.done():
                await _cancel(job)

    def _note_cancelled_call(self, reason: ProxyError) -> None:
        """The record shows the provider call a check cancelled, if one had begun."""
        ctx = self.ctx
        if ctx.provider is None:
            return
        ctx.attempts.append(Attempt(
            provider=ctx.provider, model=ctx.model or "", status=0,
            error=f"cancelled: {reason.plugin} refused the request in {HOOK}",
            latency_ms=ms(time.perf_counter() - self.started)))

    async def settle(self) -> None:
        """Waits for every check; raises the rejection or failure of the first that had
        one."""
        if any(not task.done() for task in self.tasks):
            await asyncio.wait(self.tasks)
        self._raise_if_failed()

    def cancel(self) -> None:
        for task in self.tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: it is reported through the request

    async def guard_stream(self, opening: Awaitable[AsyncIterator[list[StreamEvent]]]
                           ) -> AsyncIterator[list[StreamEvent]]:
        """The provider's stream, opened and read while the checks run: a rejection
        cancels it; the batch with the stream's end waits for every check."""
        try:
            events = await self.race(opening)
            try:
                while True:
                    if any(not task.done() for task in self.tasks):
                        batch = await self.race(anext(events, None), calling=False)
                    else:
                        batch = await anext(events, None)
                    if batch is None:
                        break
                    if any(isinstance(event, StreamEnd) for event in batch):
                        await self.settle()
                    yield batch
                await self.settle()
            finally:
                close = getattr(events, "aclose", None)
                if close is not None:
                    await close()
        finally:
            self.cancel()


async def _cancel(job: asyncio.Future[Any]) -> None:
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await job
