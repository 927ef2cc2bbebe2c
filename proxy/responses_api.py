"""The OpenAI Responses API: ``POST /v1/responses`` on the same pipeline as the other
message APIs, and the responses it stores for ``previous_response_id``,
``GET /v1/responses/{id}`` and ``DELETE /v1/responses/{id}``.

A stored response belongs to the API key that created it: only a request with the same
key may continue it, read it or delete it; any other gets the 404 a missing one gets.
Entries live behind ``proxy.store.Store`` (bounded, with a TTL), each holding its own
turn (the client's input items and the response), with a link to the response it
continued: a conversation is the chain of its turns, read back when it continues.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import time
import types
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.responses import StreamingResponse

from proxy.canonical import Request, wire_of
from proxy.context import PipelineError, RequestContext
from proxy.endpoints import JSON, caller_key, error_response, response_headers, when_sent
from proxy.errors import ProxyError
from proxy.formats import responses as responses_format
from proxy.ids import new_request_id
from proxy.params import check_parameters
from proxy.store import Store, StoreUnavailable

if TYPE_CHECKING:
    from proxy.server import Gateway

log = structlog.get_logger("hookproxy.responses")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
# Turns one conversation may chain back through at most.
MAX_CHAIN = 10_000


class _Entry(msgspec.Struct):
    tenant: str
    response: dict[str, Any]
    input: list[Any] = []
    previous: str | None = None


_encode_entry = msgspec.msgpack.Encoder().encode
_decode_entry = msgspec.msgpack.Decoder(_Entry).decode


def tenant_of(headers: Any) -> str:
    """Who a stored response belongs to: a digest of the API key the request carried
    (``Authorization: Bearer`` or ``x-api-key``), never the key itself."""
    authorization = headers.get("authorization", "")
    key = (authorization[7:].strip() if authorization[:7].lower() == "bearer "
           else headers.get("x-api-key", ""))
    return hashlib.sha256(b"hookproxy-responses\0" + key.encode()).hexdigest()


def _unavailable() -> ProxyError:
    """The shared store (Redis) did not answer: a 503, never a 500."""
    return ProxyError(503, "Stored responses cannot be reached right now; retry shortly",
                      code="store_unavailable", headers={"retry-after": "1"})


class StoredResponses:
    """Responses kept for later turns, by id, each with the tenant that made it."""

    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self.ttl = ttl

    async def save(self, tenant: str, response: dict[str, Any], items: list[Any],
                   previous: str | None) -> None:
        entry = _Entry(tenant=tenant, response=response, input=items, previous=previous)
        await self.store.set(_key(str(response.get("id"))), _encode_entry(entry), self.ttl)

    async def load(self, tenant: str, response_id: str) -> _Entry | None:
        """The entry, or None when there is none or it belongs to another tenant."""
        try:
            data = await self.store.get(_key(response_id))
        except StoreUnavailable:
            raise _unavailable() from None
        if data is None:
            return None
        entry = _decode_entry(data)
        return entry if hmac.compare_digest(entry.tenant, tenant) else None

    async def delete(self, tenant: str, response_id: str) -> bool:
        if await self.load(tenant, response_id) is None:
            return False
        try:
            return await self.store.delete(_key(response_id))
        except StoreUnavailable:
            raise _unavailable() from None

    async def history(self, tenant: str, response_id: str, limit: int) -> list[Any]:
        """The items of the conversation up to and including ``response_id``: each turn's
        input, then its output, oldest first. Raises ``ProxyError`` (404) when a turn is
        missing or another tenant's, (400) past ``limit`` bytes."""
        turns: list[list[Any]] = []
        size = 0
        current: str | None = response_id
        while current is not None and len(turns) < MAX_CHAIN:
            entry = await self.load(tenant, current)
            if entry is None:
                raise ProxyError(404, f"Previous response with id '{current[:100]}' not "
                                      "found.", code="previous_response_not_found")
            turn = [*entry.input, *(entry.response.get("output") or [])]
            size += len(_encode(turn))
            if size > limit:
                raise ProxyError(400, f"The conversation up to response '{response_id[:100]}'"
                                      f" is larger than {limit} bytes",
                                 code="conversation_too_large")
            turns.append(turn)
            current = entry.previous
        return [item for turn in reversed(turns) for item in turn]


def _key(response_id: str) -> str:
    return f"hookproxy:responses:{response_id}"


# --- POST /v1/responses -----------------------------------------------------------------


