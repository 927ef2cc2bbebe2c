"""Output-side decisions, observers that never delay an answer, and the errors a plugin
author meets: through a live server with the SDKs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import structlog

from proxy import Reject, RequestContext, Response, StreamEnd, TextDelta, hookimpl
from proxy.config import ConfigError, parse_config
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, upstream_config, wait_for

HI = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def serve(upstream: Any) -> Callable[..., ProxyServer]:
    """A proxy with the given (name, plugin) pairs enabled; ``records`` collects the
    finished requests' contexts."""
    def make(*plugins: tuple[str, object], records: list[Any] | None = None,
             **settings: dict[str, Any]) -> ProxyServer:
        host = PluginHost()
        host.discover()
        for name, plugin in plugins:
            host.add(plugin, name)
        names = {name: settings.get(name, {}) for name, _ in plugins}
        return ProxyServer(upstream_config(upstream, plugins=names), host=host,
                           on_finish=None if records is None else records.append)

    return make


class RefuseAnswer:
    """Refuses any answer that mentions "hello" (an output-side policy)."""

    @hookimpl
    def post_response(self, response: Response) -> None:
        if "hello" in response.text.lower():
            raise Reject(451, "The answer is not allowed here", code="output_policy")


class CensorStream:
    """Refuses a stream as soon as a chunk says "there"."""

    @hookimpl
    def stream_chunk(self, event: Any) -> None:
        if isinstance(event, TextDelta) and "there" in event.text:
            raise Reject(451, "Stopped mid-stream by policy")


class StopEarly:
    """Ends a stream after its first text with a final event of its own."""

    @hookimpl
    def stream_chunk(self, event: Any) -> Any:
        if isinstance(event, TextDelta):
            return [event, StreamEnd(finish_reason="content_filter")]
        return None


def test_reject_in_post_response_answers_with_that_error(serve):
    records: list[Any] = []
    with serve(("refuse", RefuseAnswer()), records=records) as proxy:
        with pytest.raises(openai.APIStatusError) as caught:
            proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
        assert caught.value.status_code == 451
        assert caught.value.body["message"] == "The answer is not allowed here"
        with pytest.raises(anthropic.APIStatusError) as refused:
            proxy.anthropic().messages.create(model="claude-test", max_tokens=9, messages=HI)
        assert refused.value.status_code == 451
        # A stream: its end is held back until post_response has run, so the client gets
        # the error event instead of a normal end.
        with pytest.raises(openai.APIError, match="not allowed"):
            list(proxy.openai().chat.completions.create(model="gpt-test", messages=HI,
                                                        stream=True))
        wait_for(lambda: len(records) == 3)
    assert [r.status for r in records] == [451, 451, 451]
    assert all(r.plugin_actions["refuse"] == "rejected" for r in records)


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
def test_reject_in_stream_chunk_ends_the_stream_with_an_error_event(serve, model):
    records: list[Any] = []
    with serve(("censor", CensorStream()), records=records) as proxy:
        seen = []
        with pytest.raises(openai.APIError, match="Stopped mid-stream"):
            for chunk in proxy.openai().chat.completions.create(
                    model=model, messages=HI, stream=True):
                seen.append(chunk.choices[0].delta.content if chunk.choices else None)
        assert "there" not in "".join(s or "" for s in seen)
        with pytest.raises(anthropic.APIStatusError, match="Stopped mid-stream"), \
                proxy.anthropic().messages.stream(model=model, max_tokens=50,
                                                  messages=HI) as stream:
            "".join(stream.text_stream)
        wait_for(lambda: len(records) == 2)
    assert [r.status for r in records] == [451, 451]
    assert records[0].error.plugin == "censor"


