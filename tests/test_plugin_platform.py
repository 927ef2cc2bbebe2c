"""The plugin platform through a live server with the SDKs: the lifecycle hooks, what the
context gives a plugin (shared session, store, background tasks, headers both ways,
annotations, a logger), and the hook that runs alongside the provider call. The servers
here are started with ``proxy.testing`` (the ``hookproxy`` fixture), as a plugin author's
tests would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import structlog

from proxy import Reject, RequestContext, Response, TextPart, hookimpl
from proxy.record import build_record
from proxy.testing import FakeProvider, Proxy
from tests.harness import wait_for

HI = [{"role": "user", "content": "hello"}]


def _openai_text(proxy: Proxy, stream: bool = False, model: str = "gpt-fake") -> str:
    client = proxy.openai()
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(model=model, messages=HI, stream=True)
                       if chunk.choices)
    return str(client.chat.completions.create(model=model, messages=HI)
               .choices[0].message.content)


# --- lifecycle ------------------------------------------------------------------------------


class Lifecycle:
    """Records its life; starts background work from a request."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.app: Any = None

    @hookimpl
    async def startup(self, app: Any, settings: dict[str, Any]) -> None:
        self.app = app
        await app.store.set("lifecycle:greeting", settings["greeting"].encode(), 60)
        self.events.append(("startup", settings["greeting"]))

    @hookimpl
    async def request_start(self, ctx: RequestContext) -> None:
        self.events.append(("request", (await ctx.store.get("lifecycle:greeting")).decode()))

        async def later() -> None:
            await asyncio.sleep(0.3)
            self.events.append("background")

        ctx.spawn(later())

    @hookimpl
    def config_reloaded(self, app: Any, settings: dict[str, Any]) -> None:
        self.events.append(("reloaded", settings["greeting"]))

    @hookimpl
    async def shutdown(self, app: Any) -> None:
        self.events.append("shutdown")


def test_hook_startup_runs_before_the_first_request(hookproxy):
    plugin = Lifecycle()
    proxy = hookproxy(plugins={"life": plugin}, settings={"life": {"greeting": "hi"}})
    assert plugin.events == [("startup", "hi")]  # before anything was served
    assert _openai_text(proxy) == "echo: hello"
    assert plugin.events[1] == ("request", "hi")  # what startup stored, from the request
    assert plugin.app is proxy.app and plugin.app.store is proxy.app.store


def test_hook_shutdown_runs_after_the_background_work(hookproxy_provider):
    plugin = Lifecycle()
    with Proxy(plugins={"life": plugin}, settings={"life": {"greeting": "hi"}},
               provider=hookproxy_provider) as proxy:
        proxy.anthropic().messages.create(model="claude-fake", max_tokens=20, messages=HI)
        assert "background" not in plugin.events  # the answer did not wait for it
    # SIGTERM's path: the background task finished, then shutdown ran, once.
    assert plugin.events[-2:] == ["background", "shutdown"]


def test_hook_config_reloaded_gets_the_new_settings(hookproxy):
    plugin, late = Lifecycle(), Lifecycle()
    proxy = hookproxy(plugins={"life": plugin, "late": late},
                      settings={"life": {"greeting": "hi"}, "late": {"enabled": False}})
    assert late.events == []
    problems = proxy.reload({"life": {"greeting": "bonjour"}, "late": {"greeting": "hey"}})
    assert problems == []
    assert plugin.events[-1] == ("reloaded", "bonjour")
    # A plugin the reload turned on starts then (not config_reloaded: it was not running).
    assert late.events == [("startup", "hey")]


class BrokenStart:
    @hookimpl
    def startup(self) -> None:
        raise ValueError("no API key for the moderation service")


class BrokenReload:
    @hookimpl
    def config_reloaded(self) -> None:
        raise RuntimeError("cannot apply the new settings")


def test_a_failing_startup_stops_the_proxy_naming_the_plugin(hookproxy_provider):
    started = Lifecycle()
    proxy = Proxy(plugins={"life": started, "broken": BrokenStart()},
                  settings={"life": {"greeting": "hi"}}, provider=hookproxy_provider)
    with structlog.testing.capture_logs() as logged, \
            pytest.raises(RuntimeError, match="plugin 'broken' raised ValueError: no API key"):
        proxy.start()
    # Plugins that had started are shut down again; the traceback is in the app log.
    assert started.events[-1] == "shutdown"
    failed = [e for e in logged if e["event"] == "plugin_startup_failed"]
    assert failed[0]["plugin"] == "broken" and isinstance(failed[0]["exc_info"], ValueError)


