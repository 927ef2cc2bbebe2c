"""Typed plugin settings: a plugin describes its settings as a msgspec Struct and gets
validation (naming the bad key) and conversion from these two helpers.

A request may change only the settings a plugin marks client-adjustable in that Struct
(the module's ``Settings``)::

    class Settings(msgspec.Struct):
        shout: Annotated[bool, client_adjustable] = False   # a request may set this
        blocked: list[str] = []                             # the operator's alone
"""

from __future__ import annotations

import typing
from collections import OrderedDict
from typing import Any, TypeVar

import msgspec

from proxy.textmatch import regex_problem

T = TypeVar("T")

# Marks a settings field a request may set for itself (see the module docstring).
client_adjustable = msgspec.Meta(extra={"hookproxy": "client_adjustable"})
_converted: OrderedDict[int, tuple[dict[str, Any], type, Any]] = OrderedDict()
_KEEP = 256


def settings_error(settings: dict[str, Any], kind: type) -> str | None:
    """What is wrong with ``settings`` for the Struct ``kind``, or None."""
    try:
        msgspec.convert(settings, kind)
    except msgspec.ValidationError as exc:
        return str(exc).replace("`$.", "`")
    return None


def regex_error(patterns: dict[str, str] | list[str], where: str) -> str | None:
    """What is wrong with the first pattern in ``patterns`` that RE2 cannot run, or None."""
    items = patterns.items() if isinstance(patterns, dict) else enumerate(patterns)
    for key, pattern in items:
        problem = regex_problem(pattern)
        if problem:
            return f"{where}.{key}: {problem}"
    return None


def client_adjustable_fields(kind: object) -> frozenset[str]:
    """The fields of the settings Struct ``kind`` marked ``client_adjustable``."""
    if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
        return frozenset()
    found = set()
    for name, hint in typing.get_type_hints(kind, include_extras=True).items():
        if typing.get_origin(hint) is typing.Annotated and any(
                isinstance(meta, msgspec.Meta) and (meta.extra or {}).get("hookproxy")
                == "client_adjustable" for meta in hint.__metadata__):
            found.add(name)
    return frozenset(found)


def settings_as(settings: dict[str, Any], kind: type[T]) -> T:
    """``settings`` converted to ``kind``; converted once per settings dict."""
    # Keyed by the dict alone (each plugin converts its settings to its one kind): no key
    # to build per call. The entry holds the dict, so its id is not reused meanwhile.
    hit = _converted.get(id(settings))
    if hit is not None and hit[0] is settings and hit[1] is kind:
        return hit[2]
    value = msgspec.convert(settings, kind)
    _converted[id(settings)] = (settings, kind, value)
    if len(_converted) > _KEEP:
        _converted.popitem(last=False)
    return value
