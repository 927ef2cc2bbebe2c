"""A fake upstream that answers like the real Anthropic Messages API and OpenAI Chat
Completions API, and is as strict as they are: what would fail against the real provider
fails here too, with the real error shape, so a client test through hookproxy shows what a
real user would see.

Anthropic (``POST /v1/messages``, ``POST /v1/messages/count_tokens``):
  - needs the provider's key (``x-api-key`` or a bearer token) and ``anthropic-version``;
  - refuses top-level fields it does not know, ``context_management`` without the
    ``context-management-2025-06-27`` beta header, unknown roles and content block types,
    a custom tool without ``input_schema`` and a server tool with one;
  - with thinking on, refuses a final assistant turn holding ``tool_use`` that does not
    start with its thinking block, and a thinking block whose signature is not the one it
    issued for that text (a changed or re-encoded block); a ``tool_use`` without its
    ``tool_result`` right after;
  - answers (streamed with the full event sequence, or not) with a signed thinking block
    when thinking is on, a ``redacted_thinking`` block when the last user text holds the
    documented trigger string, then a ``tool_use`` from the script or text; usage carries
    cache creation/read tokens, ``context_management`` is answered when asked for.

OpenAI (``POST /v1/chat/completions``): Bearer key, unknown roles and content part types
refused; ``n`` choices, kept apart in streams (every chunk holds a delta per choice).

OpenAI Responses (``POST /v1/responses``, streamed with the full typed event sequence, or
not): Bearer key; refuses fields the API does not know, unknown item and part types and
roles, a ``function_call_output`` without its ``function_call`` before it, a reasoning item
whose ``encrypted_content`` is not the one it issued, and ``previous_response_id`` (it
stores nothing: hookproxy must send the whole conversation). With ``reasoning.effort`` it
answers a reasoning item first; with a ``web_search`` tool and "search" in the prompt, a
``web_search_call`` item (and its events) before the text.

OpenAI embeddings (``POST /v1/embeddings``): Bearer key; ``input`` as a string, strings or
token arrays, ``dimensions`` and ``encoding_format`` (float or base64) as the API has them;
unknown fields refused.

The script: ``StrictUpstream(tool_calls=[("Read", {"file_path": ...}), ...])``. A request
whose conversation already holds k tool results answers with the k-th tool call when its
``tools`` offer that tool, with text once the script is used up. The decision depends only
on the request, so side requests a client makes do not disturb a conversation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.harness import ServedApp

ANTHROPIC_KEY = "sk-ant-strict-upstream"
OPENAI_KEY = "sk-openai-strict-upstream"
REDACTED_TRIGGER = ("ANTHROPIC_MAGIC_STRING_TRIGGER_REDACTED_THINKING_"
                    "46C9A13E193C177646C7398A98432ECCCE4C1253D5E2D82641AC0E52CC2876CB")
CONTEXT_MANAGEMENT_BETA = "context-management-2025-06-27"

_SECRET = b"strict-upstream-signing-key"

MESSAGE_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
    "container", "mcp_servers", "output_config", "output_format", "context_management",
    "inference_geo"})
COUNT_FIELDS = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers",
    "output_config", "output_format", "context_management"})
# Beta fields and the anthropic-beta value each needs.
BETA_FIELDS = {"context_management": CONTEXT_MANAGEMENT_BETA}
BLOCK_TYPES = (
    "bash_code_execution_tool_result", "code_execution_tool_result", "connector_text",
    "container_upload", "document", "image", "mcp_tool_result", "mcp_tool_use",
    "redacted_thinking", "search_result", "server_tool_use", "text",
    "text_editor_code_execution_tool_result", "thinking", "tool_reference", "tool_result",
    "tool_use", "web_fetch_tool_result", "web_search_tool_result")
TOOL_RESULT_BLOCK_TYPES = ("document", "image", "search_result", "text", "tool_reference")
THINKING_FIRST = (
    "When `thinking` is enabled, a final `assistant` message must start with a thinking "
    "block (preceeding the lastmost set of `tool_use` and `tool_result` blocks). We "
    "recommend you include thinking blocks from previous turns. To avoid this requirement, "
    "disable `thinking`. Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking")
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
OPENAI_PART_TYPES = ("text", "image_url", "input_audio", "refusal", "audio", "file")


class Invalid(Exception):
    """A request the real API refuses: status, error type, message."""

    def __init__(self, message: str, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass
class Call:
    """One request as it reached the upstream, and what it was answered."""

    path: str
    query: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int = 200
    error: str = ""
    answer: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


def sign(thinking: str) -> str:
    """The signature this upstream issues for a thinking text (and checks on return)."""
    digest = hmac.new(_SECRET, thinking.encode(), hashlib.sha256).digest()
    return base64.b64encode(b"EqoBCkgIARABGAIiQ" + digest * 3).decode()


def redacted_data(seed: str) -> str:
    """The opaque data of a redacted_thinking block this upstream issues for ``seed``."""
    digest = hmac.new(_SECRET, b"redacted:" + seed.encode(), hashlib.sha256).digest()
    return base64.b64encode(b"EmwKAhgBEgy" + digest * 2).decode()


def walk_blocks(value: Any) -> list[dict[str, Any]]:
    """Every content block at any depth (tool_result content included)."""
    found: list[dict[str, Any]] = []
    if isinstance(value, dict):
        if isinstance(value.get("type"), str):
            found.append(value)
        for item in value.values():
            found.extend(walk_blocks(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(walk_blocks(item))
    return found


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _text_of(content: Any) -> str:
    return "".join(b.get("text", "") for b in _blocks(content)
                   if isinstance(b, dict) and b.get("type") == "text")


def _tool_results(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in _blocks(message.get("content")) if isinstance(b, dict)
            and b.get("type") in ("tool_result", "function_call_output")]


def _estimate_tokens(body: dict[str, Any]) -> int:
    counted = {k: body[k] for k in ("system", "messages", "tools") if k in body}
    return 7 + len(json.dumps(counted, sort_keys=True)) // 4


class StrictUpstream(ServedApp):
    def __init__(self, tool_calls: list[tuple[str, dict[str, Any]]] | None = None,
                 thinking_text: str = "Let me think this through step by step.") -> None:
        super().__init__({"/v1/messages": self.messages,
                          "/v1/messages/count_tokens": self.count_tokens,
                          "/v1/chat/completions": self.chat_completions,
                          "/v1/responses": self.responses,
                          "/v1/embeddings": self.embeddings},
                         client_max_size=64 * 1024 * 1024)
        self.tool_calls = list(tool_calls or [])
        self.thinking_text = thinking_text
        self.calls: list[Call] = []
        self.cached: set[str] = set()
        self.redacted: set[str] = set()

    def __enter__(self) -> StrictUpstream:
        super().__enter__()
        return self

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    def provider(self, fmt: str = "anthropic") -> dict[str, Any]:
        """A hookproxy provider entry for this upstream; the key comes from the
        environment variable the caller sets to ``ANTHROPIC_KEY`` / ``OPENAI_KEY``.
        ``responses``: an OpenAI provider marked as having the Responses API."""
        if fmt == "anthropic":
            return {"type": "anthropic", "base_url": self.url,
                    "api_key_env": "STRICT_UPSTREAM_ANTHROPIC_KEY", "timeout": 60}
        return {"type": "openai", "base_url": self.openai_url,
                "api_key_env": "STRICT_UPSTREAM_OPENAI_KEY", "timeout": 60,
                **({"responses": True} if fmt == "responses" else {})}

    # --- what was received --------------------------------------------------------------

    def on(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    @property
    def messages_calls(self) -> list[Call]:
        return self.on("/v1/messages")

    @property
    def rejections(self) -> list[Call]:
        return [c for c in self.calls if c.status >= 400]

    # --- Anthropic ----------------------------------------------------------------------

    def _record(self, request: web.Request) -> Call:
        call = Call(request.path, request.query_string, dict(request.headers), {})
        self.calls.append(call)
        return call

    async def _read(self, request: web.Request, call: Call) -> None:
        try:
            body = json.loads(await request.read())
        except ValueError as error:
            raise Invalid(f"There was an issue with your request body: {error}") from None
        if not isinstance(body, dict):
            raise Invalid("Input should be an object")
        call.body = body

    def _refuse(self, call: Call, error: Invalid, fmt: str) -> web.Response:
        call.status, call.error = error.status, error.message
        if fmt == "anthropic":
            payload: dict[str, Any] = {
                "type": "error", "error": {"type": error.kind, "message": error.message},
                "request_id": "req_strict_refused"}
        else:
            payload = {"error": {"message": error.message, "type": error.kind,
                                 "param": None, "code": None}}
        call.answer = payload
        return web.json_response(payload, status=error.status,
                                 headers={"request-id": "req_strict_refused"})

    def _check_anthropic_headers(self, call: Call) -> None:
        # The SDKs send the key as x-api-key, newer ones as a bearer token.
        if ANTHROPIC_KEY not in (call.header("x-api-key"),
                                 (call.header("authorization") or "").removeprefix("Bearer ")):
            raise Invalid("invalid x-api-key", 401, "authentication_error")
        if not call.header("anthropic-version"):
            raise Invalid("anthropic-version: header is required")

    def _betas(self, call: Call) -> set[str]:
        value = call.header("anthropic-beta") or ""
        return {b.strip() for b in value.split(",") if b.strip()}

    def _validate(self, call: Call, allowed: frozenset[str]) -> None:
        body = call.body
        for name in body:
            if name not in allowed:
                raise Invalid(f"{name}: Extra inputs are not permitted")
        betas = self._betas(call)
        for name, beta in BETA_FIELDS.items():
            if name in body and beta not in betas:
                raise Invalid(f"{name}: Extra inputs are not permitted")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise Invalid("model: Field required")
        if "max_tokens" in allowed and not isinstance(body.get("max_tokens"), int):
            raise Invalid("max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Invalid("messages: Field required")
        thinking = body.get("thinking") or {}
        if thinking.get("type") == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or budget < 1024:
                raise Invalid("thinking.enabled.budget_tokens: Input should be greater than "
                              "or equal to 1024")
            if "max_tokens" in body and budget >= body["max_tokens"]:
                raise Invalid("`max_tokens` must be greater than `thinking.budget_tokens`. "
                              "Please consult our documentation at https://docs.claude.com/"
                              "en/docs/build-with-claude/extended-thinking#max-tokens-and-"
                              "context-window-size")
        thinking_on = thinking.get("type") in ("enabled", "adaptive")
        if thinking_on and body.get("temperature", 1) != 1:
            raise Invalid("`temperature` may only be set to 1 when thinking is enabled or in "
                          "adaptive mode. Please consult our documentation at https://docs."
                          "claude.com/en/docs/build-with-claude/extended-thinking"
                          "#feature-compatibility")
        self._validate_tools(body.get("tools"))
        self._validate_messages(messages, thinking_on)

    def _validate_tools(self, tools: Any) -> None:
        for i, tool in enumerate(tools or []):
            if not isinstance(tool, dict):
                raise Invalid(f"tools.{i}: Input should be an object")
            kind = tool.get("type", "custom")
            if kind == "custom" and not isinstance(tool.get("input_schema"), dict):
                raise Invalid(f"tools.{i}.custom.input_schema: Field required")
            # A server tool (web_search_20250305, bash_20250124...) has a fixed schema.
            if kind != "custom" and "input_schema" in tool:
                raise Invalid(f"tools.{i}.{kind}.input_schema: Extra inputs are not permitted")

    def _validate_messages(self, messages: list[Any], thinking_on: bool) -> None:
        last_assistant = -1
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise Invalid(f"messages.{i}: Input should be an object")
            role = message.get("role")
            if role not in ("user", "assistant", "system"):
                raise Invalid(f"messages.{i}.role: Input should be 'user', 'assistant' or "
                              "'system'")
            if role == "assistant":
                last_assistant = i
            content = message.get("content")
            if not isinstance(content, str | list):
                raise Invalid(f"messages.{i}.content: Field required")
            for j, block in enumerate(_blocks(content)):
                self._validate_block(block, f"messages.{i}.content.{j}", BLOCK_TYPES)
                if block["type"] == "tool_result" and isinstance(block.get("content"), list):
                    for k, inner in enumerate(block["content"]):
                        self._validate_block(inner, f"messages.{i}.content.{j}.content.{k}",
                                             TOOL_RESULT_BLOCK_TYPES)
            uses = [b["id"] for b in _blocks(content) if b.get("type") == "tool_use"]
            if role == "assistant" and uses and i + 1 < len(messages):
                answered = {b.get("tool_use_id") for b in _tool_results(messages[i + 1])}
                missing = [u for u in uses if u not in answered]
                if missing:
                    raise Invalid(f"messages.{i + 1}: `tool_use` ids were found without "
                                  f"`tool_result` blocks immediately after: "
                                  f"{', '.join(missing)}. Each `tool_use` block must have a "
                                  "corresponding `tool_result` block in the next message.")
            if role == "user" and i > 0:
                previous = messages[i - 1]
                known = {b.get("id") for b in _blocks(previous.get("content"))
                         if isinstance(b, dict) and b.get("type") == "tool_use"}
                for j, block in enumerate(_blocks(content)):
                    if block.get("type") == "tool_result" and block.get(
                            "tool_use_id") not in known:
                        raise Invalid(
                            f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                            f"`tool_result` blocks: {block.get('tool_use_id')}. Each "
                            "`tool_result` block must have a corresponding `tool_use` block "
                            "in the previous message.")
        if thinking_on and last_assistant >= 0:
            blocks = _blocks(messages[last_assistant]["content"])
            if any(b.get("type") == "tool_use" for b in blocks):
                first = blocks[0].get("type") if blocks else "nothing"
                if first not in ("thinking", "redacted_thinking"):
                    raise Invalid(f"messages.{last_assistant}.content.0.type: Expected "
                                  f"`thinking` or `redacted_thinking`, but found `{first}`. "
                                  + THINKING_FIRST)

    def _validate_block(self, block: Any, where: str, types: tuple[str, ...]) -> None:
        if not isinstance(block, dict):
            raise Invalid(f"{where}: Input should be an object")
        kind = block.get("type")
        if kind not in types:
            expected = ", ".join(f"'{t}'" for t in types)
            raise Invalid(f"{where}: Input tag '{kind}' found using 'type' does not match any "
                          f"of the expected tags: {expected}")
        if kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise Invalid(f"{where}.thinking: Field required")
            if block.get("signature") != sign(block["thinking"]):
                raise Invalid(f"{where}: Invalid `signature` in `thinking` block")
        if kind == "redacted_thinking" and block.get("data") not in self.redacted:
            raise Invalid(f"{where}: Invalid `data` in `redacted_thinking` block")
        if kind == "document":
            source = block.get("source")
            if not isinstance(source, dict) or source.get("type") not in (
                    "base64", "url", "text", "content", "file"):
                raise Invalid(f"{where}.source: Field required")

    def _turn(self, body: dict[str, Any]) -> int:
        """How many tool results the conversation already holds."""
        messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
        # OpenAI: one answered turn per run of tool messages; Anthropic: per user turn
        # holding tool results.
        tool_runs = sum(m.get("role") == "tool" and (i == 0 or messages[i - 1].get("role")
                                                      != "tool")
                        for i, m in enumerate(messages))
        return tool_runs + sum(len(_tool_results(m)) > 0 for m in messages
                               if m.get("role") == "user")

    def _planned_tool(self, body: dict[str, Any], names: list[str]
                      ) -> tuple[str, dict[str, Any]] | None:
        turn = self._turn(body)
        if turn < len(self.tool_calls) and self.tool_calls[turn][0] in names:
            return self.tool_calls[turn]
        return None

    def _answer_text(self, messages: list[dict[str, Any]]) -> str:
        for message in reversed(messages):
            if message.get("role") not in ("user", "tool"):
                continue
            results = _tool_results(message)
            if message.get("role") == "tool":
                return "tool said: " + _text_of(message.get("content"))[:200]
            if results:
                content = results[-1].get("content")
                text = content if isinstance(content, str) else _text_of(content)
                return "tool said: " + text.strip()[:200]
            text = _text_of(message.get("content")).strip()
            if text:
                return "answered: " + text.splitlines()[-1][:200]
        return "answered"

    def _usage(self, body: dict[str, Any]) -> dict[str, Any]:
        input_tokens = _estimate_tokens(body)
        cacheable = any("cache_control" in b for b in walk_blocks(
            [body.get("system"), body.get("messages"), body.get("tools")]))
        created = read = 0
        if cacheable:
            key = hashlib.sha256(json.dumps(
                [body.get("system"), body.get("tools")], sort_keys=True).encode()).hexdigest()
            prefix = input_tokens // 2
            if key in self.cached:
                read = prefix
            else:
                created = prefix
                self.cached.add(key)
            input_tokens -= prefix
        return {"input_tokens": input_tokens, "cache_creation_input_tokens": created,
                "cache_read_input_tokens": read,
                "cache_creation": {"ephemeral_5m_input_tokens": created,
                                   "ephemeral_1h_input_tokens": 0},
                "output_tokens": 0, "service_tier": "standard"}

    def _content(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = body["messages"]
        content: list[dict[str, Any]] = []
        if (body.get("thinking") or {}).get("type") in ("enabled", "adaptive"):
            text = f"{self.thinking_text} (turn {self._turn(body)})"
            content.append({"type": "thinking", "thinking": text, "signature": sign(text)})
            last_user: dict[str, Any] = next(
                (m for m in reversed(messages) if m.get("role") == "user"), {})
            if REDACTED_TRIGGER in _text_of(last_user.get("content")):
                data = redacted_data(str(len(messages)))
                self.redacted.add(data)
                content.append({"type": "redacted_thinking", "data": data})
        names = [str(t.get("name")) for t in body.get("tools") or [] if isinstance(t, dict)]
        planned = self._planned_tool(body, names)
        if planned:
            content.append({"type": "tool_use", "id": f"toolu_strict_{self._turn(body)}",
                            "name": planned[0], "input": planned[1]})
        else:
            content.append({"type": "text", "text": self._answer_text(messages)})
        return content

    async def messages(self, request: web.Request) -> web.StreamResponse:
        call = self._record(request)
        try:
            await self._read(request, call)
            self._check_anthropic_headers(call)
            self._validate(call, MESSAGE_FIELDS)
        except Invalid as error:
            return self._refuse(call, error, "anthropic")
        body = call.body
        content = self._content(body)
        usage = self._usage(body)
        stop = "tool_use" if content[-1]["type"] == "tool_use" else "end_turn"
        output_tokens = 3 + sum(len(json.dumps(b)) // 8 for b in content)
        message: dict[str, Any] = {
            "id": f"msg_strict_{len(self.calls)}", "type": "message", "role": "assistant",
            "model": body["model"], "content": content, "stop_reason": stop,
            "stop_sequence": None, "usage": {**usage, "output_tokens": output_tokens}}
        if "context_management" in body:
            message["context_management"] = {"applied_edits": []}
        call.answer = message
        if not body.get("stream"):
            return web.json_response(message, headers={"request-id": f"req_{len(self.calls)}"})
        return await self._stream(request, call, message)

    async def _stream(self, request: web.Request, call: Call, message: dict[str, Any]
                      ) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
            "request-id": f"req_{len(self.calls)}"})
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            payload = {"type": event, **data}
            call.events.append(payload)
            await response.write(f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode())

        usage = message["usage"]
        await send("message_start", {"message": {
            **{k: v for k, v in message.items() if k not in ("context_management", "usage")},
            "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}})
        await send("ping", {})
        for index, block in enumerate(message["content"]):
            kind = block["type"]
            if kind == "thinking":
                await send("content_block_start", {"index": index, "content_block": {
                    "type": "thinking", "thinking": "", "signature": ""}})
                words = block["thinking"].split(" ")
                half = len(words) // 2
                for piece in (" ".join(words[:half]) + " ", " ".join(words[half:])):
                    await send("content_block_delta", {"index": index, "delta": {
                        "type": "thinking_delta", "thinking": piece}})
                await send("content_block_delta", {"index": index, "delta": {
                    "type": "signature_delta", "signature": block["signature"]}})
            elif kind == "redacted_thinking":
                await send("content_block_start", {"index": index, "content_block": block})
            elif kind == "tool_use":
                await send("content_block_start", {"index": index, "content_block": {
                    **block, "input": {}}})
                arguments = json.dumps(block["input"])
                for piece in ("", arguments[:7], arguments[7:]):
                    await send("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": piece}})
            else:
                await send("content_block_start", {"index": index, "content_block": {
                    "type": "text", "text": ""}})
                text = block["text"]
                for piece in (text[:9], text[9:]):
                    await send("content_block_delta", {"index": index, "delta": {
                        "type": "text_delta", "text": piece}})
            await send("content_block_stop", {"index": index})
        delta: dict[str, Any] = {
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                            "cache_read_input_tokens")}
            | {"output_tokens": usage["output_tokens"]}}
        if "context_management" in message:
            delta["context_management"] = message["context_management"]
        await send("message_delta", delta)
        await send("message_stop", {})
        await response.write_eof()
        return response

    async def count_tokens(self, request: web.Request) -> web.Response:
        call = self._record(request)
        try:
            await self._read(request, call)
            self._check_anthropic_headers(call)
            self._validate(call, COUNT_FIELDS)
        except Invalid as error:
            return self._refuse(call, error, "anthropic")
        call.answer = {"input_tokens": _estimate_tokens(call.body)}
        return web.json_response(call.answer)

    # --- OpenAI -------------------------------------------------------------------------

    def _validate_openai(self, call: Call) -> None:
        if call.header("authorization") != f"Bearer {OPENAI_KEY}":
            raise Invalid("Incorrect API key provided.", 401, "invalid_request_error")
        body = call.body
        if not isinstance(body.get("model"), str):
            raise Invalid("you must provide a model parameter")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Invalid("Missing required parameter: 'messages'.")
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in OPENAI_ROLES:
                raise Invalid(f"Invalid value: '{role}'. Supported values are: "
                              + ", ".join(f"'{r}'" for r in OPENAI_ROLES)
                              + f". (param: messages[{i}].role)")
            content = message.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in OPENAI_PART_TYPES:
                    raise Invalid(f"Invalid value: '{kind}'. Supported values are: "
                                  + ", ".join(f"'{t}'" for t in OPENAI_PART_TYPES)
                                  + f". (param: messages[{i}].content[{j}].type)")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        call = self._record(request)
        try:
            await self._read(request, call)
            self._validate_openai(call)
        except Invalid as error:
            return self._refuse(call, error, "openai")
        body = call.body
        n = int(body.get("n") or 1)
        names = [str(t.get("function", {}).get("name")) for t in body.get("tools") or []]
        planned = self._planned_tool(body, names)
        text = self._answer_text(body["messages"])
        texts = [f"choice {i}: {text}" if n > 1 else text for i in range(n)]
        calls: list[dict[str, Any]] | None = (
            [{"id": f"call_strict_{self._turn(body)}", "type": "function", "function": {
                "name": planned[0], "arguments": json.dumps(planned[1])}}]
            if planned else None)
        usage = {"prompt_tokens": _estimate_tokens(body), "completion_tokens": 5 * n,
                 "total_tokens": _estimate_tokens(body) + 5 * n,
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}}
        finish = "tool_calls" if planned else "stop"
        base = {"id": f"chatcmpl-strict{len(self.calls)}", "created": 1,
                "model": body["model"], "system_fingerprint": "fp_strict"}
        if not body.get("stream"):
            choices = [{"index": i, "message": {
                "role": "assistant", "content": None if calls else texts[i],
                "refusal": None, **({"tool_calls": calls} if calls else {})},
                "logprobs": None, "finish_reason": finish} for i in range(n)]
            call.answer = {**base, "object": "chat.completion", "choices": choices,
                           "usage": usage}
            return web.json_response(call.answer)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
            call.events.append(chunk)
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        def each(deltas: list[dict[str, Any]], finish: str | None = None
                 ) -> list[dict[str, Any]]:
            return [{"index": i, "delta": d, "logprobs": None, "finish_reason": finish}
                    for i, d in enumerate(deltas)]

        await send(each([{"role": "assistant", "content": "", "refusal": None}] * n))
        if calls:
            first = {**calls[0], "index": 0, "function": {**calls[0]["function"],
                                                          "arguments": ""}}
            await send(each([{"tool_calls": [first]}] * n))
            arguments = calls[0]["function"]["arguments"]
            for piece in (arguments[:7], arguments[7:]):
                await send(each([{"tool_calls": [{"index": 0, "function": {
                    "arguments": piece}}]}] * n))
        else:
            longest = max(len(t) for t in texts)
            for start in range(0, longest, 8):
                await send(each([{"content": t[start:start + 8]} for t in texts]))
        await send(each([{}] * n, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            await send([], usage=usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # --- OpenAI Responses -----------------------------------------------------------------

    def _validate_responses(self, call: Call) -> None:
        if call.header("authorization") != f"Bearer {OPENAI_KEY}":
            raise Invalid("Incorrect API key provided.", 401, "invalid_request_error")
        body = call.body
        for name in body:
            if name not in RESPONSES_FIELDS:
                raise Invalid(f"Unknown parameter: '{name}'.")
        if not isinstance(body.get("model"), str):
            raise Invalid("Missing required parameter: 'model'.")
        if "previous_response_id" in body:
            raise Invalid(f"Previous response with id '{body['previous_response_id']}' not "
                          "found.", 404)
        for i, tool in enumerate(body.get("tools") or []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in RESPONSES_TOOL_TYPES:
                raise Invalid(f"Invalid value: '{kind}'. (param: tools[{i}].type)")
            if kind == "function" and not isinstance(tool.get("name"), str):
                raise Invalid(f"Missing required parameter: 'tools[{i}].name'.")
        items = body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items
        if not isinstance(items, list):
            raise Invalid("Invalid type for 'input': expected a string or an array.")
        calls: set[str] = set()
        for i, item in enumerate(items):
            kind = item.get("type", "message") if isinstance(item, dict) else None
            if kind not in RESPONSES_ITEM_TYPES:
                raise Invalid(f"Invalid value: '{kind}'. (param: input[{i}].type)")
            if kind == "message":
                if item.get("role") not in ("user", "assistant", "system", "developer"):
                    raise Invalid(f"Invalid value: '{item.get('role')}'. Supported values "
                                  "are: 'assistant', 'system', 'developer', and 'user'. "
                                  f"(param: input[{i}].role)")
                content = item.get("content")
                for j, part in enumerate(content if isinstance(content, list) else []):
                    part_kind = part.get("type") if isinstance(part, dict) else None
                    if part_kind not in RESPONSES_PART_TYPES:
                        raise Invalid(f"Invalid value: '{part_kind}'. (param: "
                                      f"input[{i}].content[{j}].type)")
            elif kind == "function_call":
                calls.add(str(item.get("call_id")))
            elif kind == "function_call_output" and item.get("call_id") not in calls:
                raise Invalid(f"No tool call found for function call output with call_id "
                              f"{item.get('call_id')}.")
            elif kind == "reasoning":
                text = "".join(s.get("text", "") for s in item.get("summary") or [])
                if item.get("encrypted_content") != sign(text):
                    raise Invalid(f"The encrypted content for item {item.get('id')} could "
                                  f"not be verified. (param: input[{i}].encrypted_content)")

    def _responses_turn(self, items: list[dict[str, Any]]) -> int:
        return sum(1 for i, item in enumerate(items)
                   if item.get("type") == "function_call_output"
                   and (i == 0 or items[i - 1].get("type") != "function_call_output"))

    def _responses_output(self, body: dict[str, Any], number: int) -> list[dict[str, Any]]:
        items = body["input"]
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items
        output: list[dict[str, Any]] = []
        effort = (body.get("reasoning") or {}).get("effort")
        if effort:
            text = f"{self.thinking_text} (effort {effort})"
            output.append({"id": f"rs_strict_{number}", "type": "reasoning",
                           "summary": [{"type": "summary_text", "text": text}],
                           "encrypted_content": sign(text)})
        last_user = next((it for it in reversed(items) if it.get("role") == "user"), {})
        prompt = _text_of(_input_blocks(last_user.get("content")))
        tools = body.get("tools") or []
        if any(t.get("type") == "web_search" for t in tools) and "search" in prompt:
            output.append({"id": f"ws_strict_{number}", "type": "web_search_call",
                           "status": "completed",
                           "action": {"type": "search", "query": prompt[:100]}})
        names = [str(t.get("name")) for t in tools if t.get("type") == "function"]
        turn = self._responses_turn(items)
        planned = self.tool_calls[turn] if turn < len(self.tool_calls) and \
            self.tool_calls[turn][0] in names else None
        if planned:
            output.append({"id": f"fc_strict_{number}", "type": "function_call",
                           "status": "completed", "call_id": f"call_strict_{turn}",
                           "name": planned[0], "arguments": json.dumps(planned[1])})
            return output
        last = items[-1] if items else {}
        if last.get("type") == "function_call_output":
            output_value = last.get("output")
            said = output_value if isinstance(output_value, str) else _text_of(
                _input_blocks(output_value))
            text = "tool said: " + said[:200]
        else:
            text = "answered: " + (prompt.strip().splitlines() or [""])[-1][:200]
        output.append({"id": f"msg_strict_{number}", "type": "message", "status": "completed",
                       "role": "assistant", "content": [
                           {"type": "output_text", "text": text, "annotations": [],
                            "logprobs": []}]})
        return output

    async def responses(self, request: web.Request) -> web.StreamResponse:
        call = self._record(request)
        try:
            await self._read(request, call)
            self._validate_responses(call)
        except Invalid as error:
            return self._refuse(call, error, "openai")
        body = call.body
        number = len(self.calls)
        output = self._responses_output(body, number)
        input_tokens = _estimate_tokens({"messages": body.get("input"),
                                         "system": body.get("instructions"),
                                         "tools": body.get("tools")})
        output_tokens = 3 + len(json.dumps(output)) // 8
        echoed = {k: body.get(k, default) for k, default in RESPONSES_ECHOED.items()}
        response: dict[str, Any] = {
            "id": f"resp_strict_{number}", "object": "response", "created_at": 1,
            "status": "completed", "background": False, "error": None,
            "incomplete_details": None, **echoed, "model": f"{body['model']}-2026",
            "output": output, "service_tier": "default",
            "usage": {"input_tokens": input_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": output_tokens,
                      "output_tokens_details": {"reasoning_tokens": 5 if output[0][
                          "type"] == "reasoning" else 0},
                      "total_tokens": input_tokens + output_tokens}}
        call.answer = response
        if not body.get("stream"):
            return web.json_response(response, headers={"x-request-id": f"req_{number}"})
        stream = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                             "x-request-id": f"req_{number}"})
        await stream.prepare(request)
        sequence = 0

        async def send(kind: str, **data: Any) -> None:
            nonlocal sequence
            payload = {"type": kind, "sequence_number": sequence, **data}
            sequence += 1
            call.events.append(payload)
            await stream.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())

        start = {**response, "status": "in_progress", "output": [], "usage": None}
        await send("response.created", response=start)
        await send("response.in_progress", response=start)
        for index, item in enumerate(output):
            where = {"item_id": item["id"], "output_index": index}
            kind = item["type"]
            if kind == "message":
                await send("response.output_item.added", output_index=index,
                           item={**item, "status": "in_progress", "content": []})
                part = item["content"][0]
                await send("response.content_part.added", **where, content_index=0,
                           part={**part, "text": ""})
                text = part["text"]
                for piece in (text[:9], text[9:]):
                    await send("response.output_text.delta", **where, content_index=0,
                               delta=piece, logprobs=[])
                await send("response.output_text.done", **where, content_index=0,
                           text=text, logprobs=[])
                await send("response.content_part.done", **where, content_index=0,
                           part=part)
            elif kind == "function_call":
                await send("response.output_item.added", output_index=index,
                           item={**item, "status": "in_progress", "arguments": ""})
                arguments = item["arguments"]
                for piece in (arguments[:7], arguments[7:]):
                    await send("response.function_call_arguments.delta", **where,
                               delta=piece)
                await send("response.function_call_arguments.done", **where,
                           name=item["name"], arguments=arguments)
            elif kind == "reasoning":
                await send("response.output_item.added", output_index=index,
                           item={**item, "summary": [], "encrypted_content": None})
                summary = item["summary"][0]
                await send("response.reasoning_summary_part.added", **where,
                           summary_index=0, part={**summary, "text": ""})
                await send("response.reasoning_summary_text.delta", **where,
                           summary_index=0, delta=summary["text"])
                await send("response.reasoning_summary_text.done", **where,
                           summary_index=0, text=summary["text"])
                await send("response.reasoning_summary_part.done", **where,
                           summary_index=0, part=summary)
            else:
                await send("response.output_item.added", output_index=index,
                           item={**item, "status": "in_progress"})
                for phase in ("in_progress", "searching", "completed"):
                    await send(f"response.web_search_call.{phase}", **where)
            await send("response.output_item.done", output_index=index, item=item)
        await send("response.completed", response=response)
        await stream.write_eof()
        return stream

    # --- OpenAI embeddings ----------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        call = self._record(request)
        try:
            await self._read(request, call)
            if call.header("authorization") != f"Bearer {OPENAI_KEY}":
                raise Invalid("Incorrect API key provided.", 401, "invalid_request_error")
            body = call.body
            for name in body:
                if name not in EMBEDDING_FIELDS:
                    raise Invalid(f"Unrecognized request argument supplied: {name}")
            inputs = body.get("input")
            if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                           and isinstance(inputs[0], int)):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs or not all(
                    isinstance(i, str) or (isinstance(i, list) and all(
                        isinstance(t, int) for t in i)) for i in inputs):
                raise Invalid("'$.input' is invalid. Please check the API reference: "
                              "https://platform.openai.com/docs/api-reference.")
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise Invalid(f"Invalid value: '{encoding}'. Supported values are: 'float' "
                              "and 'base64'. (param: encoding_format)")
        except Invalid as error:
            return self._refuse(call, error, "openai")
        size = int(body.get("dimensions") or 6)
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            vector = unit_vector_of(item, size)
            tokens += len(item) if isinstance(item, list) else max(1, len(item) // 4)
            embedding: Any = (base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
                              if encoding == "base64" else vector)
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        call.answer = {"object": "list", "data": data, "model": str(body.get("model")),
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.json_response(call.answer)


def _input_blocks(content: Any) -> list[dict[str, Any]]:
    """A Responses message's content as blocks with ``text`` (input_text, output_text)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": "text", "text": b.get("text", "")} for b in content or []
            if isinstance(b, dict) and b.get("type") in ("input_text", "output_text")]