class BrokenShutdown:
    @hookimpl
    def shutdown(self) -> None:
        raise OSError("cannot flush the buffer")


def test_a_failing_shutdown_is_logged_and_the_others_still_run(hookproxy_provider):
    other = Lifecycle()
    with structlog.testing.capture_logs() as logged, \
            Proxy(plugins={"life": other, "broken": BrokenShutdown()},
                  settings={"life": {"greeting": "hi"}}, provider=hookproxy_provider):
        pass
    failed = [e for e in logged if e["event"] == "plugin_shutdown_failed"]
    assert [e["plugin"] for e in failed] == ["broken"]
    assert "cannot flush the buffer" in failed[0]["error"]
    assert other.events[-1] == "shutdown"


def test_a_failing_config_reloaded_is_named_and_the_reload_stands(hookproxy):
    proxy = hookproxy(plugins={"broken": BrokenReload(), "life": Lifecycle()},
                      settings={"life": {"greeting": "hi"}})
    problems = proxy.reload({"broken": {}, "life": {"greeting": "hallo"}})
    assert problems == ["plugin 'broken' raised RuntimeError: cannot apply the new settings "
                        "in config_reloaded"]
    assert proxy.gateway.host.enabled["life"] == {"greeting": "hallo"}


def test_serve_refuses_to_start_when_a_plugin_cannot(tmp_path):
    """From the command line: exit 2 and a message naming the plugin, nothing served."""
    (tmp_path / "boom_plugin.py").write_text(textwrap.dedent("""
        from proxy import hookimpl

        @hookimpl
        def startup(app):
            raise ConnectionError("the rules service is down")
    """))
    info = tmp_path / "boom_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: boom-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[hookproxy.plugins]\nboom = boom_plugin\n")
    config = tmp_path / "config.toml"
    config.write_text('[providers.mock]\ntype = "mock"\n[[models]]\nname = "m"\n'
                      'provider = "mock"\n[log]\npath = ""\n[plugins.boom]\n')
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config",
                             str(config), "--port", "0"], capture_output=True, text=True,
                            timeout=60, env={"PYTHONPATH": f"{tmp_path}:{Path.cwd()}",
                                             "PATH": ""})
    assert result.returncode == 2
    assert ("hookproxy: error: not serving: plugin 'boom' raised ConnectionError: the rules "
            "service is down in startup") in result.stderr


# --- what the context gives a plugin ---------------------------------------------------------


class Quota:
    """Counts each caller's requests in the shared store and tells the client what is
    left, in a response header; tags the provider call for the tenant."""

    sessions: list[Any] = []

    @hookimpl
    async def request_start(self, ctx: RequestContext, settings: dict[str, Any]) -> None:
        self.sessions.append(ctx.session)
        used = await ctx.store.incr("quota:test", 1, 60)
        left = settings["limit"] - used
        ctx.response_headers["x-quota-remaining"] = left
        ctx.upstream_headers["x-tenant"] = "team-ä\r\nx-evil: 1"
        ctx.annotate("used", used)
        if left < 0:
            raise Reject(429, "Quota used up")


def test_shared_session_store_and_response_header(hookproxy):
    proxy = hookproxy(plugins={"quota": Quota()}, settings={"quota": {"limit": 3}})
    raw = proxy.openai().chat.completions.with_raw_response.create(
        model="gpt-fake", messages=HI)
    assert raw.headers["x-quota-remaining"] == "2"
    with proxy.anthropic().messages.with_streaming_response.create(
            model="claude-fake", max_tokens=20, messages=HI, stream=True) as streamed:
        assert streamed.headers["x-quota-remaining"] == "1"
    raw = proxy.openai().chat.completions.with_raw_response.create(
        model="gpt-fake", messages=HI, stream=True)
    assert raw.headers["x-quota-remaining"] == "0"
    # A rejection carries the plugin's headers too.
    with pytest.raises(anthropic.RateLimitError) as refused:
        proxy.anthropic().messages.create(model="claude-fake", max_tokens=20, messages=HI)
    assert refused.value.response.headers["x-quota-remaining"] == "-1"
    # One pooled session for the whole process: the providers' own.
    assert len({id(s) for s in Quota.sessions}) == 1
    assert Quota.sessions[0] is proxy.gateway.session() and not Quota.sessions[0].closed
    # The upstream header reached the provider in both formats, encoded so that it
    # cannot add a header of its own.
    assert [h["x-tenant"] for h in proxy.provider.headers] == ["team-%C3%A4%0D%0Ax-evil: 1"] * 3
    assert not any("x-evil" in h for h in proxy.provider.headers)


