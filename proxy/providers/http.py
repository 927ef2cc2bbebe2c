"""Providers reached over HTTP: OpenAI-compatible servers and Anthropic."""

from __future__ import annotations

import asyncio
import math
import os
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import msgspec
import structlog

from proxy.canonical import Request, Response, StreamEvent
from proxy.config import ProviderConfig
from proxy.errors import UpstreamError, upstream_error
from proxy.formats import FORMATS
from proxy.formats import responses as responses_format
from proxy.providers import VENDOR_HEADERS, vendor_header_error
from proxy.sse import EventTooLarge, iter_sse

log = structlog.get_logger("hookproxy.providers")

ANTHROPIC_VERSION = "2023-06-01"
# Pieces of decompressed output are at most this large, however much a chunk inflates.
_INFLATE_STEP = 256 * 1024
# An error answer is read only this far: its message is all the proxy keeps.
_ERROR_BODY_BYTES = 64 * 1024


def _error_message(body: bytes) -> str:
    """The ``error.message`` both APIs put in an error body, or the body's start."""
    try:
        payload = msgspec.json.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return body[:500].decode("utf-8", "replace").strip() or "(empty body)"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return body[:500].decode("utf-8", "replace")


class _TokenCount(msgspec.Struct):
    input_tokens: int


# Checks that a count_tokens answer is one (other fields it has are passed on too).
_decode_count = msgspec.json.Decoder(_TokenCount).decode


# aiohttp's own timeout machinery (a loop timer, a timer context per call and per read)
# is left out of whole-answer calls: ``_Deadlines`` bounds them, with one timer for all.
_NO_TIMEOUT = aiohttp.ClientTimeout()


class _Deadline:
    """A provider call's deadline: when it passes, the call's task is cancelled, and the
    call turns that cancellation into the timeout it was (``timed_out``); a cancellation
    from elsewhere (the client leaving) stays one."""

    __slots__ = ("cancelling", "expired", "task", "when")

    def __init__(self, task: asyncio.Task[Any], when: float) -> None:
        self.task = task
        self.when = when
        self.cancelling = task.cancelling()
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def timed_out(self) -> bool:
        """Whether the call ended by its deadline alone: then the cancellation is taken
        back. False if it did not expire, or was cancelled from elsewhere as well."""
        return self.expired and self.task.uncancel() <= self.cancelling


class _Deadlines:
    """The deadlines of the calls in flight on one loop, watched by one timer armed for
    the earliest: a loop timer made and cancelled per call costs more than the rest of the
    bookkeeping. When the timer fires, the calls past their deadline are cancelled and it
    is armed again for the earliest left (about once per ``timeout`` under steady traffic,
    as each call is short and the one next due started just before)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: dict[_Deadline, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, task: asyncio.Task[Any], timeout: float) -> _Deadline:
        deadline = _Deadline(task, self.loop.time() + timeout)
        self.calls[deadline] = None
        if deadline.when < self._timer_at:
            self._arm(deadline.when)
        return deadline

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self.loop.time()
        for deadline in [d for d in self.calls if d.when <= now]:
            del self.calls[deadline]
            deadline.expire()
        if self.calls:
            self._arm(min(deadline.when for deadline in self.calls))


class _Inflater:
    """gzip or deflate, decompressed in bounded steps so that a bomb never inflates in
    memory all at once."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        # gzip: a gzip header; deflate: zlib-wrapped as the RFC says, or raw as some send.
        self._inflate = zlib.decompressobj(15 if encoding == "deflate" else 31)
        self._first = True

    def feed(self, data: bytes) -> Iterator[bytes]:
        """What ``data`` inflates to, one bounded step at a time: the caller checks its
        caps between steps, so no more than a step is ever produced past them."""
        try:
            piece = self._inflate.decompress(data, _INFLATE_STEP)
        except zlib.error:
            if not (self._first and self.encoding == "deflate"):
                raise
            self._inflate = zlib.decompressobj(-15)
            piece = self._inflate.decompress(data, _INFLATE_STEP)
        self._first = False
        yield piece
        while self._inflate.unconsumed_tail:
            yield self._inflate.decompress(self._inflate.unconsumed_tail, _INFLATE_STEP)


