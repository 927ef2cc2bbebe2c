"""What plugins share for as long as the process runs, and the hooks that mark its life:
``startup``, ``config_reloaded`` and ``shutdown``.

``PluginApp`` is handed to those hooks as ``app`` and is reachable from every request as
``ctx.app`` (``ctx.session``, ``ctx.store``, ``ctx.spawn`` and ``ctx.log`` are shortcuts):
the process's one pooled HTTP client session, its ``Store``, background tasks that are
awaited at shutdown, and a logger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import aiohttp
import structlog

from proxy.config import Config
from proxy.dispatch import HookFailed, call_impl, current_plugin, implementations
from proxy.errors import ProxyError
from proxy.store import Store

log = structlog.get_logger("hookproxy.plugins")
# Background tasks running at once, at most: past this, ``spawn`` refuses (a plugin that
# starts one per request for work that never ends would otherwise grow without bound).
MAX_BACKGROUND_TASKS = 10_000


class StartupFailed(Exception):
    """A plugin's startup hook raised or timed out: the proxy does not start."""


class PluginApp:
    """The process-wide pieces plugins share (``app`` in the lifecycle hooks)."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession], store: Store,
                 config: Config) -> None:
        self._session = session
        self.store = store
        self.config = config
        self._tasks: dict[asyncio.Task[Any], str] = {}
        # Plugins whose startup has run (name -> settings): their shutdown runs at exit.
        self.started: dict[str, dict[str, Any]] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        """The process's one pooled ``aiohttp.ClientSession`` (the one providers use).
        Use it, never close it; pass a ``timeout=`` per call."""
        return self._session()

    @property
    def log(self) -> Any:
        """A structlog logger, bound to the calling plugin's name."""
        return log.bind(plugin=current_plugin.get())

    def spawn(self, work: Coroutine[Any, Any, Any], *, request_id: str | None = None
              ) -> asyncio.Task[Any]:
        """Runs ``work`` in the background, after and beside requests. It is awaited at
        shutdown (bounded by ``[server].plugin_timeout``, then cancelled); if it raises,
        the error is logged with the plugin's name (and the request id)."""
        if len(self._tasks) >= MAX_BACKGROUND_TASKS:
            work.close()
            raise RuntimeError(f"{MAX_BACKGROUND_TASKS} background tasks are running "
                               "already; not starting another")
        plugin = current_plugin.get() or "?"
        task = asyncio.get_running_loop().create_task(self._run(work, plugin, request_id))
        self._tasks[task] = plugin
        task.add_done_callback(self._tasks.pop)
        return task

    @staticmethod
    async def _run(work: Awaitable[Any], plugin: str, request_id: str | None) -> Any:
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("background_task_failed", plugin=plugin, request_id=request_id,
                        error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            return None

    @property
    def background(self) -> int:
        """How many background tasks are running."""
        return len(self._tasks)

    async def wait_background(self, timeout: float) -> None:
        """Awaits the background tasks, ``timeout`` seconds at most; then cancels what is
        left and says whose they were."""
        if not self._tasks:
            return
        _, left = await asyncio.wait(list(self._tasks), timeout=timeout)
        if left:
            owners = sorted({self._tasks.get(task, "?") for task in left})
            log.warning("background_tasks_cancelled", count=len(left), plugins=owners,
                        waited_s=timeout)
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=1.0)

    # --- the lifecycle hooks --------------------------------------------------------------

    async def startup(self, active: Mapping[str, dict[str, Any]], host: Any) -> list[str]:
        """Runs ``startup`` for the plugins in ``active`` that have not started yet.
        Returns what failed, one message per plugin naming it."""
        fresh = {name: settings for name, settings in active.items()
                 if name not in self.started}
        failed: dict[str, str] = {}
        for name, impl in implementations(host.pm, "startup", fresh):
            problem = await self._call(host, name, "startup", impl, fresh[name])
            if problem:
                failed[name] = problem
        self.started.update((n, s) for n, s in fresh.items() if n not in failed)
        return list(failed.values())

    async def reloaded(self, active: Mapping[str, dict[str, Any]], host: Any) -> list[str]:
        """After a reload: ``startup`` for plugins the new config turns on, then
        ``config_reloaded`` (with their new settings) for those that were running."""
        running = {name: settings for name, settings in active.items()
                   if name in self.started}
        failures = await self.startup(active, host)
        for name, impl in implementations(host.pm, "config_reloaded", running):
            problem = await self._call(host, name, "config_reloaded", impl, running[name])
            if problem:
                failures.append(problem)
        for name in running:
            self.started[name] = running[name]
        return failures

    async def shutdown(self, host: Any, timeout: float) -> None:
        """The process is stopping: background tasks finish (``timeout`` at most), then
        each started plugin's ``shutdown`` runs, then what those started in turn."""
        deadline = time.monotonic() + timeout
        await self.wait_background(timeout)
        for name, impl in implementations(host.pm, "shutdown", self.started):
            await self._call(host, name, "shutdown", impl, self.started[name])
        self.started = {}
        await self.wait_background(max(deadline - time.monotonic(), 1.0))

    async def _call(self, host: Any, name: str, hook: str, impl: Any,
                    settings: dict[str, Any]) -> str | None:
        """One lifecycle hook of one plugin; a failure is logged (with its traceback)
        and returned as a message naming the plugin."""
        timeout = host.timeouts.get(name, self.config.server.plugin_timeout)
        try:
            await call_impl(name, hook, impl, (self, settings), timeout)
        except (HookFailed, ProxyError) as exc:
            error = exc.error if isinstance(exc, HookFailed) else exc
            message = (str(exc) if isinstance(exc, HookFailed) else
                       f"plugin {name!r} refused in {hook}: {exc.message}")
            log.error(f"plugin_{hook}_failed", plugin=name, error=message,
                      exc_info=None if isinstance(error, TimeoutError) else error)
            return message
        return None
