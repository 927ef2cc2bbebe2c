"""POST /v1/embeddings through hookproxy with the openai SDK's ``embeddings.create``:
the mock, the strict OpenAI upstream, routing (fallback past a provider without
embeddings, retries), plugins (reject, redact, cache), cost, the record and /metrics; and
GET /v1/models/{id}."""

from __future__ import annotations

import base64
import json
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from proxy import Reject, RequestContext, hookimpl
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, ServedApp, post_raw, wait_for
from tests.strict_upstream import ANTHROPIC_KEY, OPENAI_KEY, StrictUpstream, unit_vector_of


@pytest.fixture(autouse=True)
def upstream_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRICT_UPSTREAM_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("STRICT_UPSTREAM_OPENAI_KEY", OPENAI_KEY)


def config(upstream: StrictUpstream, log: Path | None = None, **extra: Any
           ) -> dict[str, Any]:
    return {
        "providers": {"oai": upstream.provider("openai"), "ant": upstream.provider("anthropic"),
                      "mock": {"type": "mock"}},
        "models": [
            {"name": "embed", "provider": "oai", "model": "text-embedding-strict",
             "input_price": 1000.0},
            # A group whose first target has no embeddings: the next one answers.
            {"name": "embed-fallback", "strategy": "fallback", "targets": [
                {"provider": "ant", "model": "claude-strict"},
                {"provider": "oai", "model": "text-embedding-strict"}]},
            {"name": "claude", "provider": "ant", "model": "claude-strict"},
            {"name": "mock-1", "provider": "mock"}],
        "log": {"path": str(log) if log else ""},
        "routing": {"retries": 0, "cooldown_failures": 1000},
        **extra,
    }


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[StrictUpstream, ProxyServer, Path]]:
    log = tmp_path / "requests.jsonl"
    with StrictUpstream() as upstream, ProxyServer(config(upstream, log)) as proxy:
        yield upstream, proxy, log
        assert not upstream.rejections, [c.error for c in upstream.rejections]


def records(log: Path, count: int) -> list[dict[str, Any]]:
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= count)
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_mock_embeds_strings_and_token_arrays(served: Any) -> None:
    client = served[1].openai()
    one = client.embeddings.create(model="mock-1", input="hello")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8
    assert abs(sum(v * v for v in one.data[0].embedding) - 1) < 1e-3
    many = client.embeddings.create(model="mock-1", input=["hello", "world"])
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == one.data[0].embedding != many.data[1].embedding
    tokens = client.embeddings.create(model="mock-1", input=[[1, 2, 3], [4, 5]])
    assert len(tokens.data) == 2 and tokens.usage.prompt_tokens == 5
    packed = client.embeddings.create(model="mock-1", input="hello", dimensions=4,
                                      encoding_format="base64")
    raw: Any = packed.data[0].embedding
    vector = struct.unpack("<4f", base64.b64decode(raw))
    assert len(vector) == 4 and abs(sum(v * v for v in vector) - 1) < 1e-3


def test_the_mocks_answer_is_bounded(served: Any) -> None:
    _, proxy, log = served
    client = proxy.openai()
    # At the cap: one unit vector per input, the same in floats as in base64, and another
    # for another text.
    floats = client.embeddings.create(model="mock-1", input=["same", "other"] * 32,
                                      dimensions=4096, encoding_format="float")
    packed = client.embeddings.create(model="mock-1", input="same", dimensions=4096)
    vector = floats.data[0].embedding
    assert len(floats.data) == 64 and len(vector) == 4096
    assert abs(sum(v * v for v in vector) - 1) < 1e-6
    assert vector == floats.data[2].embedding == packed.data[0].embedding
    assert vector != floats.data[1].embedding
    # Past it (a 5 KB request asking for 38 MB of floats), or past the dimensions the mock
    # makes: a 400 in OpenAI's format naming the limit.
    for inputs, dimensions, named in ((["a"] * 1000, 4096, "at most 262,144 embedding values"),
                                      (["a"] * 65, 4096, "65 x 4,096 = 266,240"),
                                      ("a", 4097, "`dimensions` must be a whole number"),
                                      ("a", 0, "from 1 to 4,096")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="mock-1", input=inputs, dimensions=dimensions)
        error: Any = refused.value.body
        assert error["type"] == "invalid_request_error" and named in error["message"]
    found = records(log, 6)[-1]
    assert found["status"] == 400 and found["provider"] == "mock"
    assert [a["status"] for a in found["attempts"]] == [400]


def test_an_openai_provider_gets_the_request_as_sent(served: Any) -> None:
    upstream, proxy, log = served
    client = proxy.openai()
    answer = client.embeddings.create(model="embed", input=["alpha", "beta"], dimensions=3,
                                      user="u-1")
    call = upstream.on("/v1/embeddings")[-1]
    assert call.body == {"model": "text-embedding-strict", "input": ["alpha", "beta"],
                         "dimensions": 3, "user": "u-1", "encoding_format": "base64"}
    # The SDK asked for base64 and decoded it: the vectors are the upstream's.
    assert [round(v, 4) for v in answer.data[1].embedding] == unit_vector_of("beta", 3)
    status, _, body = post_raw(f"{proxy.url}/v1/embeddings", json.dumps(
        {"model": "embed", "input": [[7, 8, 9]]}).encode())
    assert status == 200 and body == upstream.on("/v1/embeddings")[-1].answer
    found = records(log, 2)
    assert {r["endpoint"] for r in found} == {"/v1/embeddings"}
    first = found[0]
    assert first["format"] == "openai" and first["provider"] == "oai"
    assert first["input_tokens"] == 2 and first["cost"] == pytest.approx(2 * 1000.0 / 1e6)