class SetsHeader:
    def __init__(self, side: str, name: str, stage: str = "request_start") -> None:
        def set_header(ctx: RequestContext) -> None:
            getattr(ctx, f"{side}_headers")[name] = "1"

        setattr(self, stage, hookimpl(set_header))


@pytest.mark.parametrize(("side", "name"), [
    ("upstream", "authorization"), ("upstream", "x-api-key"), ("upstream", "api-key"),
    ("upstream", "Cookie"), ("upstream", "host"), ("upstream", "content-length"),
    ("response", "x-request-id"), ("response", "x-hookproxy-provider"),
    ("response", "content-type"), ("response", "bad name")])
def test_a_plugin_cannot_set_credentials_or_framing_headers(hookproxy, side, name):
    proxy = hookproxy(plugins={"sneaky": SetsHeader(side, name)})
    with pytest.raises(openai.InternalServerError) as failed:
        proxy.openai().chat.completions.create(model="gpt-fake", messages=HI)
    assert "'sneaky' failed in request_start" in failed.value.message
    assert proxy.provider.requests == []  # nothing went upstream


def test_the_operators_provider_headers_win_over_a_plugins(hookproxy, hookproxy_provider):
    providers = {"fake-openai": {"type": "openai", "base_url": hookproxy_provider.openai_url,
                                 "headers": {"X-Tenant": "operator"}},
                 "fake-anthropic": {"type": "anthropic",
                                    "base_url": hookproxy_provider.anthropic_url}}
    proxy = hookproxy(plugins={"tenant": SetsHeader("upstream", "x-tenant")},
                      config={"providers": providers})
    _openai_text(proxy)
    proxy.anthropic().messages.create(model="claude-fake", max_tokens=20, messages=HI)
    assert [h["x-tenant"] for h in proxy.provider.headers] == ["operator", "1"]


def test_a_header_set_after_a_stream_began_is_reported(hookproxy):
    proxy = hookproxy(plugins={"late": SetsHeader("response", "x-late", "post_response")})
    assert _openai_text(proxy, stream=True) == "echo: hello"  # the stream is unharmed
    raw = proxy.openai().chat.completions.with_raw_response.create(
        model="gpt-fake", messages=HI)
    assert raw.headers["x-late"] == "1"  # not streamed: in time
    streamed, answered = proxy.settled()
    assert "after the answer's headers had gone out" in \
        build_record(streamed, bodies="none").plugin_errors["late"]
    assert not answered.errors


class Annotates:
    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        ctx.annotate("verdict", {"allowed": True, "score": 0.25})
        ctx.annotate("api_key", "sk-should-not-be-logged")
        ctx.log.info("checked the request", words=len(ctx.request.prompt_text().split()))

    @hookimpl
    def post_response(self, ctx: RequestContext, response: Response) -> None:
        ctx.annotate("answer_chars", len(response.text))
        ctx.annotate("big", "x" * 20_000)  # over the bound: counted, not kept


def test_annotations_reach_the_record_and_the_logger_is_bound(hookproxy, tmp_path):
    log = tmp_path / "requests.jsonl"
    with structlog.testing.capture_logs() as logged:
        proxy = hookproxy(plugins={"notes": Annotates()}, config={"log": {"path": str(log)}})
        raw = proxy.anthropic().messages.with_raw_response.create(
            model="claude-fake", max_tokens=20, messages=HI)
        proxy.settled()
    request_id = raw.headers["x-request-id"]
    line = wait_for(lambda: log.exists() and log.read_text().strip())
    record = json.loads(line)
    assert record["annotations"] == {"notes": {
        "verdict": {"allowed": True, "score": 0.25}, "api_key": "[redacted]",
        "answer_chars": len("echo: hello")}}
    assert record["annotations_dropped"] == 1
    said = [e for e in logged if e["event"] == "checked the request"]
    assert said == [{"event": "checked the request", "log_level": "info", "words": 1,
                     "request_id": request_id, "plugin": "notes"}]


class Background:
    @hookimpl
    def request_end(self, ctx: RequestContext) -> None:
        async def fails() -> None:
            raise OSError("the audit sink is gone")

        async def never_ends() -> None:
            await asyncio.Event().wait()

        ctx.spawn(fails())
        ctx.spawn(never_ends())


