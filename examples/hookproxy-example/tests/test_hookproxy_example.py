"""The example plugin through a live hookproxy, with the official SDKs: ``proxy.testing``'s
``hookproxy`` fixture runs the proxy (with this package enabled through its entry point)
in front of a fake provider; ``Service`` stands in for the moderation service."""

from __future__ import annotations

import anthropic
import hookproxy_example
import openai
import pytest
from aiohttp import web

from proxy.testing import Proxy, Service

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def _fresh_records():
    for kept in (hookproxy_example.ERRORS, hookproxy_example.FINISHED,
                 hookproxy_example.LIFE, hookproxy_example.REPORTED):
        kept.clear()


def test_answers_ping_blocks_phrases_and_adds_a_note(hookproxy):
    proxy = hookproxy(settings={"example": {"blocked": ["launch codes"], "note": "Be brief."}})
    ping = [{"role": "user", "content": "ping"}]
    assert proxy.openai().chat.completions.create(
        model="gpt-fake", messages=ping).choices[0].message.content == "pong"
    with proxy.anthropic().messages.stream(model="claude-fake", max_tokens=20,
                                           messages=ping) as stream:
        assert "".join(stream.text_stream) == "pong"
    assert proxy.provider.requests == []  # answered by the plugin
    with pytest.raises(anthropic.PermissionDeniedError, match="launch codes"):
        proxy.anthropic().messages.create(
            model="claude-fake", max_tokens=20,
            messages=[{"role": "user", "content": "the launch codes, please"}])
    proxy.openai().chat.completions.create(model="gpt-fake", messages=HELLO)
    assert proxy.provider.last["messages"][0] == {"role": "system", "content": "Be brief."}
    # The upstream header it sets on every provider call.
    assert proxy.provider.headers[-1]["x-example-caller"] == "anonymous"


def test_quota_in_the_store_with_a_header_for_the_client(hookproxy):
    proxy = hookproxy(settings={"example": {"quota": 2}})
    raw = proxy.openai().chat.completions.with_raw_response.create(
        model="gpt-fake", messages=HELLO)
    assert raw.headers["x-example-quota-remaining"] == "1"
    with proxy.anthropic().messages.with_streaming_response.create(
            model="claude-fake", max_tokens=20, messages=HELLO, stream=True) as streamed:
        assert streamed.headers["x-example-quota-remaining"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        proxy.openai().chat.completions.create(model="gpt-fake", messages=HELLO)
    headers = refused.value.response.headers
    assert headers["x-example-quota-remaining"] == "0" and int(headers["retry-after"]) <= 60
    # What it counted is in each request's record (the dashboard's detail view shows it).
    assert [r.annotations["example"]["quota_used"] for r in proxy.settled()] == [1, 2, 3]


def _moderation(verdicts: list[str]) -> Service:
    """A moderation service that refuses prompts containing any of ``verdicts``."""
    async def check(request: web.Request) -> web.Response:
        text = (await request.json())["text"]
        refused = next((word for word in verdicts if word in text), None)
        return web.json_response({"allowed": refused is None,
                                  "reason": f"mentions {refused}" if refused else ""})

    return Service({"/check": check})


def test_moderation_runs_beside_the_provider_call(hookproxy, hookproxy_provider):
    hookproxy_provider.delay = 0.2
    with _moderation(["poison"]) as service:
        proxy = hookproxy(settings={"example": {"moderation_url": f"{service.url}/check"}})
        assert proxy.openai().chat.completions.create(
            model="gpt-fake", messages=HELLO).choices[0].message.content == "echo: hello"
        hookproxy_provider.delay = 10  # the refusal does not wait for the answer
        poison = [{"role": "user", "content": "how do I make poison"}]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            proxy.openai().chat.completions.create(model="gpt-fake", messages=poison)
        assert refused.value.body["code"] == "moderated"
        with pytest.raises(anthropic.PermissionDeniedError, match="mentions poison"), \
                proxy.anthropic().messages.stream(model="claude-fake", max_tokens=20,
                                                  messages=poison) as stream:
            list(stream.text_stream)
    first, *refusals = proxy.settled()
    assert first.annotations["example"]["moderation"] == "allowed"
    assert [r.annotations["example"]["moderation"] for r in refusals] == ["mentions poison"] * 2


def test_moderation_fails_closed_when_its_service_is_down(hookproxy):
    with _moderation([]) as service:
        url = f"{service.url}/check"
    proxy = hookproxy(settings={"example": {"moderation_url": url}})  # nothing listens
    with pytest.raises(openai.APIStatusError) as failed:
        proxy.openai().chat.completions.create(model="gpt-fake", messages=HELLO)
    assert failed.value.status_code == 503


def test_lifecycle_and_background_reports(hookproxy_provider):
    with Proxy(settings={"example": {"shout": True}}, provider=hookproxy_provider) as proxy:
        assert hookproxy_example.LIFE == [("startup", {"shout": True})]
        text = "".join(c.choices[0].delta.content or "" for c in
                       proxy.openai().chat.completions.create(
                           model="gpt-fake", messages=HELLO, stream=True) if c.choices)
        assert text == "ECHO: HELLO"
        assert proxy.reload({"example": {"shout": False}}) == []
        assert hookproxy_example.LIFE[-1] == ("reloaded", {"shout": False})
        assert proxy.anthropic().messages.create(
            model="claude-fake", max_tokens=20, messages=HELLO).content[0].text == "echo: hello"
    # After the stop: each request's report was delivered, then the plugin shut down.
    assert [r["status"] for r in hookproxy_example.REPORTED] == [200, 200]
    assert hookproxy_example.LIFE[-1] == ("shutdown", {"shout": False})
    assert len(hookproxy_example.FINISHED) == 2 and not hookproxy_example.ERRORS
