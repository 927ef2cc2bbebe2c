"""The operator decides what a request may switch on or change, tried from the client's
side: every override a client should not be able to make, on both endpoints, streaming
and not, is refused with a 403 in the client's format, and the operator's plugins keep
doing their work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from proxy.plugins import PluginHost
from tests.harness import ProxyServer, upstream_config

PLUGINS: dict[str, Any] = {
    "system_prompt": {"text": "OPERATOR PROMPT"},
    "param_limits": {"max_tokens": 50},
    "content_guard": {"patterns": ["(?i)forbidden"]},
    "example": {"enabled": False, "locked": True},
}
CLASSIFIERS: dict[str, Any] = {"keyword": {"tags": {"vip": ["platinum"]}}}
ROUTES = [{"tags_any": ["vip"], "to": "claude-test"}]


def _serve(upstream: Any, plugins: dict[str, Any] | None = None,
           classifiers: dict[str, Any] | None = None,
           routes: list[dict[str, Any]] | None = None) -> ProxyServer:
    host = PluginHost()
    host.discover()
    return ProxyServer(upstream_config(upstream, plugins=plugins or PLUGINS,
                                       classifiers=classifiers or CLASSIFIERS,
                                       routes=routes or ROUTES), host=host)


@pytest.fixture(scope="module")
def proxy(upstream: Any) -> Iterator[ProxyServer]:
    with _serve(upstream) as server:
        yield server


def _ask(proxy: ProxyServer, client_format: str, stream: bool, field: dict[str, Any],
         text: str = "hello") -> str:
    """One request with ``field`` as its `hookproxy` field; the answer's text."""
    messages = [{"role": "user", "content": text}]
    if client_format == "openai":
        result = proxy.openai().chat.completions.create(
            model="gpt-test", messages=messages, stream=stream, max_tokens=1000,
            extra_body={"hookproxy": field})
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in result if c.choices)
        return str(result.choices[0].message.content)
    result = proxy.anthropic().messages.create(
        model="gpt-test", max_tokens=1000, messages=messages, stream=stream,
        extra_body={"hookproxy": field})
    if stream:
        return "".join(e.delta.text for e in result
                       if e.type == "content_block_delta" and e.delta.type == "text_delta")
    return str(result.content[0].text)


WEAKENINGS = {
    "guard_switched_off": {"plugins": {"content_guard": {"patterns": []}}},
    "cap_lifted": {"plugins": {"param_limits": {"max_tokens": 1_000_000_000}}},
    "prompt_replaced": {"plugins": {"system_prompt": {"mode": "replace", "text": ""}}},
    "plugin_never_enabled": {"plugins": {"json_repair": True}},
    "disabled_and_locked": {"plugins": {"example": {"shout": True}}},
    "disabled_and_locked_true": {"plugins": {"example": True}},
    "own_tag_table": {"classifiers": {"keyword": {"tags": {"vip": ["hello"]}}}},
    "classifier_never_enabled": {"classifiers": {"code": True}},
}
FORMATS = [("openai", False), ("openai", True), ("anthropic", False), ("anthropic", True)]


@pytest.mark.parametrize(("client_format", "stream"), FORMATS)
@pytest.mark.parametrize("attack", list(WEAKENINGS))
def test_a_request_cannot_weaken_what_the_operator_configured(proxy, upstream, client_format,
                                                              stream, attack):
    before = len(upstream.received)
    error = openai.PermissionDeniedError if client_format == "openai" else \
        anthropic.PermissionDeniedError
    with pytest.raises(error, match="Not allowed"):
        _ask(proxy, client_format, stream, WEAKENINGS[attack])
    assert len(upstream.received) == before  # the provider never saw it


@pytest.mark.parametrize(("client_format", "stream"), FORMATS)
def test_the_operators_plugins_still_apply(proxy, upstream, client_format, stream):
    with pytest.raises(openai.BadRequestError if client_format == "openai"
                       else anthropic.BadRequestError):
        _ask(proxy, client_format, stream, {}, text="something forbidden")
    _ask(proxy, client_format, stream, {})
    sent = upstream.last
    assert sent["max_tokens"] == 50
    system = sent["messages"][0]["content"] if client_format == "openai" else sent
    assert "OPERATOR PROMPT" in str(system)


def test_true_is_validated_like_a_table(upstream):
    plugins = {**PLUGINS, "content_guard": {"enabled": False, "per_request": True}}
    # content_guard needs `patterns`: switched on with `true`, that is a 400, not a 500.
    with _serve(upstream, plugins) as proxy, \
            pytest.raises(openai.BadRequestError, match="patterns"):
        _ask(proxy, "openai", False, {"plugins": {"content_guard": True}})


def test_per_request_and_client_settings_are_the_operators_to_give(upstream):
    plugins = {**PLUGINS, "example": {"enabled": False, "per_request": True},
               "param_limits": {"max_tokens": 50, "client_settings": ["max_tokens"]}}
    with _serve(upstream, plugins) as proxy:
        # Switched on per request, with a setting the plugin marks client-adjustable.
        assert _ask(proxy, "openai", False, {"plugins": {"example": {"shout": True}}}) == \
            "ECHO: HELLO"
        # A setting it does not mark stays the operator's.
        with pytest.raises(openai.PermissionDeniedError, match="`blocked`"):
            _ask(proxy, "openai", False, {"plugins": {"example": {"blocked": []}}})
        # The operator opened param_limits.max_tokens to requests.
        _ask(proxy, "openai", False, {"plugins": {"param_limits": {"max_tokens": 77}}})
        assert upstream.last["max_tokens"] == 77


@pytest.mark.parametrize("allow", [False, True])
def test_client_tags_reach_route_rules_only_where_allowed(upstream, allow):
    classifiers = {"keyword": {"tags": {"vip": ["platinum"]}, "client_settings": ["tags"]}}
    routes = [{"tags_any": ["vip"], "to": "claude-test", "allow_client_tags": allow}]
    with _serve(upstream, classifiers=classifiers, routes=routes) as proxy:
        field = {"classifiers": {"keyword": {"tags": {"vip": ["hello"]}}}}
        raw = proxy.openai().chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}],
            extra_body={"hookproxy": field})
        assert raw.headers["x-hookproxy-tags"] == "vip"
        assert raw.headers["x-hookproxy-model"] == ("claude-test" if allow else "gpt-test")
        # The operator's own table still routes, whatever the rule says.
        raw = proxy.openai().chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "platinum please"}])
        assert raw.headers["x-hookproxy-model"] == "claude-test"
