"""Bad input gets a clear 4xx in the client's own error format, never a 500."""

from __future__ import annotations

import pytest

from tests.harness import post_raw

OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"


def _message(endpoint: str, body: dict) -> str:
    if endpoint == ANTHROPIC:
        assert body["type"] == "error"
        return body["error"]["message"]
    return body["error"]["message"]


@pytest.mark.parametrize("endpoint", [OPENAI, ANTHROPIC])
def test_invalid_json_names_the_position(proxy, endpoint):
    status, _, body = post_raw(proxy.url + endpoint, b'{"model": "mock-1", "messages": [}')
    assert status == 400
    assert "byte 33" in _message(endpoint, body) or "33" in _message(endpoint, body)


@pytest.mark.parametrize(("endpoint", "payload", "field"), [
    (OPENAI, b'{"model": "mock-1"}', "messages"),
    (OPENAI, b'{"model": "mock-1", "messages": [{"role": "user", "content": 5}]}',
     "messages[0].content"),
    (OPENAI, b'{"model": 3, "messages": []}', "model"),
    (ANTHROPIC, b'{"model": "mock-1", "messages": []}', "max_tokens"),
    (ANTHROPIC, b'{"model": "mock-1", "max_tokens": "x", "messages": []}', "max_tokens"),
    (ANTHROPIC, b'{"model": "mock-1", "max_tokens": 5, "messages": '
                b'[{"role": "user", "content": [{"type": "text"}]}]}',
     "messages[0].content[0].text"),
])
def test_wrong_types_or_missing_fields_name_the_field(proxy, endpoint, payload, field):
    status, _, body = post_raw(proxy.url + endpoint, payload)
    assert status == 400
    assert field in _message(endpoint, body)
    assert (body["error"]["type"]) == "invalid_request_error"


@pytest.mark.parametrize("endpoint", [OPENAI, ANTHROPIC])
def test_wrong_content_type_is_415(proxy, endpoint):
    status, _, body = post_raw(proxy.url + endpoint, b"model=x",
                               {"content-type": "application/x-www-form-urlencoded"})
    assert status == 415
    assert "application/json" in _message(endpoint, body)


def test_body_over_the_limit_is_413(upstream):
    from tests.harness import ProxyServer, upstream_config

    config = upstream_config(upstream, server={"max_body_bytes": 1000})
    with ProxyServer(config) as small:
        status, _, body = post_raw(small.url + OPENAI, b'{"model": "' + b"x" * 2000 + b'"}')
        assert status == 413
        assert "1000 bytes" in body["error"]["message"]
        # and it keeps serving
        result = small.openai().chat.completions.create(
            model="mock-1", messages=[{"role": "user", "content": "still here?"}])
        assert "still here?" in result.choices[0].message.content


def test_error_responses_carry_a_request_id(proxy):
    status, headers, _ = post_raw(proxy.url + OPENAI, b"[1, 2]")
    assert status == 400
    assert len(headers["x-request-id"]) == 32
