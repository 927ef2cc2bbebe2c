"""The strings inside a JSON text (a tool call's arguments, a tool's schema), read and
changed in place: what content checks read of a JSON value is what its strings say once
their escapes are undone, and what they change in it must leave it JSON.

The strings are found by one linear scan of the text (RE2), once msgspec has checked it
is JSON (without building it); nothing is decoded into Python containers or walked
recursively, and the text keeps its layout where nothing changed. A text nested deeper
than msgspec reads (about a thousand levels) is not JSON here: it is read as plain text.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from proxy.textmatch import regex

# A JSON string token: in a valid JSON text, each match is exactly one of its strings
# (keys included), since no string holds an unescaped quote.
_STRING = regex(r'"(?:[^"\\]|\\.)*"')
_decode_string = msgspec.json.Decoder(str).decode
_check = msgspec.json.Decoder(msgspec.Raw).decode  # validates, builds nothing
_encode = msgspec.json.Encoder().encode


def is_json(text: str) -> bool:
    """Whether ``text`` is one valid JSON value."""
    try:
        _check(text)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _value(token: str) -> str:
    inner = token[1:-1]
    return _decode_string(token) if "\\" in inner else inner


def strings_of(text: str) -> str:
    """The strings of the JSON text ``text`` (keys and values, escapes undone), one a
    line. ``text`` must be valid JSON (``is_json``)."""
    if '"' not in text:
        return ""
    return "\n".join(_value(m.group()) for m in _STRING.finditer(text))


def replace_strings(text: str, change: Callable[[str], str]) -> str:
    """The JSON text ``text`` with each of its strings (keys and values) replaced by
    ``change(string)``, encoded again; the rest as it was. ``text`` itself when nothing
    changed. ``text`` must be valid JSON (``is_json``)."""
    pieces: list[str] = []
    position = 0
    for match in _STRING.finditer(text):
        value = _value(match.group())
        changed = change(value)
        if changed is value or changed == value:
            continue
        pieces.append(text[position:match.start()])
        pieces.append(_encode(changed).decode())
        position = match.end()
    if not pieces:
        return text
    pieces.append(text[position:])
    return "".join(pieces)
