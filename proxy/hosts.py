"""Which ``Host`` a request may name. A web page can make a browser send requests to a
local proxy through a DNS name the attacker controls that resolves to 127.0.0.1 (DNS
rebinding); the Host header still carries the attacker's name, and is refused here."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import MutableMapping
from typing import Any, Protocol

from proxy.endpoints import refusal_wire, shown_path
from proxy.errors import ProxyError
from proxy.ids import new_request_id

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})

Scope = MutableMapping[str, Any]


class _Gateway(Protocol):
    bind_host: str

    @property
    def allowed_hosts(self) -> list[str]: ...

    def rejected(self, request_id: str, endpoint: str, client_format: str,
                 error: ProxyError, started_wall: float, started: float) -> None: ...


def host_name(header: str) -> str:
    """``Host`` without its port, lower case; ``[::1]:8080`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, _, port = header.rpartition(":")
    return (name if name and port.isdigit() else header).rstrip(".")


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(header: str, allowed: list[str], bind_host: str) -> bool:
    name = host_name(header)
    if allowed:
        for pattern in allowed:
            pattern = pattern.lower()
            if pattern == "*" or pattern == name or (
                    pattern.startswith("*.") and name.endswith(pattern[1:])):
                return True
        return False
    if bind_host in _ANY_ADDRESS:
        return True
    return _is_loopback(name) or name == host_name(bind_host)


# Host values whose verdict is kept (clients send a few; a flood of others only cycles it).
_KNOWN_HOSTS = 256


class HostCheck:
    """Whether a request's Host may be served (verdicts are cached per Host value), and the
    refusal of one that may not: a 421 in the client's own error format; an API request
    refused this way still leaves a record. ``proxy.front.Front`` asks it per request."""

    def __init__(self, gateway: _Gateway) -> None:
        self.gateway = gateway
        # Host header -> allowed, for the allowed list and bind address it was judged by.
        self._verdicts: dict[bytes, bool] = {}
        self._judged_by: tuple[list[str], str] | None = None

    def allowed(self, host: bytes) -> bool:
        gateway = self.gateway
        rules = (gateway.allowed_hosts, gateway.bind_host)
        if rules != self._judged_by:
            self._verdicts.clear()  # a reload (or --host) changed the rules
            self._judged_by = rules
        verdict = self._verdicts.get(host)
        if verdict is None:
            if len(self._verdicts) >= _KNOWN_HOSTS:
                self._verdicts.clear()
            verdict = self._verdicts[host] = host_allowed(
                host.decode("latin-1"), rules[0], rules[1])
        return verdict

    async def refuse(self, scope: Scope, send: Any, host: bytes) -> None:
        started, started_wall = time.perf_counter(), time.time()
        request_id = new_request_id()
        shown = host.decode("latin-1")[:100].encode("unicode_escape").decode()
        error = ProxyError(421, f"Host {shown!r} is not served here: add it to "
                                "[server].allowed_hosts if clients use that name",
                           code="host_not_allowed")
        path = scope["path"]
        # By the path and anthropic-version, as any refusal before an endpoint.
        wire = refusal_wire(path, scope["headers"])
        if path.startswith(("/v1/", "/chat/")) and scope["method"] == "POST":
            self.gateway.rejected(request_id, shown_path(path), wire.NAME, error,
                                  started_wall, started)
        body = wire.encode_error(error)
        await send({"type": "http.response.start", "status": 421, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
