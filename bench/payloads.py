"""Agent-sized requests for the benchmark: the shape a coding agent sends every turn.

A system prompt, a dozen tool definitions, and a long history of user turns, assistant
tool calls and tool results (file contents, command output), about 200 KB in all, in
both client formats. ``turn=2`` is the same conversation one exchange later: the whole
history again plus one new assistant answer and one new user message, as agents resend it.
Deterministic, so every run and every contender gets the same bytes.
"""

from __future__ import annotations

import json
import random
from typing import Any

TOOLS = [
    ("read_file", "Read a file from the workspace.", {"path": "string", "offset": "integer"}),
    ("write_file", "Write a file in the workspace.", {"path": "string", "content": "string"}),
    ("edit_file", "Replace text in a file.", {"path": "string", "old": "string",
                                              "new": "string"}),
    ("list_dir", "List a directory.", {"path": "string"}),
    ("grep", "Search files for a pattern.", {"pattern": "string", "path": "string"}),
    ("run", "Run a shell command.", {"command": "string", "timeout": "integer"}),
    ("git_diff", "Show the working tree diff.", {"path": "string"}),
    ("git_log", "Show recent commits.", {"count": "integer"}),
    ("web_fetch", "Fetch a URL.", {"url": "string"}),
    ("todo", "Update the task list.", {"items": "array"}),
    ("ask_user", "Ask the user a question.", {"question": "string"}),
    ("finish", "Report the task as done.", {"summary": "string"}),
]

_WORDS = ["the", "request", "pipeline", "routes", "each", "call", "to", "a", "provider",
          "by", "model", "name", "and", "tags", "while", "plugins", "observe", "errors",
          "dashboard", "streams", "records", "over", "server", "sent", "events", "so",
          "operators", "can", "watch", "latency", "cost", "tokens", "for", "every", "tenant"]


def _schema(params: dict[str, str]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, kind in params.items():
        properties[name] = {"type": kind, "description": f"The {name} to use."}
        if kind == "array":
            properties[name]["items"] = {"type": "string"}
    return {"type": "object", "properties": properties, "required": list(params)}


def _code(rng: random.Random, lines: int) -> str:
    out = []
    for i in range(lines):
        indent = "    " * rng.randint(0, 2)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
        out.append(f"{indent}value_{i} = compute({words!r})  # step {i}")
    return "\n".join(out)


def _history(turn: int, size: int, salt: str = "") -> list[dict[str, Any]]:
    """Neutral history items: ("user", text) / ("call", id, name, args) / ("result", id,
    text) / ("assistant", text), until about ``size`` bytes. A ``salt`` starts every text,
    so that conversations with different salts share no message."""
    items = _plain_history(turn, size)
    if salt:
        for item in items:
            item["text"] = f"{salt} {item['text']}"
    return items


def _plain_history(turn: int, size: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    items: list[dict[str, Any]] = [{"kind": "user", "text": (
        "Please fix the failing test in tests/test_routing.py and explain what was wrong. "
        "Contact me at dev.lead@example.com if anything is unclear.")}]
    total, step = 0, 0
    while total < size:
        call_id = f"call_{step:04d}"
        name, _, params = TOOLS[step % len(TOOLS)]
        args = json.dumps({p: (f"src/module_{step}.py" if kind == "string" else 1)
                           for p, kind in params.items()})
        result = _code(rng, 40)
        items.append({"kind": "call", "id": call_id, "name": name, "args": args,
                      "text": f"Let me look at step {step} with {name}."})
        items.append({"kind": "result", "id": call_id, "text": result})
        total += len(result) + len(args) + 40
        step += 1
        if step % 10 == 0:
            items.append({"kind": "user", "text": f"Keep going; note {step} is fine."})
    if turn >= 2:
        items.append({"kind": "assistant", "text": "I changed the retry loop; the test "
                                                  "passes now. Anything else?"})
        items.append({"kind": "user", "text": "Yes: also add a test for the cooldown."})
    return items


SYSTEM = ("You are a coding agent working in a Python repository. Use the tools to read and "
          "change files, run the tests, and report what you did. Be precise.")


def openai_body(turn: int = 1, size: int = 190_000, stream: bool = False,
                model: str = "bench-model", salt: str = "") -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for item in _history(turn, size, salt):
        if item["kind"] == "user":
            messages.append({"role": "user", "content": item["text"]})
        elif item["kind"] == "assistant":
            messages.append({"role": "assistant", "content": item["text"]})
        elif item["kind"] == "call":
            messages.append({"role": "assistant", "content": item["text"], "tool_calls": [{
                "id": item["id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["args"]}}]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["id"],
                             "content": item["text"]})
    return {"model": model, "max_tokens": 64, "stream": stream, "messages": messages,
            "tools": [{"type": "function", "function": {
                "name": n, "description": d, "parameters": _schema(p)}} for n, d, p in TOOLS]}


def anthropic_body(turn: int = 1, size: int = 190_000, stream: bool = False,
                   model: str = "bench-model", salt: str = "") -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for item in _history(turn, size, salt):
        if item["kind"] in ("user", "assistant"):
            role = item["kind"]
            block: dict[str, Any] = {"type": "text", "text": item["text"]}
            # Consecutive same-role turns merge, as the Messages API wants.
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"].append(block)
            else:
                messages.append({"role": role, "content": [block]})
        elif item["kind"] == "call":
            messages.append({"role": "assistant", "content": [
                {"type": "text", "text": item["text"]},
                {"type": "tool_use", "id": item["id"], "name": item["name"],
                 "input": json.loads(item["args"])}]})
        else:
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": item["id"], "content": item["text"]}]})
    return {"model": model, "max_tokens": 64, "stream": stream, "system": SYSTEM,
            "messages": messages,
            "tools": [{"name": n, "description": d, "input_schema": _schema(p)}
                      for n, d, p in TOOLS]}


if __name__ == "__main__":
    for build in (openai_body, anthropic_body):
        for turn in (1, 2):
            body = json.dumps(build(turn))
            print(build.__name__, turn, f"{len(body):,} bytes",
                  len(json.loads(body)["messages"]), "messages")
