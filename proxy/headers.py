"""Headers that plugins add: to the client's answer (``ctx.response_headers``) and to the
provider call (``ctx.upstream_headers``).

Both are checked when a plugin sets them, so that a mistake fails that plugin's hook
(reported under its name) instead of reaching the wire: a name must be an HTTP token and
not one hookproxy owns, a value is made safe the way every header hookproxy writes is
(percent-encoded past printable ASCII), and neither map grows without bound. A plugin can
never set a credential for the provider: a name that reads like one (``authorization``,
``x-api-key``, ``*-token``...) is refused, and headers the operator configured for the
provider win over a plugin's.
"""

from __future__ import annotations

import re
import string
import urllib.parse
from collections.abc import Iterator, MutableMapping

# Printable ASCII but "%", which marks what was encoded.
_HEADER_SAFE = (string.punctuation + " ").replace("%", "")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A plugin's header value, once encoded, and how many headers one map holds.
MAX_VALUE_BYTES = 8 * 1024
MAX_HEADERS = 64
# How a message travels, not what it says: never a plugin's to set, either way.
_FRAMING = frozenset({
    "connection", "content-encoding", "content-length", "content-type", "expect", "host",
    "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "accept-encoding",
})


# Clients refuse answers with large headers (Node's default limit is 16 KB for all of
# them), and a model name or a tag can be as long as a client or a plugin makes it.
MAX_HEADER_VALUE = 1024


def encoded_value(value: str) -> str:
    """``value`` fit for a header: anything beyond printable ASCII (non-Latin-1 text, CR
    and LF that would end the header) is percent-encoded as UTF-8."""
    if value.isascii() and value.isprintable() and "%" not in value:
        return value
    return urllib.parse.quote(value, safe=_HEADER_SAFE)


def header_value(value: str) -> str:
    """``value`` encoded (``encoded_value``) for one of hookproxy's own headers, and past
    ``MAX_HEADER_VALUE`` characters cut, ending in "..."."""
    encoded = encoded_value(value)
    if len(encoded) <= MAX_HEADER_VALUE:
        return encoded
    room = MAX_HEADER_VALUE - 3
    if encoded is value:
        return value[:room] + "..."
    pieces = []  # whole characters, so that no character's escapes are split
    for char in value[:room]:
        piece = urllib.parse.quote(char, safe=_HEADER_SAFE)
        room -= len(piece)
        if room < 0:
            break
        pieces.append(piece)
    return "".join(pieces) + "..."


class CheckedHeaders(tuple[tuple[bytes, bytes], ...]):
    """An answer's headers as hookproxy made them: every name an HTTP token in lower case
    (a plugin's is checked as it is set), every value printable ASCII (``encoded_value``).
    ``proxy.connections.fast_send`` writes them without checking each again. A tuple: a
    header added later, which nothing would have checked, fails loudly instead."""

    __slots__ = ()


def _response_name_error(name: str) -> str | None:
    if name in _FRAMING or name == "x-request-id" or name.startswith("x-hookproxy-"):
        return "hookproxy sets it itself"
    return None


def _upstream_name_error(name: str) -> str | None:
    from proxy.record import is_secret_key  # proxy.record needs the context, which needs this

    if name in _FRAMING:
        return "hookproxy sets it itself"
    if is_secret_key(name) or name in ("cookie", "proxy-authorization"):
        return "it reads like a credential, and a provider's credentials are the operator's"
    return None


class HeaderMap(MutableMapping[str, str]):
    """Headers a plugin sets, by lower-case name; each set is checked (``ValueError``
    naming the header for one that may not be set or is too long)."""

    def __init__(self, side: str) -> None:
        self.side = side  # "response" or "upstream"
        self._name_error = _response_name_error if side == "response" else _upstream_name_error
        self._headers: dict[str, str] = {}
        # Set once the client's answer has its headers: later ones could not be sent.
        self.sent = False

    def __setitem__(self, name: str, value: str | int) -> None:
        if not isinstance(name, str) or not TOKEN.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name")
        name = name.lower()
        problem = self._name_error(name)
        if problem:
            raise ValueError(f"a plugin may not set the {self.side} header {name!r}: {problem}")
        if self.sent:
            raise RuntimeError(f"the {self.side} header {name!r} was set after the answer's "
                               "headers had gone out (a stream's go with its first event)")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(f"header {name!r}: the value must be text or an integer")
        encoded = encoded_value(str(value))
        if len(encoded) > MAX_VALUE_BYTES:
            raise ValueError(f"header {name!r} is longer than {MAX_VALUE_BYTES} bytes")
        if name not in self._headers and len(self._headers) >= MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} {self.side} headers may be set")
        self._headers[name] = encoded

    def __getitem__(self, name: str) -> str:
        return self._headers[name.lower()]

    def __delitem__(self, name: str) -> None:
        del self._headers[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)

    def __repr__(self) -> str:
        return f"HeaderMap({self.side}, {self._headers!r})"
