"""A key's models are judged against the target that answers, whatever led there: a route
rule, a model group, a fallback, a plugin forcing a provider, or the cache. Written from
the side of a key that tries to reach a model it was not given."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest

from proxy import RequestContext, hookimpl
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, upstream_config

KEYS = {"MOCK_ONLY_KEY": "sk-mock-only-0123456789abcdef",
        "GPT_ONLY_KEY": "sk-gpt-only-0123456789abcdef",
        "SMART_KEY": "sk-smart-0123456789abcdef",
        "ANY_KEY": "sk-any-model-0123456789abcdef"}
HI = [{"role": "user", "content": "which model answers me?"}]


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


class ForceOpenAI:
    """A plugin that sends every request to the OpenAI provider's gpt-x."""

    @hookimpl
    def pre_routing(self, ctx: RequestContext) -> None:
        if ctx.request.model == "forced":
            ctx.force_provider, ctx.force_model = "oai", "gpt-x"


@contextmanager
def serving(upstream: Any, **extra: Any) -> Iterator[ProxyServer]:
    host = PluginHost()
    host.discover()
    host.add(ForceOpenAI(), "force_openai")
    config = upstream_config(upstream, **extra)
    config["models"] += [
        {"name": "gpt-x", "provider": "oai"},
        # Named like the mock's models, served by another provider.
        {"name": "mock-smart", "provider": "oai", "model": "gpt-x"},
        {"name": "smart", "provider": "oai", "model": "gpt-x"},
        {"name": "mixed", "strategy": "fallback", "targets": [
            {"provider": "oai", "model": "gpt-status-503"},
            {"provider": "mock", "model": "mock-1"}]},
        {"name": "either", "strategy": "fallback", "targets": [
            {"provider": "oai", "model": "gpt-x"}, {"provider": "mock", "model": "mock-1"}]},
        {"name": "forced", "provider": "mock", "model": "mock-1"},
    ]
    config["routes"] = [{"model": "mock-1", "caller": "mock-only", "tags_any": [],
                         "to": "gpt-x"}] if extra.get("routes") is None else extra["routes"]
    config["plugins"] = {"force_openai": {}, **extra.get("plugins", {})}
    config["auth"] = {"keys": {
        "mock-only": {"key_env": "MOCK_ONLY_KEY", "models": ["mock-*"]},
        "gpt-only": {"key_env": "GPT_ONLY_KEY", "models": ["gpt-*"]},
        "smart": {"key_env": "SMART_KEY", "models": ["smart"]},
        "any": {"key_env": "ANY_KEY"}}}
    with ProxyServer(config, host=host) as proxy:
        yield proxy


def _client(proxy: ProxyServer, key: str) -> openai.OpenAI:
    return proxy.openai(api_key=KEYS[key])


def test_a_route_rule_never_takes_a_key_to_a_model_it_lacks(upstream):
    with serving(upstream) as proxy:
        seen = upstream.count("gpt-x")
        with pytest.raises(openai.PermissionDeniedError,
                           match="Key 'mock-only' may not use model 'gpt-x', which would "
                                 "answer 'mock-1'"):
            _client(proxy, "MOCK_ONLY_KEY").chat.completions.create(model="mock-1",
                                                                    messages=HI)
        assert upstream.count("gpt-x") == seen


def test_a_group_named_like_allowed_models_is_judged_by_its_targets(upstream):
    with serving(upstream, routes=[]) as proxy:
        client = _client(proxy, "MOCK_ONLY_KEY")
        with pytest.raises(openai.PermissionDeniedError, match="may not use model 'gpt-x'"):
            client.chat.completions.create(model="mock-smart", messages=HI)
        # A group the operator named exactly grants its own targets, and only those.
        smart = _client(proxy, "SMART_KEY")
        answer = smart.chat.completions.with_raw_response.create(model="smart", messages=HI)
        assert answer.headers["x-hookproxy-model"] == "gpt-x"
        with pytest.raises(openai.PermissionDeniedError, match="may not use model 'gpt-x'"):
            smart.chat.completions.create(model="gpt-x", messages=HI)


