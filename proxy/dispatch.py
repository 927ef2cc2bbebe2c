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
import contextvars
import functools
import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pluggy

from proxy.canonical import fingerprint, vouched_for
from proxy.errors import ProxyError

F = TypeVar("F", bound=Callable[..., Any])

# The plugin whose hook is running: what it annotates, logs and starts in the background
# is its own. Tasks it starts inherit it.
current_plugin: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hookproxy_plugin", default=None)


class HookFailed(Exception):
    """A plugin's hook implementation raised or timed out."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        self.error = error
        what = ("timed out" if isinstance(error, TimeoutError)
                else f"raised {type(error).__name__}: {error}")
        super().__init__(f"plugin {plugin!r} {what} in {hook}")


Arguments = tuple[Any, ...]
"""A hook's arguments, in the order its hookspec names them (``(ctx, settings)`` for the
stages, ``(ctx, response, settings)`` for post_response...)."""


class Impl:
    """One hook implementation as hookproxy calls it: what pluggy's HookImpl holds, plus
    what is worked out once (when it is first looked up after plugins change) rather than
    on every call: whether it reports its changes, and how its arguments are picked."""

    __slots__ = ("argnames", "function", "named", "pick", "plugin", "reports")

    def __init__(self, hookimpl: Any, spec: Sequence[str]) -> None:
        self.function = hookimpl.function
        self.argnames: tuple[str, ...] = tuple(hookimpl.argnames)
        self.plugin = hookimpl.plugin
        self.reports: bool = getattr(self.function, _REPORTS, False)
        # Whether its plugin's name is set in ``current_plugin`` while it runs (see
        # ``no_plugin_context``).
        self.named: bool = not getattr(self.function, _UNNAMED, False)
        # The arguments it names, in its order, from those of the hookspec (``spec``, in
        # its order): None when it names them all, in that order (most do), and is given
        # them as they are.
        self.pick: Callable[[Arguments], Sequence[Any]] | None = None
        if self.argnames != tuple(spec):
            where = [spec.index(name) for name in self.argnames]
            # (an itemgetter of two or more positions gives a tuple; of one, the value)
            self.pick = operator.itemgetter(*where) if len(where) > 1 \
                else functools.partial(_pick, where)


def _pick(where: list[int], arguments: Arguments) -> list[Any]:
    return [arguments[i] for i in where]


def implementations(pm: pluggy.PluginManager, hook: str,
                    active: Mapping[str, Any]) -> list[tuple[str, Impl]]:
    """(plugin name, ``Impl``) for the active plugins, in the order pluggy would call them.

    Most requests share one ``active`` mapping (the config's), so the answer is kept per
    (plugin manager, hook, mapping) until a plugin is registered or unregistered.
    """
    key = (id(pm), hook, id(active))
    cached = _found.get(key)
    if cached is not None and cached[0] is active and cached[1] is pm:
        return cached[2]
    caller = getattr(pm.hook, hook)
    found = []
    for hookimpl in reversed(caller.get_hookimpls()):
        name = pm.get_name(hookimpl.plugin)
        if name is not None and name in active:
            impl = _impls.get(hookimpl)
            if impl is None:
                impl = _impls[hookimpl] = Impl(hookimpl, caller.spec.argnames)
            found.append((name, impl))
    _found[key] = (active, pm, found)
    if len(_found) > 1024:
        _found.pop(next(iter(_found)))
    return found


def forget_implementations() -> None:
    """Drops what ``implementations`` remembered; called when plugins change."""
    _found.clear()
    _impls.clear()


_found: dict[tuple[int, str, int], tuple[Mapping[str, Any], pluggy.PluginManager,
                                         list[tuple[str, Impl]]]] = {}
# Keyed by pluggy's HookImpl (hashed by identity); as many as there are registered.
_impls: dict[Any, Impl] = {}


_REPORTS = "hookproxy_reports_changes"

# Checks that an implementation marked ``reports_changes`` did report every change it
# made, by encoding the request before and after it: for tests (``proxy.testing`` and the
# suite turn it on), never in production, where it would cost what the mark saves.
CHECK_REPORTS = False


def reports_changes(function: F) -> F:
    """Marks a hook implementation that says what it changes: it calls ``ctx.changed()``
    after changing the request (or, in post_response, the response), naming each message
    it changed in place (``ctx.changed(message)``). hookproxy then need not encode the
    request before and after it to see whether it changed something, nor encode every
    message again to see which ones go out as they came.

    An implementation without the mark may change anything in place; hookproxy finds
    out by encoding."""
    setattr(function, _REPORTS, True)
    return function


_UNNAMED = "hookproxy_no_plugin_context"


def no_plugin_context(function: F) -> F:
    """Marks a sync hook implementation of hookproxy's own that never asks which plugin
    is running: it does not log, annotate or start tasks through the context
    (``ctx.log``, ``ctx.annotate``, ``ctx.spawn``, ``app.spawn``), nor start tasks of
    its own. It is called without its name set in ``current_plugin``, which saves a
    context-variable set and reset per call (an async one still has it set while it is
    awaited)."""
    setattr(function, _UNNAMED, True)
    return function


def check_reported(ctx: Any, hook: str, plugin: str, changed: bool, said: int) -> None:
    """With ``CHECK_REPORTS``: raises a ``ProxyError`` (a 500 that names the plugin) if an
    implementation marked ``reports_changes`` changed something without saying so, or
    changed a message in place without naming it. ``changed``: whether the encodings
    before and after it differ; ``said``: ``ctx.changes`` before it ran."""
    problem = None
    if changed and ctx.changes == said:
        problem = "changed the request without calling ctx.changed()"
    elif hook != "post_response":
        for index, message in enumerate(ctx.request.messages):
            if vouched_for(message) and message.__dict__.get("printed") != fingerprint(
                    message):
                problem = f"changed messages[{index}] without naming it in ctx.changed()"
                break
    if problem is not None:
        raise ProxyError(500, f"Plugin {plugin!r} {problem}, though it is marked "
                              "reports_changes", code="plugin_error", stage=hook,
                         plugin=plugin)


def check_decoded(request: Any) -> None:
    """With ``CHECK_REPORTS``: raises if a decoder left a message whose fingerprint is not
    what it holds (``content_key`` would vouch for what it is not)."""
    for index, message in enumerate(request.messages):
        printed = message.__dict__.get("printed")
        if printed is not None and printed != fingerprint(message):
            raise AssertionError(f"messages[{index}] was decoded with a stale fingerprint")


# The hooks that run before the request is (last) sent, which may change it in place.
# (Classifiers must not change it; what runs once an answer has come is too late to.)
_BEFORE_SENT = frozenset({"request_start", "pre_routing", "alongside_call"})


def _unreported(hook: str, impl: Impl, arguments: Arguments) -> None:
    """An implementation that does not report its changes is given the request: what
    was known unchanged must be looked at again."""
    if hook in _BEFORE_SENT and not impl.reports:
        _distrust(arguments)


def _distrust(arguments: Arguments) -> None:
    arguments[0].may_have_changed()  # the context: first of every hook in _BEFORE_SENT


# What a hook returns most often (nothing, tags, settings): builtin types, which are never
# awaitable. inspect.isawaitable's check against collections.abc.Awaitable costs more
# than most hooks' own work.
_NEVER_AWAITABLE = frozenset({type(None), bool, str, list, tuple, set, frozenset, dict})


def is_awaitable(result: Any) -> bool:
    """``inspect.isawaitable(result)``, quickly for the builtin types hooks return."""
    return type(result) not in _NEVER_AWAITABLE and inspect.isawaitable(result)


def start_impl(plugin: str, hook: str, impl: Impl, arguments: Arguments) -> Any:
    """Calls one implementation with the arguments it asks for. Returns its result, or the
    awaitable an async implementation gave (for ``finish_impl``)."""
    # (``_unreported`` written out: this runs for every hook of every request.)
    unreported = not impl.reports and hook in _BEFORE_SENT
    if unreported:
        _distrust(arguments)
    acting = current_plugin.set(plugin) if impl.named else None
    try:
        pick = impl.pick
        return impl.function(*(arguments if pick is None else pick(arguments)))
    except ProxyError as exc:
        exc.plugin = exc.plugin or plugin
        raise
    except Exception as exc:
        raise HookFailed(plugin, hook, exc) from exc
    finally:
        if acting is not None:
            current_plugin.reset(acting)
        if unreported:
            # What it asked about the request before changing it (content_key) is stale.
            _distrust(arguments)


async def finish_impl(plugin: str, hook: str, result: Any, timeout: float) -> Any:
    """Awaits what ``start_impl`` returned if it is awaitable, bounded by ``timeout``."""
    if not is_awaitable(result):
        return result
    acting = current_plugin.set(plugin)
    try:
        return await asyncio.wait_for(result, timeout)
    except ProxyError as exc:
        exc.plugin = exc.plugin or plugin
        raise
    except HookFailed:
        raise  # a sync implementation run in a worker thread failed there
    except Exception as exc:
        raise HookFailed(plugin, hook, exc) from exc
    finally:
        current_plugin.reset(acting)


async def finish_call(plugin: str, hook: str, impl: Impl, arguments: Arguments,
                      result: Any, timeout: float) -> Any:
    """The rest of ``call_impl`` once ``start_impl`` has returned an awaitable."""
    try:
        return await finish_impl(plugin, hook, result, timeout)
    finally:
        # What looked at the request while it ran may have seen it before a change.
        _unreported(hook, impl, arguments)


async def call_impl(plugin: str, hook: str, impl: Impl, arguments: Arguments,
                    timeout: float) -> Any:
    """Calls one implementation and awaits it if it is async.

    Raises ``HookFailed`` for an error or a timeout; a ``ProxyError`` (a ``Reject``)
    passes through with the plugin's name on it. (A caller that runs mostly sync hooks
    may call ``start_impl`` and, for an awaitable, ``finish_call`` itself: the same.)
    """
    result = start_impl(plugin, hook, impl, arguments)
    if not is_awaitable(result):
        return result
    return await finish_call(plugin, hook, impl, arguments, result, timeout)


def call_impl_sync(plugin: str, hook: str, impl: Impl, arguments: Arguments) -> Any:
    """For hooks that must be synchronous (validate_settings)."""
    try:
        pick = impl.pick
        result = impl.function(*(arguments if pick is None else pick(arguments)))
    except Exception as exc:
        raise HookFailed(plugin, hook, exc) from exc
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise HookFailed(plugin, hook, TypeError(f"{hook} must not be async"))
    return result
