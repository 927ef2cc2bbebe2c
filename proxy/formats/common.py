"""Pieces both wire formats share."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

import msgspec

from proxy.errors import BadRequest

_decode = msgspec.json.Decoder().decode


def decode_json(body: bytes) -> dict[str, Any]:
    """Decodes a client's request body; malformed JSON is a 400 naming the position."""
    try:
        raw = _decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Invalid JSON in request body: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("Invalid JSON in request body: nested too deeply",
                         code="invalid_json") from None
    if not isinstance(raw, dict):
        raise BadRequest("Invalid request: the body must be a JSON object")
    return raw


def known_extra(raw: dict[str, Any], known: AbstractSet[str]) -> dict[str, Any]:
    """The fields of ``raw`` the proxy does not model, kept to pass through untouched."""
    if raw.keys() <= known:  # the usual case, decided in C
        return {}
    return {k: v for k, v in raw.items() if k not in known}


def parse_data_url(url: str) -> tuple[str, str]:
    """``data:image/png;base64,AAAA`` -> ("image/png", "AAAA"); other URLs -> ("", "")."""
    if not url.startswith("data:"):
        return "", ""
    header, _, data = url[5:].partition(",")
    media_type = header.split(";", 1)[0]
    return media_type, data
