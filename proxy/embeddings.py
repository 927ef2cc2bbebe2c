"""``POST /v1/embeddings``: routed by model name like chat (model groups, strategies,
retries, fallback, cooldown) to OpenAI-compatible providers (and the mock), through the
Start, classify, PreRouting, PostResponse and End stages, with on_error.

Plugins see an embeddings request as a canonical ``Request`` whose messages are its
inputs, one user message each: a text as a ``TextPart`` (a plugin may read, mask or
reject it), a token array as an ``OpaquePart`` of kind ``tokens``; ``dimensions``,
``encoding_format`` and other fields are in ``extra`` and reach the provider as they came.
The answer is a ``Response`` holding one ``OpaquePart`` of kind ``embeddings`` whose
``data["body"]`` is the provider's JSON as it came (``embeddings_response`` makes one, for
a plugin that answers the request itself); ``usage.input_tokens`` counts the input, and
the cost is that at the target's ``input_price``.
"""

from __future__ import annotations

import array
import base64
import functools
import hashlib
import math
import struct
import sys
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse

from proxy.canonical import (
    Message,
    OpaquePart,
    Part,
    Request,
    Response,
    TextPart,
    Usage,
    remember_wire,
    wire_of,
)
from proxy.context import PipelineError, RequestContext
from proxy.endpoints import JSON, response_headers, when_sent
from proxy.errors import BadRequest, ProxyError, Untranslatable, UpstreamError, check_message_count
from proxy.formats import openai as openai_format
from proxy.formats.common import decode_json, known_extra
from proxy.providers import Provider
from proxy.providers.http import HttpProvider
from proxy.providers.mock import MockProvider, estimate_tokens
from proxy.routing import Target

if TYPE_CHECKING:
    from proxy.server import Gateway

KIND = "embeddings"
_encode = msgspec.json.Encoder().encode
# What the mock's vectors have when a request names no ``dimensions``...
MOCK_DIMENSIONS = 8
# ...and at most, each, and all of a request's together: the answer (and the work on
# the event loop) stays bounded whatever a small request asks for.
MOCK_MAX_DIMENSIONS = 4096
MOCK_MAX_VALUES = 262_144


class _Answer(msgspec.Struct):
    """An embeddings answer as far as hookproxy reads it: the vectors stay undecoded."""

    data: msgspec.Raw
    model: str = ""
    usage: dict[str, Any] | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def decode_request(body: bytes, max_inputs: int | None = None) -> Request:
    """The embeddings request in ``body``; more than ``max_inputs`` inputs (the server's
    ``max_messages``) is a 400 before any is converted."""
    raw = decode_json(body)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("Invalid request: Object missing required field `model`")
    value = raw.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)):
        inputs: list[Any] = [value]
    elif isinstance(value, list) and value:
        inputs = value
    else:
        raise BadRequest("Invalid request: `$.input` must be a string, a list of strings or "
                         "a list of token arrays, and not empty")
    if max_inputs is not None:
        check_message_count(len(inputs), max_inputs)
    messages = [Message(role="user", content=[_input_part(item, i)])
                for i, item in enumerate(inputs)]
    request = Request(model=model, messages=messages,
                      extra=known_extra(raw, {"model", "input"}))
    remember_wire(request, raw)
    return request


def _input_part(item: object, index: int) -> Part:
    if isinstance(item, str):
        return TextPart(text=item)
    if isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                      for t in item):
        return OpaquePart(format=openai_format.NAME, kind="tokens", data={"tokens": item})
    raise BadRequest(f"Invalid request: `$.input[{index}]` must be a string or an array of "
                     "token ids")


def request_input(request: Request) -> str | list[Any]:
    """The ``input`` to send for ``request`` as plugins left it: one string when the
    client sent one, else a list of strings and token arrays."""
    items: list[Any] = []
    for message in request.messages:
        for part in message.content:
            if isinstance(part, TextPart):
                items.append(part.text)
            elif isinstance(part, OpaquePart) and part.kind == "tokens":
                items.append(part.data.get("tokens", []))
    wire = wire_of(request) or {}
    if isinstance(wire.get("input"), str) and len(items) == 1 and isinstance(items[0], str):
        return items[0]
    if isinstance(wire.get("input"), list) and wire["input"] and isinstance(
            wire["input"][0], int) and len(items) == 1:
        return items[0]
    return items


def embeddings_response(body: bytes, model: str, input_tokens: int) -> Response:
    """An answer to an embeddings request: ``body`` is the JSON the client gets (an
    OpenAI embeddings list)."""
    return Response(id="", model=model, usage=Usage(input_tokens=input_tokens),
                    content=[OpaquePart(format=openai_format.NAME, kind=KIND,
                                        data={"body": body.decode()})])


def answer_body(response: Response) -> bytes:
    for part in response.content:
        if isinstance(part, OpaquePart) and part.kind == KIND and isinstance(
                part.data.get("body"), str):
            return str(part.data["body"]).encode()
    raise ProxyError(500, "The answer to an embeddings request holds no embeddings (a "
                          "plugin answered it with a chat response)", code="plugin_error")


