"""Request, response and stream shapes from the public Anthropic Messages and OpenAI Chat
Completions API references, including the newer ones (signed and redacted thinking,
documents, server tools and their results, citations, cache_control on every block kind,
cache usage, system messages mid-conversation, n>1, logprobs, parallel tool calls,
tool_choice variants) and vendor fields "added last week" that hookproxy does not model.
"""

from __future__ import annotations

import json
from typing import Any

PDF = "JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSPj4Kc3RyZWFtCg=="
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJ"
       "RU5ErkJggg==")
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
CACHE = {"type": "ephemeral"}
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}

# --- Anthropic Messages ------------------------------------------------------------------

ANTHROPIC_REQUEST: dict[str, Any] = {
    "model": "claude-fidelity",
    "max_tokens": 16000,
    "system": [
        {"type": "text", "text": "You are a careful agent."},
        {"type": "text", "text": "Project notes: use tools.", "cache_control": CACHE},
    ],
    "thinking": {"type": "enabled", "budget_tokens": 4096},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "metadata": {"user_id": "user-42"},
    "temperature": 1,
    "tools": [
        {"name": "get_weather", "description": "Weather for a city",
         "input_schema": WEATHER_SCHEMA, "cache_control": CACHE},
        {"type": "custom", "name": "lookup", "description": "Look up",
         "input_schema": {"type": "object", "properties": {}}, "defer_loading": True},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3,
         "allowed_domains": ["example.com"]},
    ],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "future_request_field": {"added": "last week", "nested": [1, 2, 3]},
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "Read this and check the weather.",
             "cache_control": CACHE},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": PDF},
             "title": "report.pdf", "context": "Q3", "citations": {"enabled": True},
             "cache_control": CACHE},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": "Plain text document."}},
            {"type": "document", "source": {"type": "url",
                                            "url": "https://example.com/a.pdf"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG}, "cache_control": CACHE},
            {"type": "search_result", "source": "https://example.com/s", "title": "S",
             "content": [{"type": "text", "text": "A search result."}]},
        ]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call the tool.",
             "signature": SIGNATURE},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
            {"type": "text", "text": "Checking.", "citations": [
                {"type": "char_location", "cited_text": "Q3", "document_index": 0,
                 "document_title": "report.pdf", "start_char_index": 0,
                 "end_char_index": 2}]},
            {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search",
             "input": {"query": "weather Paris"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [
                {"type": "web_search_result", "url": "https://example.com/w",
                 "title": "W", "encrypted_content": "Eu8BCioIAhgBIiQ", "page_age": None}]},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
             "input": {"city": "Paris"}, "cache_control": CACHE},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C, sunny",
             "cache_control": CACHE},
        ]},
        {"role": "system", "content": "From now on, answer in French."},
        {"role": "user", "content": [
            {"type": "made_up_block_2026", "payload": {"x": 1}},
            {"type": "text", "text": "And tomorrow?"},
        ], "future_message_field": True},
    ],
}

ANTHROPIC_RESPONSE: dict[str, Any] = {
    "id": "msg_01Fidelity",
    "type": "message",
    "role": "assistant",
    "model": "claude-fidelity",
    "content": [
        {"type": "thinking", "thinking": "Tomorrow: rain.", "signature": SIGNATURE},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
        {"type": "server_tool_use", "id": "srvtoolu_02", "name": "web_search",
         "input": {"query": "forecast"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_02", "content": []},
        {"type": "text", "text": "Demain, pluie.", "citations": [
            {"type": "web_search_result_location", "url": "https://example.com/w",
             "title": "W", "encrypted_index": "Eo8BCi", "cited_text": "rain"}]},
        {"type": "tool_use", "id": "toolu_02", "name": "get_weather",
         "input": {"city": "Paris"}},
    ],
    "stop_reason": "pause_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 50, "cache_creation_input_tokens": 1000,
              "cache_read_input_tokens": 2000, "output_tokens": 70,
              "server_tool_use": {"web_search_requests": 1}, "service_tier": "standard",
              "cache_creation": {"ephemeral_5m_input_tokens": 1000,
                                 "ephemeral_1h_input_tokens": 0}},
    "container": None,
    "future_response_field": {"added": "last week"},
}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


ANTHROPIC_STREAM: list[bytes] = [
    _sse("message_start", {"type": "message_start", "message": {
        "id": "msg_01Stream", "type": "message", "role": "assistant",
        "model": "claude-fidelity", "content": [], "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 300,
                  "cache_read_input_tokens": 4000, "output_tokens": 1,
                  "service_tier": "standard"}}}),
    _sse("ping", {"type": "ping"}),
    _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "thinking", "thinking": "",
                                                   "signature": ""}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "thinking_delta",
                                           "thinking": "Let me think."}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "signature_delta",
                                           "signature": SIGNATURE}}),
    _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    _sse("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "redacted_thinking",
                                                   "data": "EmwKAhgBEgy3va3pzix"}}),
    _sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    _sse("content_block_start", {"type": "content_block_start", "index": 2,
                                 "content_block": {"type": "server_tool_use",
                                                   "id": "srvtoolu_03",
                                                   "name": "web_search", "input": {}}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 2,
                                 "delta": {"type": "input_json_delta",
                                           "partial_json": "{\"query\": \"x\"}"}}),
    _sse("content_block_stop", {"type": "content_block_stop", "index": 2}),
    _sse("content_block_start", {"type": "content_block_start", "index": 3,
                                 "content_block": {"type": "text", "text": "",
                                                   "citations": []}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 3,
                                 "delta": {"type": "citations_delta", "citation": {
                                     "type": "char_location", "cited_text": "Q3",
                                     "document_index": 0, "start_char_index": 0,
                                     "end_char_index": 2}}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 3,
                                 "delta": {"type": "text_delta", "text": "Bonjour"}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 3,
                                 "delta": {"type": "text_delta", "text": " le monde"}}),
    _sse("content_block_stop", {"type": "content_block_stop", "index": 3}),
    _sse("future_event", {"type": "future_event", "detail": "added last week"}),
    _sse("content_block_start", {"type": "content_block_start", "index": 4,
                                 "content_block": {"type": "tool_use", "id": "toolu_03",
                                                   "name": "get_weather", "input": {}}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 4,
                                 "delta": {"type": "input_json_delta",
                                           "partial_json": "{\"city\": "}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 4,
                                 "delta": {"type": "input_json_delta",
                                           "partial_json": "\"Paris\"}"}}),
    _sse("content_block_stop", {"type": "content_block_stop", "index": 4}),
    _sse("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"output_tokens": 88,
                                     "server_tool_use": {"web_search_requests": 1}},
                           "context_management": {"applied_edits": []}}),
    _sse("message_stop", {"type": "message_stop"}),
]

