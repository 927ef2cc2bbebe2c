"""The plugin pipeline through a live server: the installed example package, and small
plugins registered in code for error policy and ordering. Each hook in hookspecs.py has a
``test_hook_<name>`` here (tests/test_plugin_docs.py checks that)."""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import hookproxy_example
import openai
import pytest

from proxy import DROP, Reject, RequestContext, Response, TextDelta, TextPart, hookimpl
from proxy.config import ConfigError, parse_config
from proxy.dispatch import current_plugin, no_plugin_context
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, upstream_config, wait_for

HI = [{"role": "user", "content": "hello"}]


@contextmanager
def serving(upstream: Any, plugins: dict[str, Any] | None = None, *extra: tuple[str, Any],
            classifiers: dict[str, Any] | None = None, **config: Any) -> Iterator[ProxyServer]:
    """A proxy with the installed plugins, plus ``extra`` (name, object) plugins."""
    host = PluginHost()
    host.discover()
    for name, plugin in extra:
        kind = "classifier" if name.startswith("classify") else "plugin"
        host.add(plugin, name, kind)
    settings = upstream_config(upstream, plugins=plugins or {},
                               classifiers=classifiers or {}, **config)
    with ProxyServer(settings, host=host) as server:
        yield server


@pytest.fixture(autouse=True)
def _clear_example_records() -> None:
    hookproxy_example.ERRORS.clear()
    hookproxy_example.FINISHED.clear()


# --- the example package, installed through its entry point ------------------------------


def test_hook_request_start_modifies_the_request(upstream):
    with serving(upstream, {"example": {"note": "Keep answers short."}}) as proxy:
        proxy.openai().chat.completions.create(
            model="gpt-test", messages=[{"role": "system", "content": "Hi."}, *HI])
        assert upstream.last["messages"][:2] == [
            {"role": "system", "content": "Hi."},
            {"role": "system", "content": "Keep answers short."}]
        proxy.anthropic().messages.create(model="claude-test", max_tokens=9, messages=HI)
        assert upstream.last["system"] == "Keep answers short."


def test_short_circuit_skips_the_provider_in_both_formats(upstream):
    with serving(upstream, {"example": {}}) as proxy:
        before = len(upstream.received)
        ping = [{"role": "user", "content": "ping"}]
        result = proxy.openai().chat.completions.create(model="gpt-test", messages=ping)
        assert result.choices[0].message.content == "pong"
        stream = proxy.openai().chat.completions.create(model="gpt-test", messages=ping,
                                                        stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "pong"
        message = proxy.anthropic().messages.create(model="claude-test", max_tokens=9,
                                                    messages=ping)
        assert message.content[0].text == "pong"
        with proxy.anthropic().messages.stream(model="claude-test", max_tokens=9,
                                               messages=ping) as s:
            assert "".join(s.text_stream) == "pong"
        assert len(upstream.received) == before
        # End still ran for each of them.
        assert len(proxy.settled(hookproxy_example.FINISHED)) == 4


def test_short_circuit_still_runs_post_response(upstream):
    with serving(upstream, {"example": {"shout": True}}) as proxy:
        result = proxy.openai().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "ping"}])
        assert result.choices[0].message.content == "PONG"


def test_reject_in_the_client_format(upstream):
    with serving(upstream, {"example": {"blocked": ["launch codes"]}}) as proxy:
        secret = [{"role": "user", "content": "tell me the launch codes"}]
        with pytest.raises(openai.PermissionDeniedError, match="launch codes") as caught:
            proxy.openai().chat.completions.create(model="gpt-test", messages=secret)
        assert caught.value.body["type"] == "permission_error"
        with pytest.raises(anthropic.PermissionDeniedError, match="launch codes") as caught2:
            proxy.anthropic().messages.create(model="claude-test", max_tokens=9,
                                              messages=secret, stream=True)
        assert caught2.value.body["error"]["type"] == "permission_error"
        # Observers run once the answers are out.
        wait_for(lambda: len(hookproxy_example.ERRORS) == 2)
        assert [e.stage for e in hookproxy_example.ERRORS] == ["request_start"] * 2
        assert hookproxy_example.ERRORS[0].plugin == "example"


def test_hook_pre_routing_forces_a_model(upstream):
    with serving(upstream, {"example": {"route_to": "claude-test"}}) as proxy:
        result = proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
        assert result.model == "claude-test"
        assert upstream.last["model"] == "claude-test"  # the Anthropic side answered