class HttpProvider:
    def __init__(self, name: str, config: ProviderConfig,
                 session: Callable[[], aiohttp.ClientSession]) -> None:
        self.name = name
        self.format: str = config.type
        self.config = config
        self._session = session
        self._wire = FORMATS[config.type]
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        # Only encodings the proxy decompresses itself, under its caps.
        headers = {"content-type": "application/json", "accept-encoding": "gzip, deflate"}
        self.embeddings_url = ""  # an OpenAI-compatible server's, below
        if config.type == "anthropic":
            self.url = f"{config.base_url}/v1/messages"
            self.count_url = f"{config.base_url}/v1/messages/count_tokens"
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if key:
                headers["x-api-key"] = key
        else:
            self.url = f"{config.base_url}/chat/completions"
            self.count_url = ""  # the OpenAI API has no such endpoint
            self.embeddings_url = f"{config.base_url}/embeddings"
            if key:
                headers["authorization"] = f"Bearer {key}"
        # The wire formats it speaks: its own, and the Responses API when it has it.
        self.formats = frozenset({self.format, responses_format.NAME} if config.responses
                                 else {self.format})
        self.responses_url = f"{config.base_url}/responses"
        # The operator's headers, by lower-case name: they win over the defaults and over
        # any vendor header a client sends (the operator may pin a version or a beta list).
        self.operator_headers = {name.lower(): value for name, value in config.headers.items()}
        headers.update(self.operator_headers)
        self.headers = headers
        # The vendor headers a client of this format may add (never its credentials).
        self.vendor_names = VENDOR_HEADERS.get(config.type, frozenset()) - set(
            self.operator_headers)
        self._deadlines: _Deadlines | None = None  # of whole-answer calls, on their loop
        # A stream may run long; what is bounded is the wait for each next byte.
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeout, sock_read=config.timeout)

    def request_headers(self, vendor: dict[str, str], client_format: str,
                        plugin_headers: dict[str, str] | None = None) -> dict[str, str]:
        """The headers of a call made for a client of ``client_format`` that sent the
        vendor headers ``vendor`` (``Request.headers``, which plugins may have changed).

        Only a client of this provider's own format adds any, and only the vendor
        headers of that format (the client's ``anthropic-version`` replaces the default,
        ``anthropic-beta`` is added...); a header the operator configured for this
        provider wins. A value no header can carry (a plugin's mistake) is left out and
        logged. ``plugin_headers`` (``ctx.upstream_headers``, checked when a plugin set
        them: never a credential) are added to any call; the operator's still win."""
        if plugin_headers:
            headers = self.request_headers(vendor, client_format)
            return {**headers, **{name: value for name, value in plugin_headers.items()
                                  if name not in self.operator_headers}}
        # A Responses client is an OpenAI client: its OpenAI headers go to OpenAI.
        vendor_format = "openai" if client_format == responses_format.NAME else client_format
        if vendor_format != self.format or not vendor:
            return self.headers
        added: dict[str, str] = {}
        for name, value in vendor.items():
            name = name.lower() if isinstance(name, str) else ""
            if name not in self.vendor_names:
                continue
            problem = vendor_header_error(name, value)
            if problem is not None:
                log.warning("vendor_header_dropped", provider=self.name, header=name,
                            reason=problem)
                continue
            added[name] = value
        return {**self.headers, **added} if added else self.headers

    def _route(self, client_format: str) -> tuple[Any, str]:
        """The wire format and URL of a call for a client of ``client_format``."""
        if client_format == responses_format.NAME and client_format in self.formats:
            return responses_format, self.responses_url
        return self._wire, self.url

    def _body(self, request: Request, model: str, client_format: str) -> bytes:
        if client_format == responses_format.NAME:
            if client_format in self.formats:
                return responses_format.encode_request(request, model)
            # Through the canonical model: what has no counterpart here is a 400.
            request = responses_format.for_format(request, self.format)
        same = client_format == self.format
        if self.format == "anthropic":
            return self._wire.encode_request(
                request, model, same_format=same,
                default_max_tokens=self.config.default_max_tokens)
        return self._wire.encode_request(request, model, same_format=same)

    def _failure(self, exc: BaseException, answering: bool = False) -> UpstreamError:
        if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            return UpstreamError(504, f"Provider {self.name} timed out after "
                                      f"{self.config.timeout:g}s", code="upstream_timeout")
        if answering:
            return UpstreamError(502, f"Provider {self.name} ended the answer before it was "
                                      f"complete: {exc}", code="upstream_cut")
        return UpstreamError(502, f"Provider {self.name} is unreachable: {exc}",
                             code="upstream_unreachable")

    def _too_large(self, what: str, limit: int, setting: str, status: int) -> UpstreamError:
        return UpstreamError(502, f"Provider {self.name} sent {what} larger than {limit} "
                                  f"bytes (providers.{self.name}.{setting})",
                             upstream_status=status, code="upstream_too_large")

    def _decoding(self, response: aiohttp.ClientResponse, whole: bool) -> _Inflater | None:
        """What decompresses the answer (None: it is not compressed); an encoding hookproxy
        does not accept, or (``whole``) a declared size past the cap, is an error."""
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "", "gzip", "x-gzip", "deflate"):
            raise UpstreamError(502, f"Provider {self.name} sent an answer in content-encoding "
                                     f"{encoding!r}, which hookproxy does not accept",
                                upstream_status=response.status, code="upstream_invalid")
        declared = response.content_length
        if whole and declared is not None and declared > self.config.max_response_bytes:
            raise self._too_large("an answer", self.config.max_response_bytes,
                                  "max_response_bytes", response.status)
        if encoding in ("identity", ""):
            return None
        return _Inflater(encoding)

    def _chunks(self, response: aiohttp.ClientResponse, whole: bool = True
                ) -> AsyncIterator[bytes]:
        """The body, decompressed, in bounded pieces. ``whole``: an answer read to its
        end, capped in size on the wire and decompressed (a stream is capped per event).
        What ``_decoding`` refuses is raised at once."""
        return self._pieces(response, self._decoding(response, whole), whole)

    async def _pieces(self, response: aiohttp.ClientResponse, inflater: _Inflater | None,
                      whole: bool) -> AsyncIterator[bytes]:
        config, status = self.config, response.status
        received = produced = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if whole and received > config.max_response_bytes:
                raise self._too_large("an answer", config.max_response_bytes,
                                      "max_response_bytes", status)
            if inflater is None:
                yield chunk
                continue
            try:
                for piece in inflater.feed(chunk):
                    produced += len(piece)
                    if whole and produced > config.max_decompressed_bytes:
                        raise self._too_large("an answer that decompresses to",
                                              config.max_decompressed_bytes,
                                              "max_decompressed_bytes", status)
                    if piece:
                        yield piece
            except zlib.error as exc:
                raise UpstreamError(502, f"Provider {self.name} sent a corrupt "
                                         f"{inflater.encoding} body: {exc}",
                                    upstream_status=status, code="upstream_invalid") from None

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole answer, decompressed, under the caps."""
        inflater = self._decoding(response, whole=True)
        content = response.content
        if inflater is None and content.is_eof():
            # All of it has come (a small answer comes with its headers): no pieces to
            # wait for. aiohttp stops reading past its buffer's high-water mark, so an
            # answer that has all come unread is small.
            body = content.read_nowait()
            if len(body) > self.config.max_response_bytes:
                raise self._too_large("an answer", self.config.max_response_bytes,
                                      "max_response_bytes", response.status)
            return body
        return b"".join([chunk async for chunk in self._pieces(response, inflater, True)])

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if 300 <= status < 400:
            # Never followed: the request carries the prompt and the provider's key.
            location = response.headers.get("location", "(no Location)")
            raise UpstreamError(502, f"Provider {self.name} answered {status} redirecting to "
                                     f"{location[:300]}; hookproxy does not follow redirects",
                                upstream_status=status, code="upstream_redirect")
        if status < 400:
            return
        body = bytearray()
        try:
            async for chunk in self._chunks(response, whole=False):
                body += chunk
                if len(body) >= _ERROR_BODY_BYTES:
                    break
        except (TimeoutError, aiohttp.ClientError, UpstreamError):
            pass  # the status says enough
        message = f"Provider {self.name} returned {status}: {_error_message(bytes(body))}"
        raise upstream_error(status, message, response.headers.get("retry-after"))

    def _invalid(self, exc: Exception) -> UpstreamError:
        return UpstreamError(502, f"Provider {self.name} sent an invalid response: "
                                  f"{type(exc).__name__}: {exc}", upstream_status=200,
                             code="upstream_invalid")

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> bytes:
        """POSTs ``body`` and reads the whole answer, under the caps and within the
        provider's ``timeout``; a failure is an ``UpstreamError``. Awaited in a task."""
        task = asyncio.current_task()
        assert task is not None
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not task.get_loop():
            deadlines = self._deadlines = _Deadlines(task.get_loop())
        deadline = deadlines.add(task, self.config.timeout)
        try:
            async with self._session().post(url, data=body, headers=headers,
                                            timeout=_NO_TIMEOUT, allow_redirects=False,
                                            auto_decompress=False) as response:
                if response.status >= 300:
                    await self._raise_for_status(response)
                return await self._read(response)
        except (asyncio.CancelledError, UpstreamError):
            # The deadline's cancellation, or what it interrupted, is the timeout.
            if deadline.timed_out():
                raise self._failure(TimeoutError()) from None
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(TimeoutError() if deadline.timed_out() else exc) from None
        finally:
            deadlines.calls.pop(deadline, None)

    async def complete(self, request: Request, model: str, client_format: str,
                       raw_body: bytes | None = None,
                       plugin_headers: dict[str, str] | None = None
                       ) -> tuple[Response, bytes | None]:
        body = raw_body if raw_body is not None else self._body(request, model, client_format)
        wire, url = self._route(client_format)
        payload = await self._post(url, body, self.request_headers(
            request.headers, client_format, plugin_headers))
        try:
            decoded = wire.decode_response(payload)
        except UpstreamError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            # Invalid UTF-8 among them: the decoder's own errors name the shape only.
            raise self._invalid(exc) from None
        return decoded, payload if client_format in self.formats else None

    async def count_tokens(self, body: bytes, vendor: dict[str, str],
                           plugin_headers: dict[str, str] | None = None) -> bytes:
        """Asks an Anthropic provider to count the input tokens of ``body`` (a
        ``/v1/messages/count_tokens`` request naming the provider's model), sending an
        Anthropic client's ``vendor`` headers as a message request would. Returns the
        provider's JSON answer as it came; raises ``UpstreamError`` as ``complete`` does."""
        if not self.count_url:
            raise ValueError(f"provider {self.name} ({self.format}) does not count tokens")
        payload = await self._post(self.count_url, body,
                                   self.request_headers(vendor, self.format, plugin_headers))
        try:
            _decode_count(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise self._invalid(exc) from None
        return payload

    async def embed(self, body: bytes, vendor: dict[str, str]) -> bytes:
        """POSTs an embeddings request (``body``, naming the provider's model) to an
        OpenAI-compatible server; returns its JSON answer as it came."""
        if not self.embeddings_url:
            raise ValueError(f"provider {self.name} ({self.format}) has no embeddings")
        return await self._post(self.embeddings_url, body,
                                self.request_headers(vendor, self.format))

    async def stream(self, request: Request, model: str, client_format: str,
                     raw_body: bytes | None = None,
                     plugin_headers: dict[str, str] | None = None
                     ) -> AsyncIterator[list[StreamEvent]]:
        wire, url = self._route(client_format)
        if raw_body is not None:
            body = wire.stream_body(request, raw_body)
        else:
            body = self._body(request, model, client_format)
        decoder: Any = wire.StreamDecoder(request, same_format=client_format in self.formats)
        answering = False
        try:
            async with self._session().post(url, data=body,
                                            headers=self.request_headers(
                                                request.headers, client_format,
                                                plugin_headers),
                                            timeout=self.stream_timeout, allow_redirects=False,
                                            auto_decompress=False) as response:
                await self._raise_for_status(response)
                answering = True
                sse = iter_sse(self._chunks(response, whole=False),
                               self.config.max_event_bytes)
                async for events in sse:
                    batch: list[StreamEvent] = []
                    try:
                        for event, data in events:
                            try:
                                batch.extend(decoder.feed(event, data))
                            except UpstreamError:
                                raise
                            except (ValueError, TypeError, KeyError, AttributeError,
                                    RecursionError) as exc:
                                raise self._invalid(exc) from None
                            if decoder.ended:
                                break
                    except UpstreamError:
                        if batch:  # what came before the bad event still goes out
                            yield batch
                        raise
                    if batch:
                        yield batch
                    if decoder.ended:
                        return
        except UpstreamError:
            raise
        except EventTooLarge as exc:
            raise self._too_large("a stream event", exc.limit, "max_event_bytes", 200) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, answering) from None
        rest = decoder.close()
        if rest:
            yield rest
