"""The strings inside a JSON text (a tool call's arguments, a tool's schema), read and
changed in place: what content checks read of a JSON value is what its strings say once
their escapes are undone, and what they change in it must leave it JSON.

The strings are found by one linear scan of the text (RE2), once msgspec has checked it
is JSON (without building it); nothing is decoded into Python containers or walked
recursively, and the text keeps its layout where nothing changed.

A text that is not JSON (cut short, trailing junk, nested deeper than msgspec reads: about
a thousand levels) is read as text with its escapes undone wherever they stand
(``Unescaped``): a provider passes such arguments to the model as text, escapes and all,
and ``"launch\\u0020codes"`` reads as "launch codes" there too.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable

import msgspec

from proxy.textmatch import regex

# A JSON string token: in a valid JSON text, each match is exactly one of its strings
# (keys included), since no string holds an unescaped quote.
_STRING = regex(r'"(?:[^"\\]|\\.)*"')
_decode_string = msgspec.json.Decoder(str).decode
_check = msgspec.json.Decoder(msgspec.Raw).decode  # validates, builds nothing
_encode = msgspec.json.Encoder().encode
# A backslash and what it escapes: a surrogate pair, a \uXXXX, or any one character
# (read as written when JSON has no such escape). Python's own engine: this fixed pattern
# of fixed-length branches is linear there too, and costs a twentieth of what RE2's
# wrapper costs per match (a text can hold an escape every few characters).
_ESCAPE = re.compile(r"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                     r"|u[0-9a-fA-F]{4}|.)", re.DOTALL)
_SIMPLE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
           "t": "\t"}


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


def readable(text: str) -> str:
    """What content checks read of a JSON text: its strings, escapes undone, one a line
    (``strings_of``) when it is JSON; otherwise the text with its escapes undone
    (``Unescaped``)."""
    if is_json(text):
        return strings_of(text)
    return Unescaped(text).text if "\\" in text else text


def _unescaped(escape: str) -> str:
    """What one escape stands for; itself when it stands for nothing JSON allows (a lone
    surrogate would make a string no encoder takes)."""
    if escape[1] != "u" or len(escape) == 2:
        return _SIMPLE.get(escape[1], escape)
    code = int(escape[2:6], 16)
    if len(escape) == 12:
        return chr(0x10000 + ((code - 0xD800) << 10) + int(escape[8:12], 16) - 0xDC00)
    return escape if 0xD800 <= code < 0xE000 else chr(code)


class Unescaped:
    """A text read with every JSON escape in it undone, wherever it stands (one linear
    scan; an unclosed string or a stray quote moves no boundary, as it would for a scan
    of string tokens), and the way back from a span of what was read to the span of the
    text it was read from: a value found in ``text`` is replaced in the original, whole
    escapes and all, and the rest of it stays byte for byte."""

    __slots__ = ("_at", "_raw", "_raw_end", "_read_end", "text")

    def __init__(self, raw: str) -> None:
        pieces: list[str] = []
        self._at: list[int] = []  # where each escape's reading starts in ``text``
        self._read_end: list[int] = []
        self._raw: list[int] = []  # where each escape starts and ends in ``raw``
        self._raw_end: list[int] = []
        position = read = 0
        for match in _ESCAPE.finditer(raw):
            start, end = match.span()
            value = _unescaped(match.group())
            pieces.append(raw[position:start])
            pieces.append(value)
            read += start - position
            self._at.append(read)
            read += len(value)
            self._read_end.append(read)
            self._raw.append(start)
            self._raw_end.append(end)
            position = end
        pieces.append(raw[position:])
        self.text = "".join(pieces)

    def _unit(self, offset: int) -> tuple[int, int]:
        """The span of the original that the character at ``offset`` of ``text`` was
        read from: its escape's, or its own."""
        i = bisect_right(self._at, offset) - 1
        if i < 0:
            return offset, offset + 1
        if offset < self._read_end[i]:
            return self._raw[i], self._raw_end[i]
        raw = self._raw_end[i] + offset - self._read_end[i]
        return raw, raw + 1

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The span of the original that ``text[start:end]`` (not empty) was read from."""
        return self._unit(start)[0], self._unit(end - 1)[1]