def test_a_plugin_can_end_a_stream_early(serve):
    with serve(("stop", StopEarly())) as proxy:
        chunks = list(proxy.openai().chat.completions.create(model="gpt-test", messages=HI,
                                                             stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and
                  c.choices[0].finish_reason]
        assert text == "echo: " and finish == ["content_filter"]


class SlowObserver:
    def __init__(self) -> None:
        self.ended: list[str] = []
        self.errors: list[str] = []

    @hookimpl
    async def request_end(self, ctx: RequestContext) -> None:
        await asyncio.sleep(1.5)
        self.ended.append(ctx.request_id)

    @hookimpl
    async def on_error(self, ctx: RequestContext, error: Any) -> None:
        await asyncio.sleep(1.5)
        self.errors.append(error.message)


def test_request_end_and_on_error_never_delay_the_answer(serve):
    observer = SlowObserver()
    with serve(("slow", observer), slow={}) as proxy:
        client = proxy.openai()
        started = time.perf_counter()
        client.chat.completions.create(model="gpt-test", messages=HI)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=HI)
        list(client.chat.completions.create(model="gpt-test", messages=HI, stream=True))
        # Generous: the observers sleep 1.5 s per request, 6 s in all, after the answers.
        assert time.perf_counter() - started < 1.5
        assert wait_for(lambda: len(observer.ended) == 3, timeout=15)
        assert wait_for(lambda: observer.errors, timeout=15)
        assert "no-such-model" in observer.errors[0]


class FailingChunks:
    @hookimpl
    def stream_chunk(self, event: Any) -> None:
        raise ValueError("chunk hook bug")


class FailingStart:
    @hookimpl
    def request_start(self) -> None:
        raise KeyError("start hook bug")


def test_plugin_failures_are_explained_once(serve):
    records: list[Any] = []
    with structlog.testing.capture_logs() as logged, \
            serve(("chunky", FailingChunks()), records=records) as proxy:
        text = "".join(c.choices[0].delta.content or "" for c in
                       proxy.openai().chat.completions.create(
                           model="gpt-test", messages=HI, stream=True) if c.choices)
        assert text == "echo: hello there"  # the answer still goes out, unchanged
        wait_for(lambda: records)
        wait_for(lambda: any(e["event"] == "plugin_failed_repeatedly" for e in logged))
    # One warning with the exception (its traceback), then one line with the count: not
    # one per chunk, and no status but the one the client got.
    failed = [e for e in logged if e["event"] == "plugin_failed"]
    assert len(failed) == 1 and isinstance(failed[0]["exc_info"], ValueError)
    repeated = [e for e in logged if e["event"] == "plugin_failed_repeatedly"]
    assert repeated[0]["failures"] > 1 and repeated[0]["status"] == 200
    assert records[0].status == 200
    assert not any(e.get("status") == 500 for e in logged)

    records.clear()
    with serve(("starter", FailingStart()), records=records) as proxy, \
            pytest.raises(openai.InternalServerError, match="'starter' failed in request_start"):
        proxy.openai().chat.completions.create(model="gpt-test", messages=HI)
    wait_for(lambda: records)
    from proxy.record import build_record
    record = build_record(records[0], bodies="none")
    assert record.plugins == {"starter": "failed"}
    assert "start hook bug" in record.plugin_errors["starter"]


def _package(where: Path, dist: str, module: str, body: str) -> None:
    (where / f"{module}.py").write_text(textwrap.dedent(body))
    info = where / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[hookproxy.plugins]\nclash = {module}\n")


def test_two_packages_with_one_plugin_name_stop_check(upstream, tmp_path, monkeypatch):
    hook = """
        from proxy import hookimpl

        @hookimpl
        def request_start(ctx):
            return None
    """
    _package(tmp_path, "clash-one", "clash_one", hook)
    _package(tmp_path, "clash-two", "clash_two", hook)
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost()
    host.discover()
    with pytest.raises(ConfigError, match="clash-one, clash-two"):
        host.enable(parse_config(upstream_config(upstream), "x.toml"))
    # And from the command line, before anything is served.
    config = tmp_path / "config.toml"
    config.write_text('[providers.mock]\ntype = "mock"\n')
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": f"{tmp_path}:{Path.cwd()}", "PATH": ""})
    assert result.returncode == 2 and "clash-one, clash-two" in result.stderr


def test_a_module_with_no_hooks_is_refused(upstream, tmp_path, monkeypatch):
    _package(tmp_path, "hookless", "hookless_plugin", "X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost()
    host.discover()
    assert "no hook implementations" in (host.installed["clash"].error or "")
    with pytest.raises(ConfigError, match=r"no hook implementations.*hookless"):
        host.enable(parse_config(upstream_config(upstream), "x.toml"))