def test_hook_stream_chunk_changes_chunks(upstream):
    with serving(upstream, {"example": {"shout": True}}) as proxy:
        stream = proxy.openai().chat.completions.create(model="gpt-test", messages=HI,
                                                        stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "ECHO: HELLO"
        with proxy.anthropic().messages.stream(model="gpt-test", max_tokens=9,
                                               messages=HI) as s:
            assert "".join(s.text_stream) == "ECHO: HELLO"


def test_hook_post_response_changes_the_answer(upstream):
    with serving(upstream, {"example": {"shout": True}}) as proxy:
        message = proxy.anthropic().messages.create(model="claude-test", max_tokens=9,
                                                    messages=HI)
        assert message.content[0].text == "ECHO: HELLO"


def test_hook_on_error_sees_upstream_failures(upstream):
    with serving(upstream, {"example": {}}) as proxy:
        with pytest.raises(openai.InternalServerError):
            proxy.openai().chat.completions.create(model="oai/x-status-500", messages=HI)
        (error,) = wait_for(lambda: hookproxy_example.ERRORS)
        assert error.stage == "upstream" and error.status == 502
        assert "fake upstream says 500" in error.message


def test_hook_request_end_runs_once_per_request(upstream):
    with serving(upstream, {"example": {}}) as proxy:
        proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
        with pytest.raises(openai.NotFoundError):
            proxy.openai().chat.completions.create(model="nope", messages=HI)
        stream = proxy.openai().chat.completions.create(model="gpt-test", messages=HI,
                                                        stream=True)
        list(stream)
        assert len(proxy.settled(hookproxy_example.FINISHED)) == 3
        assert len(set(hookproxy_example.FINISHED)) == 3


def test_hook_validate_settings_names_the_plugin(upstream):
    host = PluginHost()
    host.discover()
    config = parse_config(upstream_config(upstream, plugins={"example": {"shout": "loud"}}),
                          "my.toml")
    with pytest.raises(ConfigError, match=r"my.toml: \[plugins.example\].*shout"):
        host.enable(config)


def test_request_field_adds_plugins_and_is_not_forwarded(upstream):
    # The operator makes the plugin available per request; the request switches it on.
    with serving(upstream, {"example": {"enabled": False, "per_request": True}}) as proxy:
        result = proxy.openai().chat.completions.create(
            model="gpt-test", messages=HI,
            extra_body={"hookproxy": {"plugins": {"example": {"shout": True}}}})
        assert result.choices[0].message.content == "ECHO: HELLO"
        assert "hookproxy" not in upstream.last
        message = proxy.anthropic().messages.create(
            model="claude-test", max_tokens=9, messages=[{"role": "user", "content": "ping"}],
            extra_body={"hookproxy": {"plugins": {"example": True}}})
        assert message.content[0].text == "pong"


@pytest.mark.parametrize(("field", "match"), [
    ({"plugins": {"nope": True}}, "no usable plugin named 'nope'"),
    ({"plugins": {"example": {"shout": 3}}}, "shout"),
    ({"plugins": {"example": "yes"}}, "must be true or an object"),
    ({"colour": 1}, "`hookproxy` must be an object"),
])
def test_request_field_errors_are_400(upstream, field, match):
    with serving(upstream, {"example": {"enabled": False, "per_request": True}}) as proxy, \
            pytest.raises(openai.BadRequestError, match=match):
        proxy.openai().chat.completions.create(model="gpt-test", messages=HI,
                                               extra_body={"hookproxy": field})


def test_locked_settings_cannot_be_overridden(upstream):
    with serving(upstream, {"example": {"locked": True}}) as proxy, \
            pytest.raises(openai.PermissionDeniedError, match="locked"):
        proxy.openai().chat.completions.create(
            model="gpt-test", messages=HI,
            extra_body={"hookproxy": {"plugins": {"example": {"pong": False}}}})


def test_plugins_command_lists_the_example_package():
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "plugins", "--config",
                             "config.toml"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("example "))
    assert "hookproxy-example" in line and "1.0.0" in line and " no " in line
    assert "request_start" in line and "stream_chunk" in line
    assert any(x.startswith("cache ") and "hookproxy" in x for x in result.stdout.splitlines())


# --- error policy, ordering and dispatch, with plugins registered in code ----------------