def test_a_fallback_never_reaches_a_target_outside_the_keys_models(upstream):
    with serving(upstream, routes=[]) as proxy:
        # gpt-only may use the group's first target, which fails; its fallback is the
        # mock, which it may not use: the failure is the answer.
        with pytest.raises(openai.APIStatusError) as caught:
            _client(proxy, "GPT_ONLY_KEY").chat.completions.create(model="mixed",
                                                                   messages=HI)
        assert caught.value.status_code == 502
        assert "Provider oai returned 503" in caught.value.message
        assert caught.value.response.headers["x-hookproxy-provider"] == "oai"
        # mock-only is answered by the group's mock target, never trying the other.
        seen = upstream.count("gpt-status-503")
        answer = _client(proxy, "MOCK_ONLY_KEY").chat.completions.with_raw_response.create(
            model="mixed", messages=HI)
        assert answer.headers["x-hookproxy-provider"] == "mock"
        assert upstream.count("gpt-status-503") == seen


def test_a_plugin_forcing_a_provider_cannot_take_a_key_outside_its_models(upstream):
    with serving(upstream, routes=[]) as proxy:
        with pytest.raises(openai.PermissionDeniedError, match="may not use model 'gpt-x'"):
            _client(proxy, "MOCK_ONLY_KEY").chat.completions.create(model="forced",
                                                                    messages=HI)
        answer = _client(proxy, "GPT_ONLY_KEY").chat.completions.with_raw_response.create(
            model="forced", messages=HI)
        assert answer.headers["x-hookproxy-model"] == "gpt-x"


def test_a_shared_cache_entry_from_another_target_is_not_served(upstream):
    with serving(upstream, routes=[], plugins={"cache": {"shared": True}}) as proxy:
        first = _client(proxy, "ANY_KEY").chat.completions.with_raw_response.create(
            model="either", messages=HI)
        assert first.headers["x-hookproxy-model"] == "gpt-x"
        proxy.settled(None)
        # The same request from a key without gpt-x: not the cached gpt-x answer.
        answer = _client(proxy, "MOCK_ONLY_KEY").chat.completions.with_raw_response.create(
            model="either", messages=HI)
        assert answer.headers["x-hookproxy-provider"] == "mock"
        assert answer.parse().choices[0].message.content != \
            first.parse().choices[0].message.content


def test_the_model_list_shows_each_key_only_the_models_it_may_use(upstream):
    with serving(upstream, routes=[]) as proxy:
        def listed(key: str) -> list[str]:
            return [m.id for m in _client(proxy, key).models.list()]

        assert listed("ANY_KEY") == ["gpt-test", "claude-test", "mock-1", "gpt-x",
                                     "mock-smart", "smart", "mixed", "either", "forced"]
        # Judged by the targets, as a request is: mock-smart is served by gpt-x; a
        # fallback group is listed to a key that may use one of its targets.
        assert listed("MOCK_ONLY_KEY") == ["mock-1", "mixed", "either", "forced"]
        assert listed("GPT_ONLY_KEY") == ["gpt-test", "gpt-x", "mock-smart", "smart",
                                          "mixed", "either"]
        assert listed("SMART_KEY") == ["smart"]
        # Anthropic's format and SDK, the same list.
        mock_only = proxy.anthropic(api_key=KEYS["MOCK_ONLY_KEY"])
        assert [m.id for m in mock_only.models.list()] == ["mock-1", "mixed", "either",
                                                           "forced"]
        assert mock_only.models.retrieve("mixed").id == "mixed"
        # One model: a model the key may not use does not exist, for that key.
        assert _client(proxy, "MOCK_ONLY_KEY").models.retrieve("mock-1").id == "mock-1"
        with pytest.raises(openai.NotFoundError, match="may not use it"):
            _client(proxy, "MOCK_ONLY_KEY").models.retrieve("gpt-x")
        assert _client(proxy, "GPT_ONLY_KEY").models.retrieve("gpt-x").id == "gpt-x"
        with pytest.raises(openai.NotFoundError) as caught:
            _client(proxy, "GPT_ONLY_KEY").models.retrieve("no-such-model")
        assert "may not use" not in caught.value.message
        # Without a key, or with a wrong one, as on every API endpoint.
        with pytest.raises(openai.AuthenticationError, match="Invalid API key"):
            proxy.openai(api_key="sk-wrong").models.list()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{proxy.url}/v1/models/mock-1", timeout=10)
        assert missing.value.code == 401
        assert "Missing API key" in json.loads(missing.value.read())["error"]["message"]