def unit_vector_of(item: Any, size: int = 6) -> list[float]:
    """The vector this upstream answers for an input item (a text or token array)."""
    seed = hashlib.sha256(json.dumps(item).encode()).digest()
    return [round((seed[i % 32] - 128) / 128, 4) for i in range(size)]


RESPONSES_FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "max_tool_calls", "temperature", "top_p", "top_logprobs", "stream",
    "stream_options", "text", "reasoning", "store", "include", "metadata",
    "previous_response_id", "prompt", "prompt_cache_key", "prompt_cache_retention",
    "safety_identifier", "service_tier", "truncation", "user", "background", "conversation",
    "client_metadata", "context_management"})
RESPONSES_TOOL_TYPES = ("function", "web_search", "web_search_preview", "file_search",
                        "computer_use_preview", "code_interpreter", "image_generation",
                        "mcp", "local_shell", "custom", "namespace", "shell", "apply_patch")
RESPONSES_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning",
                        "web_search_call", "file_search_call", "computer_call",
                        "computer_call_output", "item_reference", "custom_tool_call",
                        "custom_tool_call_output", "local_shell_call",
                        "local_shell_call_output", "image_generation_call")
RESPONSES_PART_TYPES = ("input_text", "input_image", "input_file", "output_text", "refusal")
RESPONSES_ECHOED: dict[str, Any] = {
    "instructions": None, "max_output_tokens": None, "metadata": {},
    "parallel_tool_calls": True, "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
    "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
    "tools": [], "top_p": 1.0, "truncation": "disabled", "user": None}
EMBEDDING_FIELDS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})