def test_background_tasks_are_reported_and_bounded_at_shutdown(hookproxy_provider):
    with structlog.testing.capture_logs() as logged, \
            Proxy(plugins={"bg": Background()}, provider=hookproxy_provider,
                  config={"server": {"plugin_timeout": 0.5}}) as proxy:
        raw = proxy.openai().chat.completions.with_raw_response.create(
            model="gpt-fake", messages=HI)
        proxy.settled()
        wait_for(lambda: any(e["event"] == "background_task_failed" for e in logged))
    # stop() returned: the task that never ends was cancelled after its bound.
    failed = next(e for e in logged if e["event"] == "background_task_failed")
    assert failed["plugin"] == "bg" and failed["request_id"] == raw.headers["x-request-id"]
    assert "the audit sink is gone" in failed["error"]
    cancelled = next(e for e in logged if e["event"] == "background_tasks_cancelled")
    assert cancelled["count"] == 1 and cancelled["plugins"] == ["bg"]


# --- alongside the provider call ---------------------------------------------------------------


class Moderation:
    """Checks the request while the provider answers: waits until the provider has the
    request (so it provably runs beside the call), then decides."""

    def __init__(self, provider: FakeProvider, verdict: str = "allow") -> None:
        self.provider = provider
        self.verdict = verdict
        self.calls = 0

    @hookimpl
    async def alongside_call(self, ctx: RequestContext) -> None:
        self.calls += 1
        # Each request here reaches the provider once: this is its self.calls-th.
        if not await self.provider.arrived(self.calls, timeout=5):
            raise RuntimeError("the provider call did not start beside the check")
        if self.verdict == "reject":
            raise Reject(403, "The moderation service refused this request",
                         code="moderated")
        if self.verdict == "after-first-chunk":
            for _ in range(1000):
                if ctx.stream_chunks:
                    raise Reject(451, "Refused after the answer began")
                await asyncio.sleep(0.005)
        if self.verdict == "crash":
            raise ValueError("moderation bug")
        if self.verdict == "slow":
            await asyncio.sleep(30)
        ctx.annotate("verdict", "allowed")


def test_hook_alongside_call_runs_beside_the_provider_call(hookproxy, hookproxy_provider):
    hookproxy_provider.delay = 0.3  # the answer is not there before the check starts
    check = Moderation(hookproxy_provider)
    proxy = hookproxy(plugins={"moderation": check})
    assert _openai_text(proxy) == "echo: hello"
    assert _openai_text(proxy, stream=True) == "echo: hello"
    message = proxy.anthropic().messages.create(model="claude-fake", max_tokens=20,
                                                messages=HI)
    assert message.content[0].text == "echo: hello"
    with proxy.anthropic().messages.stream(model="claude-fake", max_tokens=20,
                                           messages=HI) as stream:
        assert "".join(stream.text_stream) == "echo: hello"
    assert check.calls == 4
    records = proxy.settled()
    assert all(r.annotations == {"moderation": {"verdict": "allowed"}} for r in records)
    assert all(r.status == 200 and len(r.attempts) == 1 for r in records)


def test_alongside_rejection_cancels_the_provider_call(hookproxy, hookproxy_provider):
    hookproxy_provider.delay = 10  # a long answer, which the check cuts short
    proxy = hookproxy(plugins={"moderation": Moderation(hookproxy_provider, "reject")})
    with pytest.raises(openai.PermissionDeniedError) as refused:
        proxy.openai().chat.completions.create(model="gpt-fake", messages=HI)
    assert refused.value.body["code"] == "moderated"
    with pytest.raises(anthropic.PermissionDeniedError, match="moderation service refused"):
        proxy.anthropic().messages.create(model="claude-fake", max_tokens=20, messages=HI)
    # A stream refused before its first byte: an error status, as for any request.
    with pytest.raises(openai.PermissionDeniedError):
        proxy.openai().chat.completions.create(model="gpt-fake", messages=HI, stream=True)
    with pytest.raises(anthropic.PermissionDeniedError), proxy.anthropic().messages.stream(
            model="claude-fake", max_tokens=20, messages=HI) as stream:
        list(stream.text_stream)
    # The provider saw each caller hang up, long before it would have answered.
    assert wait_for(lambda: hookproxy_provider.cancelled == 4)
    for record in proxy.settled():
        assert record.status == 403 and record.plugin_actions == {"moderation": "rejected"}
        assert record.attempts[0].error == \
            "cancelled: moderation refused the request in alongside_call"


def test_alongside_rejection_after_the_stream_began_ends_it_with_an_error(
        hookproxy, hookproxy_provider):
    hookproxy_provider.chunk_delay = 0.05  # a stream that takes a while
    proxy = hookproxy(plugins={"moderation": Moderation(hookproxy_provider,
                                                        "after-first-chunk")})
    received = []
    with pytest.raises(openai.APIError, match="Refused after the answer began"):
        for chunk in proxy.openai().chat.completions.create(model="gpt-fake", messages=HI,
                                                            stream=True):
            received.append(chunk)
    assert received  # the stream had begun; it ended with an error, never its own end
    with pytest.raises(anthropic.APIStatusError, match="Refused after the answer began"), \
            proxy.anthropic().messages.stream(model="claude-fake", max_tokens=20,
                                              messages=HI) as stream:
        for _ in stream:
            pass
    for record in proxy.settled():
        assert record.status == 451 and record.failed_at_chunk