class Boom:
    def __init__(self, hook: str) -> None:
        self.hook = hook

    def _maybe_fail(self, hook: str) -> None:
        if hook == self.hook:
            raise RuntimeError(f"boom in {hook}")

    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        self._maybe_fail("request_start")

    @hookimpl
    async def pre_routing(self, ctx: RequestContext) -> None:
        self._maybe_fail("pre_routing")

    @hookimpl
    def post_response(self, response: Response) -> None:
        self._maybe_fail("post_response")

    @hookimpl
    def stream_chunk(self, event: Any) -> None:
        if isinstance(event, TextDelta):
            self._maybe_fail("stream_chunk")

    @hookimpl
    async def request_end(self, ctx: RequestContext) -> None:
        self._maybe_fail("request_end")


@pytest.mark.parametrize("hook", ["request_start", "pre_routing"])
def test_start_and_pre_routing_errors_fail_the_request_naming_the_plugin(upstream, hook):
    with serving(upstream, {"boom": {}, "example": {}}, ("boom", Boom(hook))) as proxy:
        with pytest.raises(openai.InternalServerError, match="Plugin 'boom' failed in") as e:
            proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
        assert e.value.status_code == 500 and f"boom in {hook}" in e.value.message
        with pytest.raises(anthropic.InternalServerError, match="'boom'"):
            proxy.anthropic().messages.create(model="gpt-test", max_tokens=9, messages=HI)
        errors = proxy.settled(hookproxy_example.ERRORS)
        assert {(e.stage, e.plugin) for e in errors} == {(hook, "boom")}


@pytest.mark.parametrize("hook", ["post_response", "stream_chunk", "request_end"])
def test_later_stage_errors_are_reported_and_the_answer_goes_out(upstream, hook):
    with serving(upstream, {"boom": {}, "example": {}}, ("boom", Boom(hook))) as proxy:
        result = proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
        assert result.choices[0].message.content == "echo: hello"
        stream = proxy.openai().chat.completions.create(model="gpt-test", messages=HI,
                                                        stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "echo: hello"
        # Once per request: two requests (only the stream has chunks), one report each.
        expected = 1 if hook == "stream_chunk" else 2
        assert wait_for(lambda: len(hookproxy_example.ERRORS) == expected)
        assert all(e.stage == hook and e.plugin == "boom" for e in hookproxy_example.ERRORS)


class Hang:
    @hookimpl
    async def request_start(self, ctx: RequestContext) -> None:
        await asyncio.sleep(30)


def test_a_hanging_plugin_is_bounded_by_the_timeout(upstream):
    with serving(upstream, {"hang": {}}, ("hang", Hang()),
                 server={"plugin_timeout": 0.2}) as proxy, \
            pytest.raises(openai.InternalServerError,
                          match="504 - Plugin 'hang' timed out in request_start"):
        proxy.openai().chat.completions.create(model="gpt-test", messages=HI)


def test_per_plugin_timeout_and_skip(upstream):
    records: list[Any] = []
    host = PluginHost()
    host.discover()
    host.add(Hang(), "hang")
    config = upstream_config(upstream, plugins={"hang": {"timeout": 0.1, "on_timeout": "skip"}})
    with ProxyServer(config, host=host, on_finish=records.append) as proxy:
        # Its own 0.1 s, not the server-wide 10 s; then passed over, and the request goes on.
        result = proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
        assert result.choices[0].message.content == "echo: hello"
        wait_for(lambda: records)
        assert records[0].plugin_actions == {"hang": "timed_out"}
        assert records[0].errors[0].plugin == "hang"


class Recorder:
    """Appends its name to the request's scratch list at Start; stops there if asked."""

    order: list[list[str]] = []

    def __init__(self, name: str, answer: bool = False) -> None:
        self.name = name
        self.answer = answer

    @hookimpl
    async def request_start(self, ctx: RequestContext) -> Response | None:
        ctx.scratch.setdefault("order", []).append(self.name)
        if self.answer:
            return Response(id="x", model="m", content=[TextPart(text=self.name)])
        return None

    @hookimpl(trylast=True)
    def request_end(self, ctx: RequestContext) -> None:
        if self.name == "plain_1":
            Recorder.order.append(ctx.scratch.get("order", []))


class First(Recorder):
    @hookimpl(tryfirst=True)
    async def request_start(self, ctx: RequestContext) -> Response | None:
        return await super().request_start(ctx)


class Last(Recorder):
    @hookimpl(trylast=True)
    async def request_start(self, ctx: RequestContext) -> Response | None:
        return await super().request_start(ctx)


def test_hooks_run_in_pluggy_order(upstream):
    Recorder.order.clear()
    plugins = [("last", Last("last")), ("plain_1", Recorder("plain_1")),
               ("first", First("first")), ("plain_2", Recorder("plain_2"))]
    with serving(upstream, {name: {} for name, _ in plugins}, *plugins) as proxy:
        proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
    # tryfirst, then the rest last-registered first, then trylast.
    assert Recorder.order == [["first", "plain_2", "plain_1", "last"]]


class HeaderReader:
    seen: list[dict[str, str]] = []

    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        self.seen.append(dict(ctx.headers))


def test_a_plugin_reads_the_clients_headers(upstream):
    """ctx.headers: every header the client sent, by lower-case name; a name sent twice
    has its first value."""
    import http.client

    HeaderReader.seen.clear()
    with serving(upstream, {"reader": {}}, ("reader", HeaderReader())) as proxy:
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        body = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}'
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in [("Content-Type", "application/json"), ("X-Team", "blue"),
                            ("x-team", "red"), ("Content-Length", str(len(body)))]:
            connection.putheader(name, value)
        connection.endheaders(body)
        assert connection.getresponse().status == 200
        connection.close()
    [headers] = HeaderReader.seen
    assert headers["x-team"] == "blue"
    assert headers["content-type"] == "application/json"
    assert headers["host"].startswith("127.0.0.1")
    assert all(name == name.lower() for name in headers)


