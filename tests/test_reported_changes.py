"""Plugins that report their changes (``@reports_changes`` and ``ctx.changed``): what they
change reaches the provider, what they do not goes as it came, a plugin that keeps its
changes to itself is still seen, and one that is marked but hides a change is caught by
the check tests run under (``proxy.dispatch.CHECK_REPORTS``).

The suite runs with the check on (tests/conftest.py); the tests here that say so turn it
off, to run the way a served proxy does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import openai
import pytest

from proxy import RequestContext, TextDelta, TextPart, dispatch, hookimpl, reports_changes
from proxy.canonical import content_key
from proxy.context import RequestContext as Context
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, upstream_config

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "please mail jane.doe@example.com"},
    {"role": "assistant", "content": "noted"},
    {"role": "user", "content": "last question"},
]


@pytest.fixture
def served_as_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "CHECK_REPORTS", False)


@contextmanager
def serving(upstream: Any, plugins: dict[str, Any], *extra: tuple[str, Any]
            ) -> Iterator[tuple[ProxyServer, list[Context]]]:
    host = PluginHost()
    host.discover()
    for name, plugin in extra:
        host.add(plugin, name)
        plugins.setdefault(name, {})
    finished: list[Context] = []
    with ProxyServer(upstream_config(upstream, plugins=plugins), host=host,
                     on_finish=finished.append) as server:
        yield server, finished


def _ask(proxy: ProxyServer, messages: list[dict[str, Any]] = HISTORY) -> None:
    proxy.openai().chat.completions.create(model="gpt-test", messages=messages)


class ShoutsReported:
    """Upper-cases one message in place and says so."""

    @hookimpl
    @reports_changes
    def request_start(self, ctx: RequestContext) -> None:
        message = ctx.request.messages[2]
        for part in message.content:
            if isinstance(part, TextPart):
                part.text = part.text.upper()
        ctx.changed(message)


class ShoutsSilently:
    """Upper-cases one message in place and says nothing: not marked."""

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def request_start(self, ctx: RequestContext) -> None:
        for part in ctx.request.messages[self.index].content:
            if isinstance(part, TextPart):
                part.text = part.text.upper()


class First(ShoutsSilently):
    request_start = hookimpl(tryfirst=True)(ShoutsSilently.request_start)


class Last(ShoutsSilently):
    request_start = hookimpl(trylast=True)(ShoutsSilently.request_start)


class Reads:
    """Marked, and changes nothing."""

    @hookimpl
    @reports_changes
    def request_start(self, ctx: RequestContext) -> None:
        assert ctx.request.messages


def test_a_reported_change_reaches_the_provider_and_the_rest_goes_as_it_came(
        upstream, served_as_in_production):
    with serving(upstream, {}, ("shouts", ShoutsReported())) as (proxy, finished):
        _ask(proxy)
        sent = upstream.last["messages"]
        assert sent[3]["content"] == "PLEASE MAIL JANE.DOE@EXAMPLE.COM"
        assert [m for i, m in enumerate(sent) if i != 3] == [
            m for i, m in enumerate(HISTORY) if i != 3]
        assert proxy.settled(finished)[-1].plugin_actions == {"shouts": "modified"}


def test_a_marked_plugin_that_changes_nothing_is_not_modified(upstream,
                                                              served_as_in_production):
    with serving(upstream, {}, ("reads", Reads())) as (proxy, finished):
        _ask(proxy)
        assert upstream.last["messages"] == HISTORY
        assert proxy.settled(finished)[-1].plugin_actions == {}


@pytest.mark.parametrize("silent", [First, Last], ids=["before-redact", "after-redact"])
def test_a_plugin_that_does_not_report_is_still_seen_beside_reporting_ones(
        upstream, served_as_in_production, silent):
    # redact reports its changes, and looks at every message; the unmarked plugin changes
    # a message in place before or after it: the change must reach the provider either way.
    with serving(upstream, {"redact": {}}, ("silent", silent(0))) as (proxy, finished):
        for _ in range(2):  # the second time, every message is remembered from the first
            _ask(proxy)
            sent = upstream.last["messages"]
            assert sent[1]["content"] == "FIRST QUESTION"
            assert sent[3]["content"] == "please mail [EMAIL_1]"
            assert sent[5] == HISTORY[5]
            actions = proxy.settled(finished)[-1].plugin_actions
            assert actions == {"silent": "modified", "redact": "modified"}


def test_a_marked_plugin_that_hides_a_change_to_a_message_fails_under_the_check(upstream):
    class Hides:
        @hookimpl
        @reports_changes
        def request_start(self, ctx: RequestContext) -> None:
            ctx.request.messages[4].content[0].text = "changed"  # type: ignore[union-attr]
            ctx.changed()  # but not naming the message

    with serving(upstream, {}, ("hides", Hides())) as (proxy, _), pytest.raises(
            openai.InternalServerError, match=r"'hides' changed messages\[4\] without naming"):
        _ask(proxy)


def test_a_marked_plugin_that_says_nothing_fails_under_the_check(upstream):
    class Quiet:
        @hookimpl
        @reports_changes
        def request_start(self, ctx: RequestContext) -> None:
            ctx.request.temperature = 0.1

    with serving(upstream, {}, ("quiet", Quiet())) as (proxy, _), pytest.raises(
            openai.InternalServerError, match=r"'quiet' changed the request without calling"):
        _ask(proxy)


def test_the_built_in_plugins_report_what_they_change(upstream, served_as_in_production):
    plugins = {"system_prompt": {"text": "Added."}, "param_limits": {"max_tokens": 10},
               "redact": {}}
    with serving(upstream, plugins) as (proxy, finished):
        proxy.openai().chat.completions.create(model="gpt-test", messages=HISTORY,
                                               max_tokens=50)
        body = upstream.last
        assert body["max_tokens"] == 10
        assert body["messages"][0] == {"role": "system", "content": "Added."}
        assert body["messages"][4]["content"] == "please mail [EMAIL_1]"
        assert proxy.settled(finished)[-1].plugin_actions == {
            "system_prompt": "modified", "param_limits": "modified", "redact": "modified"}
        proxy.openai().chat.completions.create(model="gpt-test", messages=HISTORY[-1:],
                                               max_tokens=5)
        assert upstream.last["max_tokens"] == 5
        # Under the cap and nothing to mask: only the system prompt changed the request.
        assert proxy.settled(finished)[-1].plugin_actions == {"system_prompt": "modified"}


class LoudStream:
    """Upper-cases each text delta in place; reports it when ``says``."""

    def __init__(self, says: bool) -> None:
        self.says = says

    @hookimpl
    @reports_changes
    def stream_chunk(self, ctx: RequestContext, event: Any) -> None:
        if isinstance(event, TextDelta):
            event.text = event.text.upper()
            if self.says:
                ctx.changed()


def _streamed(proxy: ProxyServer) -> str:
    stream = proxy.openai().chat.completions.create(
        model="gpt-test", messages=HISTORY[-1:], stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_a_reported_change_to_a_stream_event_reaches_the_client(upstream,
                                                                served_as_in_production):
    with serving(upstream, {}, ("loud", LoudStream(says=True))) as (proxy, _):
        # Without the report, the event's own bytes (lowercase) would have gone out.
        assert _streamed(proxy) == "ECHO: LAST QUESTION"


def test_a_stream_hook_that_hides_a_change_fails_under_the_check(upstream):
    with serving(upstream, {}, ("loud", LoudStream(says=False))) as (proxy, _), \
            pytest.raises(openai.APIError, match=r"without calling ctx\.changed"):
        _streamed(proxy)


def test_messages_moved_to_a_new_request_are_still_looked_at(upstream, served_as_in_production):
    class Rebuilds:
        """Marked: puts the same messages in a request of its own making, and says so."""

        @hookimpl(tryfirst=True)
        @reports_changes
        def request_start(self, ctx: RequestContext) -> None:
            ctx.request = msgspec.structs.replace(ctx.request)
            ctx.changed()

    with serving(upstream, {}, ("rebuilds", Rebuilds()), ("silent", Last(0))) as (proxy, _):
        _ask(proxy)
        assert upstream.last["messages"][1]["content"] == "FIRST QUESTION"


class SkipsKnownThenShouts:
    """Not marked: asks content_key of each message (as a memo lookup would), then
    changes the user messages in place."""

    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        for message in ctx.request.messages:
            content_key(message)
            if message.role == "user":
                for part in message.content:
                    if isinstance(part, TextPart):
                        part.text = part.text.upper()


@pytest.mark.parametrize("check", [True, False], ids=["checked", "as-served"])
def test_an_unmarked_hook_that_asks_content_key_first_still_has_its_change_sent(
        upstream, monkeypatch, check):
    monkeypatch.setattr(dispatch, "CHECK_REPORTS", check)
    with serving(upstream, {}, ("shouts", SkipsKnownThenShouts())) as (proxy, _):
        _ask(proxy)
        assert upstream.last["messages"][1]["content"] == "FIRST QUESTION"


@pytest.mark.parametrize("check", [True, False], ids=["checked", "as-served"])
def test_responses_items_merged_into_one_message_are_keyed_as_merged(upstream, monkeypatch,
                                                                     check):
    # Two tool outputs in a row make one message: redact must not take it for the clean
    # message the first output alone made on an earlier request.
    monkeypatch.setattr(dispatch, "CHECK_REPORTS", check)
    call = {"type": "function_call", "name": "f", "arguments": "{}"}
    clean = {"type": "function_call_output", "call_id": "c1",
             "output": "the first tool output is clean and long enough"}
    one = [{"role": "user", "content": "run it"}, {**call, "call_id": "c1"}, clean]
    two = [{"role": "user", "content": "run it"}, {**call, "call_id": "c1"},
           {**call, "call_id": "c2"}, clean,
           {"type": "function_call_output", "call_id": "c2",
            "output": "mail jane.doe@example.com"}]
    with serving(upstream, {"redact": {}}) as (proxy, _):
        for items in (one, two):
            proxy.openai().responses.create(model="gpt-test", input=items, store=False)
        assert "jane.doe@example.com" not in json.dumps(upstream.last["messages"])