def test_alongside_failures_and_timeouts(hookproxy, hookproxy_provider):
    proxy = hookproxy(plugins={"moderation": Moderation(hookproxy_provider, "crash")})
    with pytest.raises(openai.InternalServerError, match="'moderation' failed in "
                                                         "alongside_call: ValueError"):
        proxy.openai().chat.completions.create(model="gpt-fake", messages=HI)
    slow = {"moderation": {"timeout": 0.3}}
    proxy = hookproxy(plugins={"moderation": Moderation(hookproxy_provider, "slow")},
                      settings=slow)
    with pytest.raises(openai.APIStatusError) as timed_out:
        proxy.openai().chat.completions.create(model="gpt-fake", messages=HI)
    assert timed_out.value.status_code == 504
    # Fail-open, when the operator says so: the answer goes out without the verdict.
    slow["moderation"]["on_timeout"] = "skip"
    proxy = hookproxy(plugins={"moderation": Moderation(hookproxy_provider, "slow")},
                      settings=slow)
    assert _openai_text(proxy, stream=True) == "echo: hello"
    assert proxy.settled()[-1].plugin_actions == {"moderation": "timed_out"}


class AnswersItself:
    @hookimpl
    def request_start(self, ctx: RequestContext) -> Response:
        return Response(id="x", model=ctx.request.model, content=[TextPart(text="mine")])


def test_alongside_call_is_not_called_without_a_provider_call(hookproxy, hookproxy_provider):
    check = Moderation(hookproxy_provider)
    proxy = hookproxy(plugins={"moderation": check, "answers": AnswersItself()})
    assert _openai_text(proxy) == "mine"
    assert check.calls == 0 and hookproxy_provider.requests == []


# --- for plugin authors: the scaffold and the listing ----------------------------------------


def test_new_plugin_writes_a_package_whose_test_passes(tmp_path):
    made = subprocess.run([sys.executable, "-m", "proxy.cli", "new-plugin", "tally",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    package = tmp_path / "hookproxy-tally"
    assert '[project.entry-points."hookproxy.plugins"]\ntally = "hookproxy_tally"' in \
        (package / "pyproject.toml").read_text()
    # Installed as a user would (not editable), beside this hookproxy; then its own test.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target", str(site), str(package)],
                   check=True, capture_output=True, timeout=300)
    env = {"PYTHONPATH": str(site), "PATH": ""}
    listed = subprocess.run([sys.executable, "-m", "proxy.cli", "plugins", "--json"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["tally"]["package"] == "hookproxy-tally"
    assert plugins["tally"]["hooks"] == ["request_start", "validate_settings"]
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(package / "tests")], capture_output=True, text=True,
                            timeout=300, env=env, cwd=package)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "2 passed" in tested.stdout
    again = subprocess.run([sys.executable, "-m", "proxy.cli", "new-plugin", "tally",
                            "--dir", str(tmp_path)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "new-plugin", "Bad Name"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "cannot be a plugin name" in bad.stderr


def test_plugins_json_says_what_requests_may_do(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[providers.mock]\ntype = "mock"\n[[models]]\nname = "m"\n'
                      'provider = "mock"\n[plugins.example]\nper_request = true\n'
                      'timeout = 2.5\n[plugins.system_prompt]\ntext = "Be kind."\n'
                      'locked = true\n')
    listed = subprocess.run([sys.executable, "-m", "proxy.cli", "plugins", "--json",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    answer = json.loads(listed.stdout)
    assert answer["config"] == str(config) and answer["config_error"] is None
    plugins = {p["name"]: p for p in answer["plugins"]}
    example = plugins["example"]
    assert example["package"] == "hookproxy-example" and example["enabled"] is True
    assert example["per_request"] is True and example["timeout"] == 2.5
    assert example["request_settings"] == ["pong", "shout"]
    assert plugins["system_prompt"]["locked"] is True
    assert plugins["system_prompt"]["request_settings"] == []
    assert plugins["keyword"]["kind"] == "classifier"
    config.write_text(config.read_text() + "[plugins.nope]\n")
    broken = subprocess.run([sys.executable, "-m", "proxy.cli", "plugins", "--json",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert broken.returncode == 2
    assert "no plugin named 'nope'" in json.loads(broken.stdout)["config_error"]
