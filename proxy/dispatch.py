"""Calling hooks, sync or async, in pluggy's order.

pluggy calls implementations synchronously and knows nothing of coroutines (pluggy
issues #320, #378). So the host asks pluggy for a hook's implementations in its calling
order (LIFO by registration, tryfirst first, trylast last) and calls them one at a time
itself: each implementation gets only the arguments it names, its own settings, and a
time bound if it is async; a short-circuit stops the loop before the next implementation
is even called, so no coroutine is ever left unawaited; and an error is pinned on the
plugin that raised it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping
from typing import Any

import pluggy

from proxy.errors import ProxyError


class HookFailed(Exception):
    """A plugin's hook implementation raised or timed out."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        self.error = error
        what = ("timed out" if isinstance(error, TimeoutError)
                else f"raised {type(error).__name__}: {error}")
        super().__init__(f"plugin {plugin!r} {what} in {hook}")


def implementations(pm: pluggy.PluginManager, hook: str,
                    active: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(plugin name, HookImpl) for the active plugins, in the order pluggy would call them."""
    caller = getattr(pm.hook, hook)
    found = []
    for impl in reversed(caller.get_hookimpls()):
        name = pm.get_name(impl.plugin)
        if name is not None and name in active:
            found.append((name, impl))
    return found


async def call_impl(plugin: str, hook: str, impl: Any, arguments: Mapping[str, Any],
                    timeout: float) -> Any:
    """Calls one implementation with the arguments it asks for; awaits it if it is async.

    Raises ``HookFailed`` for an error or a timeout; a ``ProxyError`` (a ``Reject``)
    passes through with the plugin's name on it.
    """
    try:
        result = impl.function(*[arguments[name] for name in impl.argnames])
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, timeout)
    except ProxyError as exc:
        exc.plugin = exc.plugin or plugin
        raise
    except Exception as exc:
        raise HookFailed(plugin, hook, exc) from exc
    return result


def call_impl_sync(plugin: str, hook: str, impl: Any, arguments: Mapping[str, Any]) -> Any:
    """For hooks that must be synchronous (validate_settings)."""
    try:
        result = impl.function(*[arguments[name] for name in impl.argnames])
    except Exception as exc:
        raise HookFailed(plugin, hook, exc) from exc
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise HookFailed(plugin, hook, TypeError(f"{hook} must not be async"))
    return result