class NamesItsOwn:
    """Hooks that name the arguments they want in an order of their own, or only some."""

    seen: list[tuple[str, Any]] = []

    @hookimpl
    def request_start(self, settings: dict[str, Any], ctx: RequestContext) -> None:
        self.seen.append(("request_start", (settings["mark"], ctx.request.model)))

    @hookimpl
    def pre_routing(self, settings: dict[str, Any]) -> None:
        self.seen.append(("pre_routing", settings["mark"]))

    @hookimpl
    def post_response(self, response: Response, ctx: RequestContext) -> None:
        self.seen.append(("post_response", (response.text, ctx.request.model)))

    @hookimpl
    def stream_chunk(self, settings: dict[str, Any], event: Any) -> None:
        if isinstance(event, TextDelta):
            self.seen.append(("stream_chunk", (settings["mark"], event.text)))

    @hookimpl
    def request_end(self) -> None:
        self.seen.append(("request_end", None))


def test_hooks_get_the_arguments_they_name_in_their_order(upstream):
    NamesItsOwn.seen.clear()
    with serving(upstream, {"own": {"mark": 7}}, ("own", NamesItsOwn())) as proxy:
        reply = proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
        text = proxy.settled(reply.choices[0].message.content)
        assert text and NamesItsOwn.seen == [
            ("request_start", (7, "gpt-test")), ("pre_routing", 7),
            ("post_response", (text, "gpt-test")), ("request_end", None)]
        NamesItsOwn.seen.clear()
        stream = proxy.openai().chat.completions.create(model="gpt-test", messages=HI,
                                                        stream=True)
        streamed = proxy.settled("".join(c.choices[0].delta.content or ""
                                         for c in stream if c.choices))
    chunks = [what for hook, what in NamesItsOwn.seen if hook == "stream_chunk"]
    assert streamed and chunks and all(mark == 7 for mark, _ in chunks)
    assert "".join(piece for _, piece in chunks) == streamed


class WhoIsRunning:
    """Says, from each hook, which plugin ``current_plugin`` names while it runs."""

    seen: list[tuple[str, str | None]] = []

    @hookimpl
    def request_start(self) -> None:
        self.seen.append(("request_start", current_plugin.get()))

    @hookimpl
    @no_plugin_context
    def pre_routing(self) -> None:
        self.seen.append(("pre_routing", current_plugin.get()))


def test_hooks_run_named_unless_marked_no_plugin_context(upstream):
    """A hook runs with its plugin's name in ``current_plugin`` (what ctx.log, annotate
    and spawn read); one of hookproxy's own marked ``no_plugin_context`` runs without."""
    WhoIsRunning.seen.clear()
    with serving(upstream, {"who": {}}, ("who", WhoIsRunning())) as proxy:
        proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
    assert WhoIsRunning.seen == [("request_start", "who"), ("pre_routing", None)]