# --- OpenAI Chat Completions -------------------------------------------------------------

OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                      "parameters": WEATHER_SCHEMA, "strict": True}},
    {"type": "custom", "custom": {"name": "run_sql", "description": "SQL",
                                  "format": {"type": "text"}}},
]

OPENAI_REQUEST: dict[str, Any] = {
    "model": "gpt-fidelity",
    "messages": [
        {"role": "developer", "content": "You are a careful agent."},
        {"role": "system", "content": [{"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Look at these."},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}",
                                                "detail": "high"}},
            {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}",
                                      "filename": "report.pdf"}},
            {"type": "file", "file": {"file_id": "file-abc123"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        ], "name": "alice"},
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2",
         "content": [{"type": "text", "text": "21C"}]},
        {"role": "system", "content": "Answer briefly from now on."},
        {"role": "user", "content": "Compare them.", "future_message_field": 1},
    ],
    "tools": OPENAI_TOOLS,
    "tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}},
    "parallel_tool_calls": False,
    "n": 2,
    "logprobs": True,
    "top_logprobs": 2,
    "seed": 7,
    "max_completion_tokens": 500,
    "temperature": 0.3,
    "response_format": {"type": "json_schema", "json_schema": {
        "name": "cmp", "schema": {"type": "object"}, "strict": True}},
    "metadata": {"run": "fidelity"},
    "store": False,
    "reasoning_effort": "low",
    "future_request_field": {"added": "last week"},
}

OPENAI_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-Fidelity",
    "object": "chat.completion",
    "created": 1760000000,
    "model": "gpt-fidelity",
    "system_fingerprint": "fp_123",
    "service_tier": "default",
    "choices": [
        {"index": 0, "finish_reason": "tool_calls",
         "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                                   "top_logprobs": []}], "refusal": None},
         "message": {"role": "assistant", "content": "Hi", "refusal": None,
                     "annotations": [{"type": "url_citation", "url_citation": {
                         "url": "https://example.com", "title": "E", "start_index": 0,
                         "end_index": 2}}],
                     "tool_calls": [
                         {"id": "call_3", "type": "function", "function": {
                             "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
                         {"id": "call_4", "type": "function", "function": {
                             "name": "get_weather", "arguments": "{\"city\":\"Bern\"}"}}]}},
        {"index": 1, "finish_reason": "stop", "logprobs": None,
         "message": {"role": "assistant", "content": "Second choice.", "refusal": None}},
    ],
    "usage": {"prompt_tokens": 3000, "completion_tokens": 40, "total_tokens": 3040,
              "prompt_tokens_details": {"cached_tokens": 2048, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0,
                                            "rejected_prediction_tokens": 0}},
    "future_response_field": {"added": "last week"},
}


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    body = {"id": "chatcmpl-Stream", "object": "chat.completion.chunk", "created": 1760000000,
            "model": "gpt-fidelity", "system_fingerprint": "fp_123", "choices": choices,
            **extra}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _logprobs(token: str) -> dict[str, Any]:
    return {"content": [{"token": token, "logprob": -0.5, "bytes": list(token.encode()),
                         "top_logprobs": []}], "refusal": None}


OPENAI_STREAM: list[bytes] = [
    _chunk([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
             "logprobs": None, "finish_reason": None},
            {"index": 1, "delta": {"role": "assistant", "content": "", "refusal": None},
             "logprobs": None, "finish_reason": None}], obfuscation="a1"),
    _chunk([{"index": 0, "delta": {"content": "One"}, "logprobs": _logprobs("One"),
             "finish_reason": None}], obfuscation="b2"),
    _chunk([{"index": 1, "delta": {"content": "Two"}, "logprobs": _logprobs("Two"),
             "finish_reason": None}]),
    _chunk([{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_5", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}, "logprobs": None,
        "finish_reason": None}]),
    _chunk([{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "{\"city\":\"Oslo\"}"}}]},
        "logprobs": None, "finish_reason": None}]),
    _chunk([{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "call_6", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Bern\"}"}}]},
        "logprobs": None, "finish_reason": None}]),
    _chunk([{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}]),
    _chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]),
    _chunk([], usage={"prompt_tokens": 3000, "completion_tokens": 40, "total_tokens": 3040,
                      "prompt_tokens_details": {"cached_tokens": 2048},
                      "completion_tokens_details": {"reasoning_tokens": 12}}),
    b"data: [DONE]\n\n",
]
