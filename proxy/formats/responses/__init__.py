"""OpenAI Responses API wire format (``POST /v1/responses``), both ways.

Client side: ``decode_request`` and ``encode_response`` / ``StreamEncoder``.
Provider side (a provider whose ``responses = true``): ``encode_request`` and
``decode_response`` / ``StreamDecoder``. Any other provider gets the request through
``for_format``: the canonical request as that provider's encoder takes it, or a 400 naming
what has no counterpart there.

Lossless like the other formats: an item, part, field or event the canonical model does
not know is kept as it came (``OpaquePart``, ``extra``, ``WireEvent``) and written back to
this format unchanged; an input item no plugin changed goes back as the very JSON it came
as.
"""

from __future__ import annotations

from proxy.formats.responses.common import NAME
from proxy.formats.responses.request import (
    decode_request,
    encode_request,
    for_format,
    input_items,
    stream_body,
)
from proxy.formats.responses.response import (
    decode_response,
    encode_error,
    encode_response,
    output_items,
    response_object,
)
from proxy.formats.responses.stream import StreamDecoder, StreamEncoder

__all__ = [
    "NAME",
    "StreamDecoder",
    "StreamEncoder",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_response",
    "for_format",
    "input_items",
    "output_items",
    "response_object",
    "stream_body",
]
