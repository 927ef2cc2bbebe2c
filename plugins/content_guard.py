"""content_guard: refuses requests whose prompt matches configured patterns.

    [plugins.content_guard]
    patterns = ["(?i)\\bcredit card number\\b", "(?i)ignore (all )?previous instructions"]
    action = "reject"          # "reject": an error with `status`; "refuse": a canned answer
    status = 400
    message = "This request is not allowed by the proxy's content policy."
    unreadable = "pass"        # or "reject": refuse what it cannot read (images, PDFs...)

The patterns run on RE2, all at once and in time linear in the text. Each message is
checked as one text (its parts joined as the provider joins them), with the system prompt,
tool results and text documents; so are the assistant's tool calls (name and arguments),
its thinking, the tool definitions (name, description, parameter schema with its
descriptions, defaults and enums) and the structured-output schema (``response_format``,
the Responses API's ``text.format``, Anthropic's ``output_config.format``). JSON
(arguments, schemas) is checked as it is written and, where it holds escapes, with its
strings decoded (arguments that are not JSON, with their escapes undone wherever they
stand): ``"launch\u0020codes"`` is caught. Every verdict is remembered by content
(``proxy.memo``): a history, a set of tool definitions or a schema that comes back on
the next turn is not checked again. What holds no text
(images, PDFs, opaque blocks) passes, or with ``unreadable = "reject"`` is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import msgspec

from proxy import (
    Reject,
    Request,
    RequestContext,
    Response,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    hookimpl,
    reports_changes,
)
from proxy.dispatch import no_plugin_context
from proxy.errors import is_error_status
from proxy.jsontext import readable
from proxy.memo import memo
from proxy.settings import regex_error, settings_as, settings_error
from proxy.textmatch import PatternSet, pattern_set

_encode = msgspec.json.Encoder().encode


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    patterns: list[str]
    action: Literal["reject", "refuse"] = "reject"
    status: int = 400
    message: str = "This request is not allowed by the proxy's content policy."
    # Images, binary documents, redacted thinking and blocks hookproxy has no type for
    # hold no text to check: let them through, or refuse the request.
    unreadable: Literal["pass", "reject"] = "pass"


def _matches(patterns: PatternSet, request: Request) -> bool:
    def found(text: str) -> bool:
        return bool(patterns.matching(text))

    def found_in_json(text: str) -> bool:
        return found(text) or ("\\" in text and found(readable(text)))

    what = ("content_guard", patterns.key)
    if any(memo.get_or_compute(what, text, found) for text in request.message_texts()):
        return True
    # One lock for all: an agent's history holds a tool call per turn.
    if any(memo.get_or_compute_all(("content_guard-json", patterns.key),
                                   list(_other_texts(request)), found_in_json)):
        return True
    # Tool definitions and the output schema come back whole every turn: one verdict for
    # each, kept by its JSON text (a pattern may match across two tools: no harm).
    return any(memo.get_or_compute((what, patterns.key), _encode(value),
                                   lambda text: found_in_json(text.decode()))
               for what, value in (("content_guard-tools", request.tools),
                                   ("content_guard-formats", request.output_formats()))
               if value)


def _other_texts(request: Request) -> Iterator[str]:
    """What the provider reads in the messages besides their text (``message_texts``):
    tool calls' names and arguments (JSON), and thinking."""
    for message in reversed(request.messages):
        for part in message.content:
            if isinstance(part, ToolCallPart):
                yield part.name
                yield part.arguments
            elif isinstance(part, ThinkingPart) and part.thinking:
                yield part.thinking


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    problem = settings_error(settings, Settings) or regex_error(settings["patterns"],
                                                                "patterns")
    if problem is None and not is_error_status(settings.get("status", 400)):
        problem = f"status must be an HTTP error status (400-599), not {settings['status']!r}"
    return problem


@hookimpl(trylast=True)
@reports_changes  # changes nothing in the request
@no_plugin_context
def request_start(ctx: RequestContext, settings: dict[str, Any]) -> Response | None:
    config = settings_as(settings, Settings)
    if config.unreadable == "reject":
        unreadable = ctx.request.unreadable()
        if unreadable:
            raise Reject(config.status, f"{config.message} (content that cannot be checked: "
                                        f"{', '.join(unreadable[:5])})", code="content_policy")
    if not config.patterns or not _matches(pattern_set(tuple(config.patterns)), ctx.request):
        return None
    if config.action == "reject":
        raise Reject(config.status, config.message, code="content_policy")
    return Response(id=f"guard-{ctx.request_id}", model=ctx.request.model,
                    content=[TextPart(text=config.message)], finish_reason="content_filter")
