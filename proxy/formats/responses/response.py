"""A Responses answer: a Responses-capable provider's JSON -> canonical, canonical -> the
client's response object."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from proxy.canonical import Part, Request, Response, ToolCallPart, wire_of
from proxy.errors import BadRequest, ProxyError, UpstreamError
from proxy.formats import openai
from proxy.formats.common import known_extra
from proxy.formats.responses.common import (
    decode_model_item,
    decode_usage,
    encode_json,
    encode_model_parts,
    encode_usage,
    finish_of,
    status_of,
)

_RESPONSE_FIELDS = frozenset({"id", "model", "output", "usage", "status",
                              "incomplete_details"})
# What a response object repeats of the request that asked for it, and the API's default
# for each.
ECHOED: dict[str, Any] = {
    "instructions": None, "max_output_tokens": None, "metadata": {},
    "parallel_tool_calls": True, "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
    "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
    "top_p": 1.0, "truncation": "disabled", "user": None,
}


def decode_response(body: bytes) -> Response:
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise UpstreamError(502, f"Provider sent an invalid response: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("output"), list):
        raise UpstreamError(502, "Provider sent a response without an `output` list")
    if raw.get("status") == "failed":
        error = raw.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        raise UpstreamError(502, f"Provider's response failed: {message}")
    content = output_parts(raw["output"])
    return Response(
        id=str(raw.get("id") or ""), model=str(raw.get("model") or ""), content=content,
        finish_reason=finish_of(raw.get("status"), raw.get("incomplete_details"),
                                any(isinstance(p, ToolCallPart) for p in content)),
        usage=decode_usage(raw.get("usage")), extra=known_extra(raw, _RESPONSE_FIELDS))


def output_parts(output: list[Any]) -> list[Part]:
    parts: list[Part] = []
    try:
        for j, item in enumerate(output):
            if not isinstance(item, dict):
                raise BadRequest(f"Expected `object` at `$.output[{j}]`")
            parts.extend(decode_model_item(item, f"output[{j}]"))
    except BadRequest as exc:
        raise UpstreamError(502, f"Provider sent an invalid response: {exc.message}") \
            from None
    return parts


def output_items(response: Response) -> list[dict[str, Any]]:
    """The ``output`` of a response object for ``response``."""
    return encode_model_parts(response.content, ids=True, status="completed")


def response_object(response: Response, request: Request, response_id: str, *,
                    same_format: bool, status: str | None = None,
                    output: list[dict[str, Any]] | None = None,
                    created_at: int | None = None,
                    echo: dict[str, Any] | None = None) -> dict[str, Any]:
    """The response object the client gets: the answer, the request's settings it
    repeats (from the client's own body, and ``echo``: what hookproxy took out of it, as
    ``previous_response_id``), usage."""
    body: dict[str, Any] = dict(response.extra) if same_format else {}
    wire = wire_of(request) or {}
    for key, default in ECHOED.items():
        body.setdefault(key, wire.get(key, default))
    body.update(echo or {})
    finished, incomplete = status_of(response.finish_reason)
    body.update(
        id=response_id, object="response",
        created_at=created_at or body.get("created_at") or int(time.time()),
        status=status or finished, error=None,
        incomplete_details=incomplete if (status or finished) == "incomplete" else None,
        model=response.model or request.model,
        output=output if output is not None else output_items(response),
        usage=encode_usage(response.usage, same_format))
    return body


def encode_response(response: Response, request: Request, response_id: str, *,
                    same_format: bool) -> bytes:
    return encode_json(response_object(response, request, response_id,
                                       same_format=same_format))


def encode_error(error: ProxyError) -> bytes:
    return openai.encode_error(error)
