"""What a request may cost before it runs, and what it did cost once it is over.

Limits reserve before the provider call (``reservation``) and settle after it
(``account_usage`` then ``ctx.cost``): the provider's own usage when it reported it, else
an estimate from the prompt and what was streamed — a stream the client cut off, or one
that broke midway, was still generated, and the provider bills it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from proxy.canonical import Response, TextPart, ThinkingPart, ToolCallPart
from proxy.context import RequestContext
from proxy.providers.mock import estimate_request_tokens, estimate_tokens

if TYPE_CHECKING:
    from proxy.routing import Target

MICRO = 1_000_000  # money is counted in millionths of the price currency


class Ledger(msgspec.Struct, omit_defaults=True):
    """What limits held for a request and what they charged it, for the record."""

    reserved_tokens: int = 0
    reserved_cost: float = 0.0
    tokens: int = 0
    cost: float = 0.0
    # The charge is an estimate: the provider reported no (or no final) usage.
    estimated: bool = False
    # Budgets this request's spending carried past their warn threshold.
    warnings: list[str] = []
    # The limits store could not be reached; the configured fail mode let it through.
    unchecked: bool = False


def reservation(ctx: RequestContext, targets: Sequence[Target], default_output: int
                ) -> tuple[int, int]:
    """The tokens and the money (in ``MICRO``) a request may use: its estimated input
    plus its ``max_tokens`` (or ``default_output``; none for embeddings), at the dearest
    of the targets that may answer it (a fallback may). A request nothing has decoded
    whole is estimated from its body's size, which is never less than its text's."""
    request = ctx.decoded_request
    if request is not None:
        input_tokens = estimate_request_tokens(request)
    else:
        input_tokens = max(1, len(ctx.undecoded_body) // 4)
    fields = ctx.request_fields
    output_tokens = 0 if ctx.endpoint.endswith("/embeddings") else \
        fields.max_tokens or default_output
    cost = max((input_tokens * t.input_price + output_tokens * t.output_price
                for t in targets), default=0.0)
    return input_tokens + output_tokens, round(cost * MICRO / 1e6)


def account_usage(ctx: RequestContext) -> None:
    """Fills in the usage of an answer the provider did not finish reporting: a stream cut
    off by the client or broken midway, or a provider that reports no usage. Marks
    ``ctx.usage_estimated``. An answer with the provider's complete usage is left alone."""
    response = ctx.response
    if response is None or ctx.provider in (None, "plugin"):
        return
    usage = response.usage
    finished = ctx.error is None
    if finished and (usage.input_tokens or usage.output_tokens):
        return
    output = _output_tokens(response)
    input_tokens = usage.input_tokens or estimate_request_tokens(ctx.request)
    output_tokens = max(usage.output_tokens, output)
    if (input_tokens, output_tokens) == (usage.input_tokens, usage.output_tokens):
        return
    response.usage = msgspec.structs.replace(usage, input_tokens=input_tokens,
                                             output_tokens=output_tokens)
    ctx.usage_estimated = True


def charged(ctx: RequestContext) -> tuple[int, int, bool]:
    """Tokens and money (in ``MICRO``) to charge a finished request, and whether that is
    an estimate. Without an answer: its prompt if a provider call was under way when the
    client left (the provider read it), else nothing."""
    response = ctx.response
    if response is not None:
        usage = response.usage
        return (usage.input_tokens + usage.output_tokens, round(ctx.cost * MICRO),
                ctx.usage_estimated)
    # A count (POST /v1/messages/count_tokens) generates nothing and is never billed.
    if ctx.status == 499 and ctx.provider not in (None, "plugin") and \
            not ctx.endpoint.endswith("/count_tokens"):
        tokens = estimate_request_tokens(ctx.request)
        return tokens, round(tokens * ctx.price[0]), True
    return 0, 0, False


def _output_tokens(response: Response) -> int:
    total = 0
    for part in response.content:
        if isinstance(part, TextPart):
            total += estimate_tokens(part.text)
        elif isinstance(part, ToolCallPart):
            total += estimate_tokens(part.name + part.arguments)
        elif isinstance(part, ThinkingPart):
            total += estimate_tokens(part.thinking)
    return total

