"""One tenant never sees another's data: cache entries are per key unless sharing is
configured, and with redact on, a shared entry holds placeholders, restored for each
caller with that caller's own values. Written from the attacker's side: key B sends what
key A sent and looks for A's answer."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from proxy.plugins import PluginHost
from tests.harness import ProxyServer, upstream_config
from tests.strict_upstream import OPENAI_KEY, StrictUpstream

KEYS = {"TENANT_A_KEY": "sk-tenant-a-0123456789abcdef",
        "TENANT_B_KEY": "sk-tenant-b-0123456789abcdef"}
ALICE, BOB = "alice.private@tenant-a.com", "bob@tenant-b.org"


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


@contextmanager
def two_tenants(upstream: Any, plugins: dict[str, Any], **key_settings: Any
                ) -> Iterator[ProxyServer]:
    host = PluginHost()
    host.discover()
    config = upstream_config(upstream, plugins=plugins)
    config["auth"] = {"keys": {
        "tenant-a": {"key_env": "TENANT_A_KEY", **key_settings},
        "tenant-b": {"key_env": "TENANT_B_KEY", **key_settings}}}
    with ProxyServer(config, host=host) as proxy:
        yield proxy


def ask(proxy: ProxyServer, key: str, fmt: str, stream: bool, text: str) -> str:
    """The answer's text, as the client sees it."""
    messages = [{"role": "user", "content": text}]
    if fmt == "openai":
        client = proxy.openai(api_key=KEYS[key])
        if stream:
            chunks = client.chat.completions.create(model="gpt-test", messages=messages,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        answer = client.chat.completions.create(model="gpt-test", messages=messages)
        return answer.choices[0].message.content or ""
    client = proxy.anthropic(api_key=KEYS[key])
    if stream:
        with client.messages.stream(model="claude-test", max_tokens=50,
                                    messages=messages) as events:
            return "".join(events.text_stream)
    return client.messages.create(model="claude-test", max_tokens=50,
                                  messages=messages).content[0].text


CASES = list(itertools.product(("openai", "anthropic"), (False, True), (False, True)))


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
def test_a_key_never_gets_another_keys_cached_answer(upstream, fmt):
    with two_tenants(upstream, {"cache": {"ttl": 60}}) as proxy:
        for n, (a_stream, b_stream) in enumerate(itertools.product((False, True), repeat=2)):
            text = f"{fmt} question number {n} for the cache"
            model = "gpt-test" if fmt == "openai" else "claude-test"
            seen = upstream.count(model)
            assert ask(proxy, "TENANT_A_KEY", fmt, a_stream, text) == f"echo: {text}"
            proxy.settled(None)
            assert ask(proxy, "TENANT_A_KEY", fmt, b_stream, text) == f"echo: {text}"
            assert upstream.count(model) == seen + 1  # A's own entry
            proxy.settled(None)
            # B sends the same: the provider answers B; A's entry is not B's.
            assert ask(proxy, "TENANT_B_KEY", fmt, b_stream, text) == f"echo: {text}"
            assert upstream.count(model) == seen + 2


@pytest.mark.parametrize(("fmt", "a_stream", "b_stream"), CASES)
def test_with_redact_a_shared_entry_restores_only_the_callers_own_values(
        upstream, fmt, a_stream, b_stream):
    plugins = {"cache": {"ttl": 60, "shared": True}, "redact": {}}
    with two_tenants(upstream, plugins) as proxy:
        model = "gpt-test" if fmt == "openai" else "claude-test"
        seen = upstream.count(model)
        tail = f"({fmt}, {a_stream}, {b_stream})"
        a = ask(proxy, "TENANT_A_KEY", fmt, a_stream, f"Email me at {ALICE} {tail}")
        assert a == f"echo: Email me at {ALICE} {tail}"
        assert ALICE not in str(upstream.last)  # the provider saw a placeholder
        proxy.settled(None)
        b = ask(proxy, "TENANT_B_KEY", fmt, b_stream, f"Email me at {BOB} {tail}")
        # Shared by the operator's choice: B's masked request is A's, so it is answered
        # from the cache, with B's own address and never A's.
        assert upstream.count(model) == seen + 1
        assert b == f"echo: Email me at {BOB} {tail}"
        assert ALICE not in b


def test_keys_that_opt_into_sharing_share_and_the_others_do_not(upstream, monkeypatch):
    monkeypatch.setenv("TENANT_C_KEY", "sk-tenant-c-0123456789abcdef")
    host = PluginHost()
    host.discover()
    config = upstream_config(upstream, plugins={"cache": {}, "redact": {}})
    config["auth"] = {"keys": {
        "tenant-a": {"key_env": "TENANT_A_KEY", "share_cache": True},
        "tenant-b": {"key_env": "TENANT_B_KEY", "share_cache": True},
        "tenant-c": {"key_env": "TENANT_C_KEY"}}}
    KEYS["TENANT_C_KEY"] = "sk-tenant-c-0123456789abcdef"
    try:
        with ProxyServer(config, host=host) as proxy:
            seen = upstream.count("gpt-test")
            text = f"Write to {ALICE} about sharing"
            assert ask(proxy, "TENANT_A_KEY", "openai", True, text) == f"echo: {text}"
            proxy.settled(None)
            assert ask(proxy, "TENANT_C_KEY", "openai", False,
                       f"Write to {BOB} about sharing") == f"echo: Write to {BOB} about sharing"
            assert upstream.count("gpt-test") == seen + 2  # C does not share
            proxy.settled(None)
            assert ask(proxy, "TENANT_B_KEY", "openai", False,
                       f"Write to {BOB} about sharing") == f"echo: Write to {BOB} about sharing"
            assert upstream.count("gpt-test") == seen + 2  # B shares with A
    finally:
        del KEYS["TENANT_C_KEY"]


@pytest.mark.parametrize("endpoint", ["/v1/embeddings", "/v1/responses"])
def test_embeddings_and_responses_are_cached_per_key_too(monkeypatch, endpoint):
    monkeypatch.setenv("STRICT_UPSTREAM_OPENAI_KEY", OPENAI_KEY)
    config: dict[str, Any] = {
        "providers": {},
        "models": [{"name": "embed", "provider": "resp", "model": "text-embedding-strict"},
                   {"name": "gpt-resp", "provider": "resp", "model": "gpt-strict"}],
        "plugins": {"cache": {}, "redact": {}},
        "auth": {"keys": {"tenant-a": {"key_env": "TENANT_A_KEY"},
                          "tenant-b": {"key_env": "TENANT_B_KEY"}}}}

    def ask(proxy: ProxyServer, key: str, text: str) -> Any:
        client = proxy.openai(api_key=KEYS[key])
        if endpoint == "/v1/embeddings":
            return client.embeddings.create(model="embed", input=text).data[0].embedding
        return client.responses.create(model="gpt-resp", input=text).output_text

    with StrictUpstream() as upstream:
        config["providers"]["resp"] = upstream.provider("responses")
        with ProxyServer(config) as proxy:
            text = f"Email me at {ALICE}"
            first = ask(proxy, "TENANT_A_KEY", text)
            proxy.settled(None)
            assert ask(proxy, "TENANT_A_KEY", text) == first
            assert len(upstream.on(endpoint)) == 1  # A's own entry answered A
            # B, with the same request (and the same masked one): its own provider call.
            ask(proxy, "TENANT_B_KEY", text)
            assert len(upstream.on(endpoint)) == 2
            proxy.settled(None)
            answer = ask(proxy, "TENANT_B_KEY", f"Email me at {BOB}")
            assert len(upstream.on(endpoint)) == 2  # B's entry, with B's own originals
            if endpoint == "/v1/responses":  # the upstream echoes: each their own
                assert first == f"answered: Email me at {ALICE}"
                assert answer == f"answered: Email me at {BOB}"
        assert not upstream.rejections, [c.error for c in upstream.rejections]
