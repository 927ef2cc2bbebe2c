"""The OpenAI Responses API through hookproxy, with the official openai SDK as the client
(``responses.create``, ``.stream``, ``.retrieve``, ``.delete``), served by the mock, by a
Chat Completions provider, by an Anthropic provider (both translated) and by a provider
that has the Responses API (passed through), all on the strict fake upstream."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy import Reject, RequestContext, TextDelta, TextPart, hookimpl
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, wait_for
from tests.strict_upstream import ANTHROPIC_KEY, OPENAI_KEY, Call, StrictUpstream, sign

WEATHER = [{"type": "function", "name": "get_weather", "description": "The weather.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}]
# client model -> (provider, what that provider's upstream path is)
SERVED = {"gpt-chat": "/v1/chat/completions", "claude": "/v1/messages",
          "gpt-resp": "/v1/responses"}


def gateway_config(upstream: StrictUpstream, log: Path | None = None,
                   **extra: Any) -> dict[str, Any]:
    return {
        "providers": {"oai": upstream.provider("openai"),
                      "ant": upstream.provider("anthropic"),
                      "resp": upstream.provider("responses"),
                      "mock": {"type": "mock"}},
        "models": [{"name": "gpt-chat", "provider": "oai", "model": "gpt-strict"},
                   {"name": "claude", "provider": "ant", "model": "claude-strict"},
                   {"name": "gpt-resp", "provider": "resp", "model": "gpt-strict"},
                   {"name": "mock-1", "provider": "mock"}],
        "log": {"path": str(log) if log else ""},
        "routing": {"retries": 0, "cooldown_failures": 1000},
        **extra,
    }


@pytest.fixture(scope="module")
def keys() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STRICT_UPSTREAM_ANTHROPIC_KEY", ANTHROPIC_KEY)
        patch.setenv("STRICT_UPSTREAM_OPENAI_KEY", OPENAI_KEY)
        yield


@pytest.fixture(scope="module")
def served(keys: None, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[StrictUpstream, ProxyServer, Path]]:
    log = tmp_path_factory.mktemp("responses") / "requests.jsonl"
    with StrictUpstream(tool_calls=[("get_weather", {"city": "Paris"})]) as upstream, \
            ProxyServer(gateway_config(upstream, log)) as proxy:
        yield upstream, proxy, log


@pytest.fixture
def upstream(served: tuple[StrictUpstream, ProxyServer, Path]) -> Iterator[StrictUpstream]:
    served[0].calls.clear()
    yield served[0]
    assert not served[0].rejections, [(c.path, c.error) for c in served[0].rejections]


@pytest.fixture
def client(served: tuple[StrictUpstream, ProxyServer, Path]) -> openai.OpenAI:
    return served[1].openai(api_key="client-key")


def last(upstream: StrictUpstream, model: str) -> Call:
    return upstream.on(SERVED[model])[-1]


# --- text, each way ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mock-1", *SERVED])
def test_text_answer(upstream: StrictUpstream, client: openai.OpenAI, model: str) -> None:
    raw = client.responses.with_raw_response.create(model=model, input="hello there",
                                                    instructions="Be brief.")
    assert raw.headers["x-hookproxy-model"] == ("mock-1" if model == "mock-1"
                                                else "gpt-strict" if model != "claude"
                                                else "claude-strict")
    response = raw.parse()
    assert response.status == "completed"
    assert response.output_text == ("Mock answer from mock-1. You said: hello there"
                                    if model == "mock-1" else "answered: hello there")
    assert response.id.startswith("resp_") and response.usage is not None
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    if model == "gpt-chat":
        assert last(upstream, model).body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there"}]
    elif model == "claude":
        sent = last(upstream, model).body
        assert sent["system"] == "Be brief." and sent["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    elif model == "gpt-resp":
        # As the client sent it, but for the provider's model name.
        assert last(upstream, model).body == {"model": "gpt-strict", "input": "hello there",
                                              "instructions": "Be brief."}


@pytest.mark.parametrize("model", ["mock-1", *SERVED])
def test_stream_is_the_typed_event_sequence(upstream: StrictUpstream, client: openai.OpenAI,
                                            model: str) -> None:
    with client.responses.stream(model=model, input="stream it") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    expected = "Mock answer from mock-1. You said: stream it" if model == "mock-1" \
        else "answered: stream it"
    assert final.output_text == expected
    deltas = [k for k in kinds if k == "response.output_text.delta"]
    assert deltas
    assert [k for k in kinds if k != "response.output_text.delta"] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert final.usage is not None and final.usage.output_tokens > 0


def test_passthrough_to_a_responses_provider_is_byte_for_byte(upstream: StrictUpstream,
                                                               served: Any) -> None:
    """Fields hookproxy does not model reach the provider; its answer and its stream reach
    the client as they were sent."""
    proxy = served[1]
    body = {"model": "gpt-resp", "input": [{"role": "user", "content": "hello"}],
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k1",
            "store": False, "metadata": {"team": "a"}, "text": {"verbosity": "low"}}
    answer = _post(proxy.url, body)
    sent = last(upstream, "gpt-resp")
    assert sent.body == {**body, "model": "gpt-strict"}
    assert answer == json.dumps(sent.answer).encode()
    streamed = _post(proxy.url, {**body, "stream": True})
    events = last(upstream, "gpt-resp").events
    assert streamed == b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                                for e in events)


def _post(base: str, body: dict[str, Any], key: str = "client-key") -> bytes:
    request = urllib.request.Request(f"{base}/v1/responses", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json",
                                              "authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


# --- tools, continued conversations -----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_tool_loop_continues_on_another_provider(upstream: StrictUpstream,
                                                 client: openai.OpenAI, stream: bool) -> None:
    """The call comes from the Anthropic provider, its result goes to the Chat
    Completions provider by ``previous_response_id``: hookproxy sends the conversation."""
    first = _create(client, stream, model="claude", input="weather in Paris?",
                    tools=WEATHER)
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    second = _create(client, stream, model="gpt-chat", previous_response_id=first.id,
                     tools=WEATHER, input=[{"type": "function_call_output",
                                            "call_id": call.call_id, "output": "18C"}])
    assert second.output_text == "tool said: 18C"
    assert second.previous_response_id == first.id
    messages = last(upstream, "gpt-chat").body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == messages[2]["tool_call_id"] == call.call_id
    # And a third turn on the Responses provider, with the whole conversation.
    third = _create(client, stream, model="gpt-resp", previous_response_id=second.id,
                    input="thanks")
    assert third.output_text == "answered: thanks"
    items = last(upstream, "gpt-resp").body["input"]
    assert [i.get("type", "message") for i in items] == [
        "message", "function_call", "function_call_output", "message", "message"]


def _create(client: openai.OpenAI, stream: bool, **arguments: Any) -> Any:
    if not stream:
        return client.responses.create(**arguments)
    with client.responses.stream(**arguments) as events:
        for _ in events:
            pass
        return events.get_final_response()


@pytest.mark.parametrize("model", ["claude", "gpt-resp"])
def test_reasoning_goes_back_as_it_came(upstream: StrictUpstream, client: openai.OpenAI,
                                        model: str) -> None:
    """Reasoning (Anthropic's signed thinking, or the Responses provider's encrypted
    reasoning) comes back as a reasoning item and, sent back in the next turn's input, is
    accepted by the provider that issued it."""
    first = client.responses.create(model=model, input="weather?", tools=WEATHER,
                                    reasoning={"effort": "low"}, store=False)
    reasoning, call = first.output[0], first.output[-1]
    assert reasoning.type == "reasoning" and call.type == "function_call"
    text = reasoning.summary[0].text
    assert reasoning.encrypted_content == sign(text)
    history = [{"role": "user", "content": "weather?"},
               *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}]
    second = client.responses.create(model=model, input=history, tools=WEATHER,
                                     reasoning={"effort": "low"}, store=False)
    assert second.output_text == "tool said: 18C"
    if model == "claude":
        sent = last(upstream, model).body
        assert sent["thinking"]["type"] == "enabled"
        assert sent["messages"][1]["content"][0] == {"type": "thinking", "thinking": text,
                                                     "signature": sign(text)}


def test_json_schema_and_effort_translate(upstream: StrictUpstream,
                                          client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    text_format: Any = {"format": {"type": "json_schema", "name": "thing", "schema": schema,
                                   "strict": True}}
    client.responses.create(model="gpt-chat", input="json please", text=text_format,
                            reasoning={"effort": "medium"}, max_output_tokens=500)
    sent = last(upstream, "gpt-chat").body
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "thing", "schema": schema, "strict": True}}
    assert sent["reasoning_effort"] == "medium" and sent["max_tokens"] == 500
    client.responses.create(model="claude", input="think", reasoning={"effort": "low"},
                            max_output_tokens=4000)
    assert last(upstream, "claude").body["thinking"] == {"type": "enabled",
                                                         "budget_tokens": 2048}


def test_built_in_tools_reach_a_responses_provider_only(upstream: StrictUpstream,
                                                        client: openai.OpenAI) -> None:
    tools: Any = [{"type": "web_search"}]
    answer = client.responses.create(model="gpt-resp", input="search the news",
                                     tools=tools)
    assert [item.type for item in answer.output] == ["web_search_call", "message"]
    with client.responses.stream(model="gpt-resp", input="search the news",
                                 tools=tools) as stream:
        kinds = [event.type for event in stream]
        assert "response.web_search_call.searching" in kinds
        assert stream.get_final_response().output[0].type == "web_search_call"
    for model in ("gpt-chat", "claude", "mock-1"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=model, input="search the news", tools=tools)
        error: Any = refused.value.body
        assert error["code"] == "untranslatable"
        assert "Built-in tool 'web_search'" in error["message"]
    # The searched turn continues on the Responses provider, its search call included.
    follow = client.responses.create(model="gpt-resp", previous_response_id=answer.id,
                                     input="and more")
    assert follow.output_text == "answered: and more"
    assert last(upstream, "gpt-resp").body["input"][1]["type"] == "web_search_call"


# --- stored responses -------------------------------------------------------------------


def test_retrieve_and_delete(upstream: StrictUpstream, client: openai.OpenAI) -> None:
    created = client.responses.create(model="claude", input="keep me")
    assert client.responses.retrieve(created.id).model_dump() == created.model_dump()
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    unkept = client.responses.create(model="claude", input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_only_the_same_key_reaches_a_stored_response(upstream: StrictUpstream,
                                                     served: Any) -> None:
    proxy = served[1]
    owner, other = proxy.openai(api_key="key-of-a"), proxy.openai(api_key="key-of-b")
    created = owner.responses.create(model="gpt-chat", input="secret plans")
    for attempt in (lambda: other.responses.retrieve(created.id),
                    lambda: other.responses.delete(created.id),
                    lambda: other.responses.create(model="gpt-chat", input="go on",
                                                   previous_response_id=created.id)):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert "secret" not in str(refused.value.body)
    calls = len(upstream.calls)
    assert owner.responses.retrieve(created.id).output_text == "answered: secret plans"
    continued = owner.responses.create(model="gpt-chat", input="go on",
                                       previous_response_id=created.id)
    assert continued.output_text == "answered: go on"
    assert len(upstream.calls) == calls + 1


def test_keys_are_needed_when_configured(keys: None, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_KEY", "sk-team-secret-1234567890")
    with StrictUpstream() as upstream, ProxyServer(gateway_config(upstream, auth={
            "keys": {"team": {"key_env": "TEAM_KEY"}}})) as proxy:
        with pytest.raises(openai.AuthenticationError):
            proxy.openai(api_key="wrong").responses.create(model="claude", input="hi")
        client = proxy.openai(api_key="sk-team-secret-1234567890")
        created = client.responses.create(model="claude", input="hi")
        with pytest.raises(openai.AuthenticationError):
            proxy.openai(api_key="wrong").responses.retrieve(created.id)
        request = urllib.request.Request(f"{proxy.url}/v1/responses/{created.id}")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(request, timeout=10)
        assert missing.value.code == 401
        assert json.loads(missing.value.read())["error"]["code"] == "missing_api_key"
        assert client.responses.retrieve(created.id).id == created.id


def test_unknown_previous_response_is_a_404(upstream: StrictUpstream,
                                            client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.responses.create(model="gpt-chat", input="hi",
                                previous_response_id="resp_does_not_exist")
    error: Any = refused.value.body
    assert error["code"] == "previous_response_not_found"
    assert not upstream.calls


# --- records ----------------------------------------------------------------------------


def test_records_name_the_endpoint(upstream: StrictUpstream, served: Any) -> None:
    _, proxy, log = served
    client = proxy.openai(api_key="client-key")
    created = client.responses.create(model="claude", input="recorded")
    client.responses.retrieve(created.id)

    def records() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []

    wait_for(lambda: any(r["endpoint"] == f"/v1/responses/{created.id}" for r in records()))
    found = records()
    post = next(r for r in found if r["endpoint"] == "/v1/responses"
                and r.get("provider") == "ant" and r["status"] == 200)
    assert post["format"] == "responses" and post["input_tokens"] > 0
    get = next(r for r in found if r["endpoint"] == f"/v1/responses/{created.id}")
    assert get["status"] == 200 and get["model"] == created.model


# --- plugins ----------------------------------------------------------------------------


class Shouter:
    """Sees a Responses request as a chat request: instructions as system text, input as
    messages; changes it, and upper-cases what streams back."""

    seen: list[str] = []

    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        Shouter.seen = [ctx.endpoint, ctx.request.system_text,
                        *(m.text for m in ctx.request.messages)]
        if "forbidden" in ctx.request.prompt_text():
            raise Reject(403, "Not here.")
        ctx.request.messages[-1].content.append(TextPart(text=" (checked)"))

    @hookimpl
    def stream_chunk(self, event: Any) -> Any:
        if isinstance(event, TextDelta):
            return TextDelta(index=event.index, text=event.text.upper())
        return None


@pytest.fixture
def plugged(keys: None) -> Iterator[tuple[StrictUpstream, ProxyServer]]:
    host = PluginHost()
    host.discover()
    host.add(Shouter(), "shouter", "plugin")
    with StrictUpstream() as upstream, ProxyServer(gateway_config(
            upstream, plugins={"shouter": {}, "redact": {}}), host=host) as proxy:
        yield upstream, proxy


@pytest.mark.parametrize("model", ["gpt-chat", "gpt-resp", "mock-1"])
def test_plugins_see_change_and_stream_a_responses_request(
        plugged: tuple[StrictUpstream, ProxyServer], model: str) -> None:
    upstream, proxy = plugged
    client = proxy.openai(api_key="client-key")
    answer = client.responses.create(model=model, input="mail bob@example.com",
                                     instructions="Be kind.")
    assert Shouter.seen == ["/v1/responses", "Be kind.", "mail bob@example.com"]
    if model != "mock-1":
        sent = json.dumps(upstream.calls[-1].body)
        assert "[EMAIL_1]" in sent and "bob@example.com" not in sent and "(checked)" in sent
        assert answer.output_text == "answered: mail bob@example.com (checked)"
    with client.responses.stream(model=model, input="mail bob@example.com") as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    # The stream_chunk plugin upper-cased the deltas, then redact restored the address in
    # them; the done events and the final response say what the deltas said.
    assert "MAIL bob@example.com (CHECKED)" in deltas and "[EMAIL_1]" not in deltas
    assert final.output_text == deltas
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model=model, input="forbidden words")


@pytest.mark.parametrize("model", ["oai/gpt-test-cut", "ant/claude-test-cut"])
def test_a_stream_that_breaks_ends_with_error_and_failed(model: str) -> None:
    from tests.harness import upstream_config
    from tests.upstreams import FakeUpstream

    fake = FakeUpstream().start()
    try:
        with ProxyServer(upstream_config(fake)) as proxy:
            events = list(proxy.openai().responses.create(model=model, input="hello",
                                                          stream=True))
    finally:
        fake.stop()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and "response.completed" not in kinds
    assert kinds[-2:] == ["error", "response.failed"]
    failed: Any = events[-1]
    assert failed.response.status == "failed" and failed.response.id == events[0].response.id
    assert failed.response.error.code == "upstream_cut"
