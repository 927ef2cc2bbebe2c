"""Which text of a request a classifier looks at."""

from __future__ import annotations

from typing import Literal

from proxy import Request, TextPart

Scope = Literal["last", "messages", "all"]


def scoped_text(request: Request, scope: Scope) -> str:
    """``last``: the last user message; ``messages``: every message (not the system
    prompt, which is the same for every request of an app); ``all``: everything."""
    if scope == "all":
        return request.prompt_text()
    messages = request.messages
    if scope == "last":
        users = [m for m in messages if m.role == "user" and m.text]
        messages = users[-1:]
    return "\n".join(p.text for m in messages for p in m.content if isinstance(p, TextPart))