async def create(gateway: Gateway, http: HttpRequest) -> HttpResponse:
    """``POST /v1/responses``: decoded into the canonical request (plugins and
    classifiers see it as they see a chat request), continued from a stored response
    when it names one, run through the pipeline, answered as a response object or the
    typed event stream, and stored unless ``store`` is false."""
    wire = responses_format

    def prepare(body: bytes, request_id: str) -> RequestContext:
        return gateway.request_context(http, wire, wire.decode_request, body, request_id)

    async def answer(ctx: RequestContext) -> HttpResponse:
        tenant = tenant_of(http.headers)
        client = dict(wire_of(ctx.request) or {})
        previous = client.get("previous_response_id")
        if previous is not None:
            try:
                await _continue(gateway, ctx, str(previous), tenant)
            except ProxyError as exc:
                await gateway.pipeline._fail(ctx, exc)
                gateway.pipeline._end(ctx)
                raise
        stored = gateway.stored_responses
        echo = {"previous_response_id": previous} if previous is not None else None
        keep = client.get("store", True) is not False
        items = responses_format.input_items(client)

        async def save(body: dict[str, Any]) -> None:
            if previous is not None:
                body["previous_response_id"] = previous
            if not keep or body.get("status") == "failed":
                return
            try:
                await stored.save(tenant, body, items, previous)
            except Exception:
                log.exception("response_not_stored", request_id=ctx.request_id)

        if ctx.request.stream:
            events = await gateway.unless_client_leaves(
                http, ctx, gateway.pipeline.open_stream(ctx))
            encoder = wire.StreamEncoder(ctx.request, _new_id(), echo=echo)
            shim = types.SimpleNamespace(StreamEncoder=lambda request: encoder)

            async def stream_body() -> Any:
                async for chunk in gateway._stream_body(ctx, shim, events):  # type: ignore[arg-type]
                    yield chunk
                if encoder.final is not None and ctx.error is None:
                    await save(encoder.final)

            return when_sent(StreamingResponse(stream_body(), media_type="text/event-stream",
                                               headers=response_headers(ctx, ctx.request_id)),
                             ctx)
        response = await gateway.unless_client_leaves(http, ctx, gateway.pipeline.run(ctx))
        if ctx.raw_response is not None:
            body = _decode(ctx.raw_response)  # the provider's own answer, as it came
        else:
            response_id = response.id if ctx.same_format and response.id else _new_id()
            body = wire.response_object(response, ctx.request, response_id,
                                        same_format=ctx.same_format, echo=echo)
        await save(body)
        content = ctx.raw_response if ctx.raw_response is not None and previous is None \
            else _encode(body)
        return when_sent(HttpResponse(content, media_type=JSON,
                                      headers=response_headers(ctx, ctx.request_id)), ctx)

    return await gateway.serve(http, wire, prepare, answer)


def _new_id() -> str:
    return f"resp_{os.urandom(16).hex()}"


async def _continue(gateway: Gateway, ctx: RequestContext, previous: str, tenant: str
                    ) -> None:
    """Puts the stored conversation before the request's own input: the request then
    stands for the whole conversation, for plugins and for any provider."""
    limit = gateway.config.server.max_body_bytes
    history = await gateway.stored_responses.history(tenant, previous, limit)
    client = dict(wire_of(ctx.request) or {})
    del client["previous_response_id"]
    client["input"] = [*history, *responses_format.input_items(client)]
    body = _encode(client)
    request = responses_format.decode_request(body)
    if len(request.messages) > gateway.config.server.max_messages:
        raise ProxyError(400, f"Too many messages: {len(request.messages)} (at most "
                              f"{gateway.config.server.max_messages})",
                         code="too_many_messages")
    check_parameters(request, responses_format.NAME)
    request.headers = ctx.request.headers
    request.extra.pop("hookproxy", None)
    ctx.request = request
    if ctx.raw_body is not None:
        ctx.raw_body = body


# --- GET and DELETE /v1/responses/{id} --------------------------------------------------


async def retrieve(gateway: Gateway, http: HttpRequest) -> HttpResponse:
    """``GET /v1/responses/{id}``: the stored response object."""
    return await _stored(gateway, http, delete=False)


async def delete(gateway: Gateway, http: HttpRequest) -> HttpResponse:
    """``DELETE /v1/responses/{id}``: forgets a stored response."""
    return await _stored(gateway, http, delete=True)


async def _stored(gateway: Gateway, http: HttpRequest, *, delete: bool) -> HttpResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    response_id = str(http.path_params.get("response_id", ""))[:200]
    ctx = RequestContext(Request(model="", messages=[]), request_id=request_id,
                         endpoint=http.scope["path"][:256],
                         client_format=responses_format.NAME)
    ctx.started = started
    try:
        ctx.caller = caller_key(gateway, http)
        tenant = tenant_of(http.headers)
        stored = gateway.stored_responses
        if delete:
            if not await stored.delete(tenant, response_id):
                raise _not_found(response_id)
            content = _encode({"id": response_id, "object": "response.deleted",
                               "deleted": True})
        else:
            entry = await stored.load(tenant, response_id)
            if entry is None:
                raise _not_found(response_id)
            ctx.requested_model = str(entry.response.get("model", ""))
            content = _encode(entry.response)
        answer = HttpResponse(content, media_type=JSON, headers={"x-request-id": request_id})
    except ProxyError as exc:
        log.info("responses_refused", request_id=request_id, status=exc.status,
                 error=exc.message)
        ctx.status = exc.status
        ctx.error = PipelineError(stage=exc.stage, status=exc.status, message=exc.message,
                                  type=exc.code or "error")
        answer = error_response(responses_format, exc, None, request_id)
    ctx.timings["total"] = time.perf_counter() - started
    gateway.pipeline.in_order(functools.partial(gateway.observer.finished, ctx))
    return answer


def _not_found(response_id: str) -> ProxyError:
    return ProxyError(404, f"No response found with id '{response_id}'.", code="not_found")