def test_short_circuit_stops_the_later_hooks(upstream):
    Recorder.order.clear()
    plugins = [("plain_1", Recorder("plain_1")), ("answerer", Recorder("answerer", True))]
    with serving(upstream, {name: {} for name, _ in plugins}, *plugins) as proxy:
        result = proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
    assert result.choices[0].message.content == "answerer"
    assert Recorder.order == [["answerer"]]


class Dropper:
    @hookimpl
    def stream_chunk(self, event: Any) -> Any:
        if isinstance(event, TextDelta) and event.text.strip() == "echo:":
            return DROP
        return None


def test_stream_chunk_can_drop_chunks(upstream):
    with serving(upstream, {"dropper": {}}, ("dropper", Dropper())) as proxy:
        stream = proxy.openai().chat.completions.create(model="gpt-test", messages=HI,
                                                        stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "hello"


class Tagger:
    def __init__(self, tags: list[str], delay: float = 0.0, fail: bool = False) -> None:
        self.tags, self.delay, self.fail = tags, delay, fail

    @hookimpl
    async def classify(self, ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ValueError("cannot tell")
        return [*self.tags, *settings.get("extra", [])]


class TagRouter:
    @hookimpl
    def pre_routing(self, ctx: RequestContext) -> None:
        if "route-me" in ctx.tags:
            ctx.force_provider = "ant"


def test_hook_classify_tags_merge_and_failures_only_cost_their_own_tags(upstream):
    classifiers = [("classify_a", Tagger(["x", "route-me"])),
                   ("classify_b", Tagger(["x", "y"])),
                   ("classify_slow", Tagger(["late"], delay=5)),
                   ("classify_bad", Tagger(["bad"], fail=True))]
    with serving(upstream, {"tag_router": {}}, *classifiers, ("tag_router", TagRouter()),
                 classifiers={"classify_a": {}, "classify_b": {"extra": ["z"]},
                              "classify_slow": {}, "classify_bad": {}},
                 server={"classifier_timeout": 0.3}) as proxy:
        raw = proxy.openai().chat.completions.with_raw_response.create(
            model="gpt-test", messages=HI)
        tags = raw.headers["x-hookproxy-tags"].split(",")
        assert sorted(tags) == ["route-me", "x", "y", "z"]
        assert raw.headers["x-hookproxy-provider"] == "ant"  # PreRouting saw the tags
        assert raw.parse().choices[0].message.content == "echo: hello"


class Typo:
    @hookimpl
    def request_strat(self, ctx: RequestContext) -> None:
        pass


class Wrapper:
    @hookimpl(wrapper=True)
    def request_start(self, ctx: RequestContext) -> Any:
        return (yield)


def test_a_hook_that_matches_no_spec_is_refused_by_name():
    host = PluginHost()
    with pytest.raises(ConfigError, match=r"plugin 'typo'.*request_strat"):
        host.add(Typo(), "typo")
    with pytest.raises(ConfigError, match=r"plugin 'wrap'.*wrapper"):
        host.add(Wrapper(), "wrap")
    assert not host.pm.has_plugin("typo") and not host.pm.has_plugin("wrap")


def test_a_plugin_that_fails_to_import_is_named_and_serve_refuses_it():
    host = PluginHost()
    host.load(md.EntryPoint(name="broken", value="no_such_module_for_hookproxy",
                            group="hookproxy.plugins"), "plugin")
    assert "failed to import" in (host.installed["broken"].error or "")
    host.enable(parse_config({"plugins": {}}))  # installed but not enabled: fine
    with pytest.raises(ConfigError, match=r"\[plugins.broken\].*'broken' cannot be used: "
                                          "failed to import no_such_module_for_hookproxy"):
        host.enable(parse_config({"plugins": {"broken": {}}}, "c.toml"))


class Reject429:
    @hookimpl
    def pre_routing(self, ctx: RequestContext) -> None:
        raise Reject(429, "slow down", headers={"retry-after": "7"})


def test_reject_keeps_status_and_headers(upstream):
    with serving(upstream, {"limiter": {}}, ("limiter", Reject429())) as proxy:
        with pytest.raises(anthropic.RateLimitError, match="slow down") as caught:
            proxy.anthropic().messages.create(model="gpt-test", max_tokens=9, messages=HI)
        assert caught.value.response.headers["retry-after"] == "7"
