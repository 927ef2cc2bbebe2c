"""What API endpoints answer with (their headers, errors in the client's own format), the
client's vendor headers, and the endpoints beside the two message APIs:
``POST /v1/messages/count_tokens`` and the answer to a path or a method nothing serves."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse

from proxy.context import Answered, RequestContext
from proxy.errors import BadRequest, ProxyError, UpstreamError
from proxy.formats import anthropic as anthropic_format
from proxy.formats import openai as openai_format
from proxy.formats.common import decode_json
from proxy.headers import TOKEN, CheckedHeaders, header_value
from proxy.ids import new_request_id
from proxy.pipeline import _admit, record_attempt
from proxy.providers import VENDOR_HEADERS, vendor_header_error
from proxy.providers.http import HttpProvider
from proxy.providers.mock import estimate_request_tokens

if TYPE_CHECKING:
    from proxy.pipeline import Pipeline
    from proxy.server import Gateway

log = structlog.get_logger("hookproxy.server")
JSON = "application/json"
_encode = msgspec.json.Encoder().encode

# --- what every API answer carries ------------------------------------------------------


def when_sent(response: HttpResponse, ctx: RequestContext | None) -> HttpResponse:
    """Tells whoever observes the request once ``response`` has gone out."""
    if ctx is not None and ctx.answered is not None:
        response.background = _SetAnswered(ctx.answered)
    return response


def not_sent(response: HttpResponse) -> None:
    """``response`` failed as it went out (``when_sent`` is not told then): what waits
    for it to go out (the request's record, behind it every later one) waits no more."""
    if isinstance(response.background, _SetAnswered):
        response.background.answered.set()


class _SetAnswered(BackgroundTask):
    """What starlette runs once a response has gone out (its ``background``): sets the
    request's ``Answered``, on the event loop."""

    def __init__(self, answered: Answered) -> None:  # no callable to inspect
        self.answered = answered

    async def __call__(self) -> None:
        self.answered.set()


def response_header_items(ctx: RequestContext, request_id: str) -> list[tuple[bytes, bytes]]:
    """The headers every API answer carries, as they go on the wire: the plugins'
    (``ctx.response_headers``), then hookproxy's own."""
    # Plugins' headers first: hookproxy's own names are refused when a plugin sets them.
    plugins = ctx.answer_headers()
    items = [(name.encode("latin-1"), value.encode("latin-1"))
             for name, value in plugins.items()] if plugins else []
    items.append((b"x-request-id", request_id.encode()))
    if ctx.provider:
        items.append((b"x-hookproxy-provider", _own_value(ctx.provider)))
    if ctx.model:
        items.append((b"x-hookproxy-model", _own_value(ctx.model)))
    if ctx.tags:
        items.append((b"x-hookproxy-tags", _own_value(",".join(map(str, ctx.tags)))))
    # What the proxy itself added so far: everything but the time spent waiting upstream.
    overhead = ctx.elapsed_ms() - ctx.timings.get("upstream", 0.0) * 1000
    items.append((b"x-hookproxy-overhead-ms", b"%.3f" % max(overhead, 0.0)))
    if ctx.attempts:
        items.append((b"x-hookproxy-attempts", b"%d" % len(ctx.attempts)))
    return items


def response_headers(ctx: RequestContext, request_id: str) -> dict[str, str]:
    """``response_header_items`` by name."""
    return {name.decode("latin-1"): value.decode("latin-1")
            for name, value in response_header_items(ctx, request_id)}


def with_headers(response: HttpResponse, ctx: RequestContext) -> HttpResponse:
    """``response`` (made without headers) with ``response_header_items`` before its own
    (content-length, content-type), as starlette would put them given them: without
    encoding each name and value again."""
    items = response_header_items(ctx, ctx.request_id)
    items += response.raw_headers  # starlette's: a length, a media type
    response.raw_headers = CheckedHeaders(items)  # type: ignore[assignment]
    return when_sent(response, ctx)


# Header values of hookproxy's own for provider and model names, which repeat: encoded once.
_OWN_VALUES: dict[str, bytes] = {}
_KNOWN_VALUES = 256


def _own_value(value: str) -> bytes:
    encoded = _OWN_VALUES.get(value)
    if encoded is None:
        if len(_OWN_VALUES) >= _KNOWN_VALUES:
            _OWN_VALUES.clear()
        encoded = _OWN_VALUES[value] = header_value(value).encode("latin-1")
    return encoded


def error_response(wire: ModuleType, error: ProxyError, ctx: RequestContext | None,
                   request_id: str) -> HttpResponse:
    # A plugin's extra headers (Retry-After...): only well-formed names, safe values.
    extra = {name: header_value(str(value)) for name, value in error.headers.items()
             if isinstance(name, str) and TOKEN.fullmatch(name)}
    headers = {**extra, **(response_headers(ctx, request_id) if ctx else
                           {"x-request-id": request_id})}
    return HttpResponse(wire.encode_error(error), status_code=error.status, media_type=JSON,
                        headers=headers)


# --- the client's vendor headers --------------------------------------------------------

# VENDOR_HEADERS as an ASGI scope names headers: lower-case bytes.
_VENDOR_NAMES = {client_format: frozenset(name.encode() for name in names)
                 for client_format, names in VENDOR_HEADERS.items()}


def vendor_headers(raw: list[tuple[bytes, bytes]], client_format: str) -> dict[str, str]:
    """The vendor headers of ``client_format`` the client sent (``anthropic-beta``,
    ``openai-organization``...: ``proxy.providers.VENDOR_HEADERS``) among ``raw`` (an
    ASGI scope's headers, whose names are lower case), by name, each value as it was
    sent; one sent more than once has its values joined by ", ". Raises ``BadRequest``
    naming one that could not be passed on (too long, or not printable ASCII)."""
    names = _VENDOR_NAMES.get(client_format, frozenset())
    found: dict[str, str] = {}
    for raw_name, raw_value in raw:
        if raw_name not in names:
            continue
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if name in found:
            value = f"{found[name]}, {value}"
        problem = vendor_header_error(name, value)
        if problem is not None:
            raise BadRequest(f"Invalid request: {problem}", code="invalid_header")
        found[name] = value
    return found


# --- POST /v1/messages/count_tokens -----------------------------------------------------

# A count_tokens request names no max_tokens; the Messages decoder needs one.
_PLACEHOLDER_MAX_TOKENS = 1
# Sent on to the provider when plugins changed the request and it is encoded anew, beside
# the fields the client sent (a plugin may have added a system prompt or tools).
_COUNTED_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice"})
ESTIMATE_HEADER = "x-hookproxy-estimate"


async def count_tokens(gateway: Gateway, http: HttpRequest) -> HttpResponse:
    """``POST /v1/messages/count_tokens``: the body is an Anthropic Messages request
    without ``max_tokens``. It passes the checks, plugins and classifiers a message
    request passes before its provider call (a key the auth plugin refuses is refused
    here the same way) and is routed as that request would be. An Anthropic provider
    counts it (the body as the client sent it, with the provider's model name, or as the
    plugins left it); any other target gets an estimate, marked by an
    ``x-hookproxy-estimate: true`` header. A key's limits count it as one request of no
    tokens (its ``x-ratelimit-*`` headers, its 429). One record, as for any request."""
    fields: dict[str, Any] = {}

    def prepare(body: bytes, request_id: str) -> RequestContext:
        fields.update(decode_json(body))
        decodable = body
        if "max_tokens" not in fields:
            decodable = _encode({**fields, "max_tokens": _PLACEHOLDER_MAX_TOKENS})
        ctx = gateway.request_context(http, anthropic_format, anthropic_format.decode_request,
                                      decodable, request_id)
        if "max_tokens" not in fields:
            ctx.request.max_tokens = None  # as the client sent it, for plugins and the record
        fields.pop("hookproxy", None)  # the request's own settings are for hookproxy
        ctx.raw_body, ctx.body_bytes = None, len(body)
        return ctx

    async def answer(ctx: RequestContext) -> HttpResponse:
        payload, estimated = await gateway.unless_client_leaves(
            http, ctx, _count(gateway.pipeline, ctx, fields))
        response = HttpResponse(payload, media_type=JSON)
        if estimated:
            response.raw_headers.insert(0, (ESTIMATE_HEADER.encode(), b"true"))
        return with_headers(response, ctx)

    return await gateway.serve(http, anthropic_format, prepare, answer)


async def _count(pipeline: Pipeline, ctx: RequestContext, fields: dict[str, Any]
                 ) -> tuple[bytes, bool]:
    """The count's JSON and whether it is an estimate. The pipeline's stages before the
    provider call run as they do for a message request, and what observes a request
    (on_error, request_end, the record) runs after; the Pipeline has no public entry
    point for this part alone, hence its private methods here."""
    try:
        answered = await pipeline._before_provider(ctx)
        if answered is not None:
            # A plugin answered (a guard, a cache hit): no provider is asked.
            await _admit(ctx, ())
            return _estimate(ctx), True
        target = pipeline.router.route_targets(ctx)[0]
        # A key's limits count it as a request that uses no tokens: no targets to price.
        await _admit(ctx, ())
        provider = pipeline.providers[target.provider]
        ctx.provider, ctx.model = target.provider, target.model
        ctx.provider_format = provider.format
        if not (isinstance(provider, HttpProvider) and provider.count_url):
            return _estimate(ctx), True
        body = _upstream_body(ctx, fields, target.model)
        started = time.perf_counter()
        try:
            payload = await provider.count_tokens(body, ctx.request.headers,
                                                  ctx.upstream_header_items())
        except UpstreamError as exc:
            record_attempt(ctx, started, exc)
            raise
        record_attempt(ctx, started)
        return payload, False
    except ProxyError as exc:
        await pipeline._fail(ctx, exc)
        raise
    finally:
        pipeline._end(ctx)


def _estimate(ctx: RequestContext) -> bytes:
    return _encode({"input_tokens": estimate_request_tokens(ctx.request)})


def _upstream_body(ctx: RequestContext, fields: dict[str, Any], model: str) -> bytes:
    """What the provider counts: the client's fields with the provider's model name, or,
    when a plugin changed the request (a redaction, an added system prompt), the request
    as it is now, in the fields a count takes."""
    if any(action == "modified" for action in ctx.plugin_actions.values()):
        encoded = msgspec.json.decode(
            anthropic_format.encode_request(ctx.request, model, same_format=True))
        kept = fields.keys() | _COUNTED_FIELDS
        body = {name: value for name, value in encoded.items() if name in kept}
    else:
        body = dict(fields)
    body["model"] = model
    return _encode(body)


# --- GET /v1/models and GET /v1/models/{id} ----------------------------------------------


def models_list(gateway: Gateway, http: HttpRequest) -> HttpResponse:
    """The configured models the caller may use, in the OpenAI list format (Anthropic's
    when the request carries ``anthropic-version``)."""
    anthropic = "anthropic-version" in http.headers
    try:
        names = usable_models(gateway, http)
    except ProxyError as exc:
        return _refused(gateway, http, exc, anthropic)
    if anthropic:
        data: list[dict[str, Any]] = [_model(gateway, n, anthropic) for n in names]
        body: dict[str, Any] = {"data": data, "has_more": False,
                                "first_id": names[0] if names else None,
                                "last_id": names[-1] if names else None}
    else:
        body = {"object": "list", "data": [_model(gateway, n, anthropic) for n in names]}
    return HttpResponse(_encode(body), media_type=JSON)


def model_info(gateway: Gateway, http: HttpRequest) -> HttpResponse:
    """One configured model the caller may use, in the same formats, or a 404 in that
    format, logged and recorded as an unknown path is."""
    name = str(http.path_params.get("model_id", ""))
    anthropic = "anthropic-version" in http.headers
    try:
        names = usable_models(gateway, http)
    except ProxyError as exc:
        return _refused(gateway, http, exc, anthropic)
    if name in names:
        return HttpResponse(_encode(_model(gateway, name, anthropic)), media_type=JSON)
    shown = name if len(name) <= MAX_SHOWN_PATH else name[:MAX_SHOWN_PATH] + "..."
    # A model the key may not use is, to that key, one that does not exist (as OpenAI
    # answers it); the log says which.
    hidden = name in gateway.router.model_names()
    error = ProxyError(404, f"The model '{shown}' does not exist" +
                       (" or this API key may not use it" if hidden else ""),
                       code="model_not_found")
    return _refused(gateway, http, error, anthropic, model=shown, not_allowed=hidden)


def usable_models(gateway: Gateway, http: HttpRequest) -> list[str]:
    """The model names the request's caller may use: with ``[auth]`` keys, those whose
    targets the key's ``models`` let answer (every one for the admin); a missing or
    unknown key is a 401, as on every API endpoint."""
    auth = gateway.config.auth
    if auth.keys and not gateway.guard.is_admin(http):
        caller = caller_key(gateway, http)
        assert caller is not None
        return gateway.router.model_names(auth.keys[caller].models)
    return gateway.router.model_names()


def caller_key(gateway: Gateway, http: HttpRequest) -> str | None:
    """With ``[auth]`` keys, the name of the key the request carries; a missing or
    unknown key is a 401, as on every API endpoint."""
    auth = gateway.config.auth
    if not auth.keys:
        return None
    from plugins.auth import caller_name

    return caller_name(auth, {k.lower(): v for k, v in http.headers.items()})


def _model(gateway: Gateway, name: str, anthropic: bool) -> dict[str, Any]:
    if anthropic:
        return {"type": "model", "id": name, "display_name": name,
                "created_at": "1970-01-01T00:00:00Z"}
    return {"id": name, "object": "model", "created": 0,
            "owned_by": gateway.router.owner(name)}


def _refused(gateway: Gateway, http: HttpRequest, error: ProxyError, anthropic: bool,
             **logged: Any) -> HttpResponse:
    """``error`` in the caller's format, logged and recorded."""
    started, started_wall = time.perf_counter(), time.time()
    request_id = new_request_id()
    wire = anthropic_format if anthropic else openai_format
    log.info(error.code or "models_refused", request_id=request_id, status=error.status,
             **logged)
    gateway.rejected(request_id, http.scope["path"][:MAX_SHOWN_PATH], wire.NAME, error,
                     started_wall, started)
    return error_response(wire, error, None, request_id)


# --- a path or a method nothing serves ----------------------------------------------------

# A path is shown in errors, the log and the record up to this many characters.
MAX_SHOWN_PATH = 256
API_ENDPOINTS = ("POST /v1/chat/completions, POST /v1/messages, "
                 "POST /v1/messages/count_tokens, POST /v1/responses, "
                 "GET|DELETE /v1/responses/{id}, POST /v1/embeddings, GET /v1/models, "
                 "GET /v1/models/{id}")


def client_wire(path: str, anthropic_version: bool) -> ModuleType:
    """The wire format of a request known only by its path and headers: Anthropic's for a
    path under /v1/messages or a request with an ``anthropic-version`` header, OpenAI's
    otherwise."""
    return (anthropic_format if path.startswith("/v1/messages") or anthropic_version
            else openai_format)


# The OpenAI API's paths: a refusal there is in its format, whatever the headers say.
_OPENAI_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")


def refusal_wire(path: str, headers: Iterable[tuple[bytes, bytes]]) -> ModuleType:
    """The wire format of a request refused before it reached an endpoint (raw ASGI
    ``headers``): ``client_wire``'s, except that an OpenAI endpoint's path says OpenAI's
    whatever the headers."""
    return client_wire(path, not path.startswith(_OPENAI_PATHS) and any(
        name == b"anthropic-version" for name, _ in headers))


def shown_path(path: str) -> str:
    """``path`` as an error message and a record show it: cut at ``MAX_SHOWN_PATH``."""
    return path if len(path) <= MAX_SHOWN_PATH else path[:MAX_SHOWN_PATH] + "..."


def not_routed(gateway: Gateway, http: HttpRequest, exc: Exception) -> HttpResponse:
    """A 404 (no such path) or 405 (not with this method, with ``Allow``) in the client's
    own error format: Anthropic's for a path under /v1/messages or a request with an
    ``anthropic-version`` header, OpenAI's otherwise. Logged, and recorded with the path
    as its endpoint."""
    started, started_wall = time.perf_counter(), time.time()
    request_id = new_request_id()
    path, method = http.scope["path"], http.scope["method"]
    wire = client_wire(path, "anthropic-version" in http.headers)
    shown = shown_path(path)
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    allow = (exc.headers or {}).get("Allow", "") if isinstance(exc, HTTPException) else ""
    # Starlette keeps a route's methods in a set: the same order every time.
    allow = ", ".join(sorted(m.strip() for m in allow.split(",") if m.strip()))
    if status == 405:
        error = ProxyError(405, f"Method {method[:20]} is not allowed on {shown}; use "
                                f"{allow or 'another method'}", code="method_not_allowed")
    else:
        error = ProxyError(404, f"Unknown endpoint {method[:20]} {shown}; hookproxy serves "
                                f"{API_ENDPOINTS}", code="not_found")
    log.info("not_routed", request_id=request_id, method=method[:20], endpoint=shown,
             status=error.status)
    gateway.rejected(request_id, shown, wire.NAME, error, started_wall, started)
    response = error_response(wire, error, None, request_id)
    if allow:
        response.headers["allow"] = allow
    return response