def test_routing_moves_past_a_provider_without_embeddings(served: Any) -> None:
    upstream, proxy, _ = served
    client = proxy.openai()
    raw = client.embeddings.with_raw_response.create(model="embed-fallback", input="x")
    assert raw.headers["x-hookproxy-provider"] == "oai"
    assert raw.headers["x-hookproxy-attempts"] == "2"
    assert not upstream.on("/v1/messages")
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="claude", input="x")
    error: Any = refused.value.body
    assert error["code"] == "untranslatable" and "embeddings" in error["message"]
    assert "(provider ant)" in error["message"]


def test_retries_and_a_provider_error_in_the_openai_format(tmp_path: Path) -> None:
    answered: list[int] = []

    async def flaky(request: web.Request) -> web.Response:
        answered.append(1)
        if len(answered) == 1:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        body = await request.json()
        if body["model"] == "bad":
            return web.json_response({"error": {"message": "no such model",
                                                "type": "invalid_request_error"}}, status=404)
        return web.json_response({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5, 0.5]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    with ServedApp({"/v1/embeddings": flaky}) as app, ProxyServer({
            "providers": {"flaky": {"type": "openai", "base_url": f"{app.url}/v1"}},
            "models": [{"name": "e", "provider": "flaky"},
                       {"name": "bad", "provider": "flaky"}],
            "routing": {"retries": 2, "backoff": 0.01}, "log": {"path": ""}}) as proxy:
        raw = proxy.openai().embeddings.with_raw_response.create(model="e", input="x")
        assert raw.parse().data[0].embedding == [0.5, 0.5]
        assert raw.headers["x-hookproxy-attempts"] == "2"
        with pytest.raises(openai.NotFoundError) as missing:
            proxy.openai().embeddings.create(model="bad", input="x")
        assert "no such model" in str(missing.value)


def test_bad_input_is_a_400_naming_it(served: Any) -> None:
    proxy = served[1]
    for body, named in (({"model": "embed"}, "$.input"), ({"model": "embed", "input": []},
                                                          "$.input"),
                        ({"model": "embed", "input": ["ok", {"x": 1}]}, "$.input[1]"),
                        ({"input": "x"}, "`model`")):
        status, _, error = post_raw(f"{proxy.url}/v1/embeddings", json.dumps(body).encode())
        assert status == 400 and named in error["error"]["message"]


class Guard:
    seen: list[str] = []

    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        Guard.seen = [ctx.endpoint, *(m.text for m in ctx.request.messages)]
        if "forbidden" in ctx.request.prompt_text():
            raise Reject(403, "Not here.")


def test_plugins_see_reject_redact_and_cache_embeddings(tmp_path: Path) -> None:
    host = PluginHost()
    host.discover()
    host.add(Guard(), "guard", "plugin")
    with StrictUpstream() as upstream, ProxyServer(config(
            upstream, plugins={"guard": {}, "redact": {"restore": False}, "cache": {}}),
            host=host) as proxy:
        client = proxy.openai()
        first = client.embeddings.create(model="embed", input=["mail bob@example.com", "hi"])
        assert Guard.seen == ["/v1/embeddings", "mail bob@example.com", "hi"]
        assert upstream.on("/v1/embeddings")[-1].body["input"] == ["mail [EMAIL_1]", "hi"]
        again = client.embeddings.with_raw_response.create(
            model="embed", input=["mail bob@example.com", "hi"])
        assert len(upstream.on("/v1/embeddings")) == 1  # the cache answered
        assert again.headers["x-hookproxy-provider"] == "plugin"
        assert again.parse().data[0].embedding == first.data[0].embedding
        with pytest.raises(openai.PermissionDeniedError):
            client.embeddings.create(model="embed", input="forbidden words")
        assert not upstream.rejections


def test_metrics_count_each_endpoint(served: Any) -> None:
    _, proxy, _ = served
    client = proxy.openai()
    client.embeddings.create(model="embed", input="x")
    client.responses.create(model="mock-1", input="x")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")
    proxy.settled(None)

    def scrape() -> str:
        with urllib.request.urlopen(f"{proxy.url}/metrics", timeout=10) as response:
            return str(response.read().decode())

    text = wait_for(lambda: next((t for t in [scrape()] if "/v1/responses/{id}" in t), ""))
    assert 'hookproxy_endpoint_requests_total{endpoint="/v1/embeddings",status="200"} 1.0' \
        in text
    assert 'hookproxy_endpoint_requests_total{endpoint="/v1/responses",status="200"} 1.0' \
        in text
    assert ('hookproxy_endpoint_requests_total{endpoint="/v1/responses/{id}",status="404"} '
            '1.0') in text
    assert 'hookproxy_tokens_total{direction="input",model="embed",provider="oai"} 1.0' \
        in text


# --- GET /v1/models/{id} ----------------------------------------------------------------


def test_one_model_in_either_format(served: Any) -> None:
    proxy = served[1]
    model = proxy.openai().models.retrieve("embed")
    assert (model.id, model.owned_by) == ("embed", "oai")
    assert proxy.anthropic().models.retrieve("claude").id == "claude"
    with pytest.raises(openai.NotFoundError) as missing:
        proxy.openai().models.retrieve("no-such-model")
    error: Any = missing.value.body
    assert error["code"] == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as missing_anthropic:
        proxy.anthropic().models.retrieve("no-such-model")
    assert missing_anthropic.value.body["type"] == "error"  # type: ignore[index]