def mock_embeddings(request: Request, model: str) -> Response:
    """The mock's answer: a unit vector per input, the same for the same text and model.
    More than ``MOCK_MAX_VALUES`` numbers in all (inputs x dimensions), or ``dimensions``
    that is not a whole number from 1 to ``MOCK_MAX_DIMENSIONS``, is a 400 naming it, as
    OpenAI refuses a request over its limits."""
    extra = request.extra
    size = extra.get("dimensions", MOCK_DIMENSIONS)
    if size is None:
        size = MOCK_DIMENSIONS
    if not (isinstance(size, int) and not isinstance(size, bool)
            and 0 < size <= MOCK_MAX_DIMENSIONS):
        raise _refused(f"`dimensions` must be a whole number from 1 to "
                       f"{MOCK_MAX_DIMENSIONS:,} for the mock provider")
    count = len(request.messages)
    if count * size > MOCK_MAX_VALUES:
        raise _refused(f"The mock provider answers at most {MOCK_MAX_VALUES:,} embedding "
                       f"values per request (inputs x dimensions); this one asks for "
                       f"{count:,} x {size:,} = {count * size:,}: send fewer inputs or "
                       "fewer dimensions per request")
    base64_out = extra.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, message in enumerate(request.messages):
        part = message.content[0] if message.content else TextPart(text="")
        text = part.text if isinstance(part, TextPart) else _encode(
            getattr(part, "data", {})).decode()
        tokens += estimate_tokens(text) if isinstance(part, TextPart) else len(
            getattr(part, "data", {}).get("tokens", []))
        seed = f"{model}\n{text}".encode()
        embedding: Any = (base64.b64encode(_unit_vector(seed, size, "f")).decode()
                          if base64_out else _as_floats(_unit_vector(seed, size, "d")))
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    body = _encode({"object": "list", "data": data, "model": model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
    return embeddings_response(body, model, tokens)


def _refused(message: str) -> UpstreamError:
    return UpstreamError(400, message, upstream_status=400, code="invalid_request")


def _unit_vector(seed: bytes, size: int, kind: str) -> bytes:
    """A unit vector of ``size`` little-endian floats (``kind`` "f": 32 bits, "d": 64),
    the same for the same ``seed``: each component is +-1/sqrt(size), its sign a bit of
    the seed's SHAKE-256 digest. Built with bytes operations, none per float in Python:
    the floats differ only in their sign bit, the high bit of each one's last byte."""
    one = struct.pack(f"<{kind}", 1 / math.sqrt(size))
    last = one[-1]
    signs = bytes([last] * 128 + [last | 0x80] * 128)  # a digest byte's high bit -> sign
    vector = bytearray(one * size)
    vector[len(one) - 1::len(one)] = hashlib.shake_256(seed).digest(size).translate(signs)
    return bytes(vector)


def _as_floats(packed: bytes) -> list[float]:
    values = array.array("d", packed)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


async def _call(ctx: RequestContext, provider: Provider, target: Target) -> Response:
    """One provider call for an embeddings request."""
    if isinstance(provider, MockProvider):
        return mock_embeddings(ctx.request, target.model)
    if not (isinstance(provider, HttpProvider) and provider.embeddings_url):
        raise Untranslatable("An embeddings request", provider.format)
    body = {k: v for k, v in (wire_of(ctx.request) or {}).items() if k != "hookproxy"}
    body.update(ctx.request.extra, model=target.model, input=request_input(ctx.request))
    payload = await provider.embed(_encode(body), ctx.request.headers)
    try:
        answer = _decode_answer(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UpstreamError(502, f"Provider {provider.name} sent an invalid embeddings "
                                 f"answer: {exc}", upstream_status=200,
                            code="upstream_invalid") from None
    usage = answer.usage or {}
    tokens = usage.get("prompt_tokens")
    return embeddings_response(payload, answer.model or target.model,
                               tokens if isinstance(tokens, int) else 0)


async def embeddings(gateway: Gateway, http: HttpRequest) -> HttpResponse:
    """``POST /v1/embeddings``."""

    def prepare(body: bytes, request_id: str) -> RequestContext:
        return gateway.request_context(
            http, openai_format,
            functools.partial(decode_request, max_inputs=gateway.config.server.max_messages),
            body, request_id)

    async def answer(ctx: RequestContext) -> HttpResponse:
        response = await gateway.unless_client_leaves(
            http, ctx, gateway.pipeline.run(ctx, call=functools.partial(_call, ctx)))
        try:
            content = answer_body(response)
        except ProxyError as exc:
            # The record (written once this answer has gone out) says what the client got.
            ctx.status = exc.status
            ctx.error = PipelineError(stage="proxy", status=exc.status, message=exc.message,
                                      type=exc.code or "error")
            raise
        return when_sent(HttpResponse(content, media_type=JSON,
                                      headers=response_headers(ctx, ctx.request_id)), ctx)

    return await gateway.serve(http, openai_format, prepare, answer)
