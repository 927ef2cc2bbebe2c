"""The one exception type the pipeline turns into an error in the client's own format."""

from __future__ import annotations


class ProxyError(Exception):
    """An error with an HTTP status for the client.

    ``stage`` says where it happened (``request``, ``start``, ``route``, ``upstream``...)
    and ``plugin`` names the plugin responsible, when one is.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        stage: str = "request",
        plugin: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not is_error_status(status):
            # Anything else would be sent as given (101, 204, 304) or drop the connection.
            message = f"Invalid error status {status!r} (must be 400-599): {message}"
            status, code = 500, code or "invalid_status"
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.stage = stage
        self.plugin = plugin
        self.headers = headers or {}

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.message!r}, stage={self.stage!r})"


def is_error_status(status: object) -> bool:
    """An HTTP status a client can be refused with: an int from 400 to 599."""
    return isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599


class BadRequest(ProxyError):
    def __init__(self, message: str, *, code: str | None = "invalid_request") -> None:
        super().__init__(400, message, code=code, stage="request")


def check_message_count(count: int, limit: int) -> None:
    """A request of more than ``limit`` messages (``[server].max_messages``) is a 400."""
    if count > limit:
        raise BadRequest(f"Too many messages: {count} (at most {limit})",
                         code="too_many_messages")


class UpstreamError(ProxyError):
    """A provider failed. ``upstream_status`` is what the provider said (0: no answer)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        upstream_status: int = 0,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, code=code, stage="upstream", headers=headers)
        self.upstream_status = upstream_status


def upstream_error(upstream_status: int, message: str,
                   retry_after: str | None = None) -> UpstreamError:
    """Maps a provider's HTTP error onto what the client sees: a 4xx keeps its status,
    anything else becomes 502."""
    headers = {"retry-after": retry_after} if retry_after else None
    status = upstream_status if 400 <= upstream_status < 500 else 502
    return UpstreamError(status, message, upstream_status=upstream_status, headers=headers)


def error_type(status: int) -> str:
    """The error ``type`` both OpenAI and Anthropic use for a status."""
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        415: "invalid_request_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        504: "timeout_error",
    }.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


class Untranslatable(ProxyError):
    """What a client sent has no counterpart in the wire format of the provider it was
    routed to: a 400 naming it (the pipeline adds the provider), never a silent drop."""

    def __init__(self, what: str, target_format: str) -> None:
        api = {"openai": "OpenAI Chat Completions", "anthropic": "Anthropic Messages"}
        super().__init__(400, f"{what} cannot be translated to the "
                              f"{api.get(target_format, target_format)} API",
                         code="untranslatable", stage="upstream")
