"""Numeric request parameters checked before anything else sees them: a negative or
absurd ``max_tokens`` (or temperature, ``n``...) is the client's error, a 400 naming the
field, not something to pass on to a provider."""

from __future__ import annotations

import math
from typing import Any

from proxy.canonical import Request
from proxy.errors import BadRequest

# No model answers with more; anything beyond is a mistake or a probe.
MAX_TOKENS_LIMIT = 10_000_000

# Parameters the proxy does not model but both APIs define: field -> (integer?, min, max).
_EXTRA_RANGES: dict[str, tuple[bool, float, float]] = {
    "max_completion_tokens": (True, 1, MAX_TOKENS_LIMIT),
    "n": (True, 1, 128),
    "top_k": (True, 0, 1_000_000),
    "top_logprobs": (True, 0, 20),
    "presence_penalty": (False, -2.0, 2.0),
    "frequency_penalty": (False, -2.0, 2.0),
    "seed": (True, -(2**63), 2**63 - 1),
}


_NUMBERS = (int, float)


def _check(field: str, value: Any, integer: bool, low: float, high: float) -> None:
    kind = "an integer" if integer else "a number"
    numeric = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise BadRequest(f"Invalid request: {field} must be {kind}, not "
                         f"{type(value).__name__}", code="invalid_parameter")
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        shown = value if abs(value) < 1e12 else f"{value:.3g}"
        raise BadRequest(f"Invalid request: {field} must be between {_number(low)} and "
                         f"{_number(high)}, not {shown}", code="invalid_parameter")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_parameters(request: Request, client_format: str) -> None:
    """Raises ``BadRequest`` naming the first numeric parameter out of its range."""
    # Each is checked in full (``_check``) unless it is plainly fine: an int (a float)
    # within its range, which a bool, NaN or an infinity never is.
    value: Any = request.max_tokens
    if value is not None and not (type(value) is int and 1 <= value <= MAX_TOKENS_LIMIT):
        name = "max_tokens" if client_format == "anthropic" else \
            "max_tokens (or max_completion_tokens)"
        _check(name, value, True, 1, MAX_TOKENS_LIMIT)
    value = request.temperature
    if value is not None and not (type(value) in _NUMBERS and 0.0 <= value <= 2.0):
        _check("temperature", value, False, 0.0, 2.0)
    value = request.top_p
    if value is not None and not (type(value) in _NUMBERS and 0.0 <= value <= 1.0):
        _check("top_p", value, False, 0.0, 1.0)
    extra = request.extra
    if not extra or extra.keys().isdisjoint(_EXTRA_RANGES):
        return  # most requests: none of them
    for field, (integer, low, high) in _EXTRA_RANGES.items():
        value = extra.get(field)
        if value is not None:
            _check(field, value, integer, low, high)
