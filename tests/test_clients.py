"""Real third-party clients through hookproxy, against fake upstreams as strict as the real
APIs (tests/strict_upstream.py): the Claude Code CLI, LangChain's ChatAnthropic and
ChatOpenAI, and the openai SDK where LangChain cannot go (n>1 streams).

Claude Code is the pinned npm package that .ci/run installs into .ci/node; a test that
cannot find it fails and says how to install it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from tests.harness import ProxyServer
from tests.strict_upstream import (
    ANTHROPIC_KEY,
    CONTEXT_MANAGEMENT_BETA,
    OPENAI_KEY,
    REDACTED_TRIGGER,
    Call,
    StrictUpstream,
    sign,
    walk_blocks,
)

CLAUDE_CODE_VERSION = "2.1.328"
ROOT = Path(__file__).resolve().parent.parent
CLAUDE_CODE = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "claude"
INSTALL_STEP = (f"npm install --prefix .ci/node @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"
                " (the install step in .ci/run)")
CLIENT_KEY = "dummy"
# Below pytest's own 120 s, so that a hang reports as Claude Code's timeout.
CLAUDE_TIMEOUT = 90


@pytest.fixture(autouse=True)
def upstream_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRICT_UPSTREAM_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("STRICT_UPSTREAM_OPENAI_KEY", OPENAI_KEY)


def gateway_config(upstream: StrictUpstream, fmt: str = "anthropic") -> dict[str, Any]:
    """Every model name a client asks for (Claude Code's default, its aliases, names it does
    not know) goes to one provider of format ``fmt`` on the strict upstream: for Anthropic,
    with the routing the README's compatibility section shows."""
    if fmt == "anthropic":
        readme = (ROOT / "README.md").read_text()
        section = readme.split("\n## Compatibility\n", 1)[1].split("\n## ", 1)[0]
        config = tomllib.loads(section.split("```toml\n", 1)[1].split("```", 1)[0])
        config["providers"] = {"anthropic": upstream.provider("anthropic")}
    else:
        config = {"providers": {"openai": upstream.provider("openai")},
                  "models": [{"name": "gpt", "provider": "openai", "model": "gpt-strict"}],
                  "routes": [{"model": "*", "to": "gpt"}]}
    return {**config, "log": {"path": ""}, "routing": {"retries": 0, "cooldown_failures": 1000}}


def rejections(upstream: StrictUpstream) -> str:
    return "; ".join(f"{c.path} {c.status}: {c.error}" for c in upstream.rejections) or "none"


# --- the strict upstream itself ---------------------------------------------------------

TOOL_TURN: list[Any] = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}]}]
THINKING = {"type": "enabled", "budget_tokens": 1024}
SIGNED = {"type": "thinking", "thinking": "hm", "signature": sign("hm")}


@pytest.mark.parametrize(("body", "refusal"), [
    ({"messages": TOOL_TURN, "thinking": THINKING},
     "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
     "`tool_use`"),
    ({"messages": [TOOL_TURN[0], {"role": "assistant", "content": [
        {**SIGNED, "thinking": "hm!"}, *TOOL_TURN[1]["content"]]}, TOOL_TURN[2]],
      "thinking": THINKING}, "messages.1.content.0: Invalid `signature`"),
    ({"messages": TOOL_TURN[:1], "context_management": {"edits": []}},
     "context_management: Extra inputs are not permitted"),
    ({"messages": [{"role": "user", "content": [{"type": "hologram", "x": 1}]}]},
     "messages.0.content.0: Input tag 'hologram' found using 'type' does not match"),
    ({"messages": [*TOOL_TURN[:2], {"role": "user", "content": "no result"}]},
     "messages.2: `tool_use` ids were found without `tool_result` blocks"),
], ids=["thinking-first", "signature", "beta-header", "block-type", "tool-result"])
def test_strict_upstream_refuses_what_the_api_refuses(body: dict[str, Any], refusal: str
                                                      ) -> None:
    import anthropic

    with StrictUpstream() as upstream:
        client = anthropic.Anthropic(base_url=upstream.url, api_key=ANTHROPIC_KEY,
                                     max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model="claude-x", max_tokens=2048,
                                   messages=body["messages"],
                                   extra_body={k: v for k, v in body.items() if k != "messages"})
        error: Any = refused.value.body
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"].startswith(refusal)


def test_strict_upstream_accepts_the_same_done_right() -> None:
    import anthropic

    with StrictUpstream() as upstream:
        client = anthropic.Anthropic(base_url=upstream.url, api_key=ANTHROPIC_KEY,
                                     max_retries=0)
        signed_turn: Any = [TOOL_TURN[0], {"role": "assistant", "content": [
            SIGNED, *TOOL_TURN[1]["content"]]}, TOOL_TURN[2]]
        answer = client.messages.create(model="claude-x", max_tokens=2048,
                                        messages=signed_turn, extra_body={"thinking": THINKING})
        content = answer.model_dump()["content"]
        assert [b["type"] for b in content] == ["thinking", "text"]
        assert content[0]["signature"] == sign(content[0]["thinking"])
        assert content[1]["text"] == "tool said: 18C"
        client.messages.create(model="claude-x", max_tokens=50, messages=TOOL_TURN[:1],
                               extra_body={"context_management": {"edits": []}},
                               extra_headers={"anthropic-beta": CONTEXT_MANAGEMENT_BETA})
        counted = client.messages.count_tokens(model="claude-x", messages=signed_turn)
        assert counted.input_tokens == upstream.calls[-1].answer["input_tokens"]
        assert not upstream.rejections


# --- Claude Code ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def claude() -> Path:
    if not CLAUDE_CODE.exists():
        pytest.fail(f"Claude Code is not installed at {CLAUDE_CODE}; run: {INSTALL_STEP}")
    version = subprocess.run([str(CLAUDE_CODE), "--version"], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL).stdout
    if not version.startswith(CLAUDE_CODE_VERSION):
        pytest.fail(f"{CLAUDE_CODE} is Claude Code {version.strip()!r}, the tests pin "
                    f"{CLAUDE_CODE_VERSION}; run: {INSTALL_STEP}")
    return CLAUDE_CODE


@dataclass(repr=False)
class ClaudeRun:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def __repr__(self) -> str:
        return f"<Claude Code: exit {self.returncode}, {len(self.events)} events>"

    @property
    def result(self) -> dict[str, Any]:
        return next((e for e in reversed(self.events) if e.get("type") == "result"), {})

    def succeeded(self) -> bool:
        return self.returncode == 0 and self.result.get("is_error") is False

    def why(self) -> str:
        """What Claude Code said went wrong: its result (the API error it got) or stderr."""
        said = self.result.get("result") or self.result.get("errors") or self.stderr[-1500:]
        return f"exit {self.returncode}: {str(said)[:1500]}"

    def blocks(self, kind: str) -> list[dict[str, Any]]:
        """The content blocks of that type in the assistant messages Claude Code showed."""
        return [b for e in self.events if e.get("type") == "assistant"
                for b in e["message"].get("content", []) if b.get("type") == kind]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    (tmp_path / "project").mkdir()
    return tmp_path


def run_claude(claude: Path, base_url: str, workdir: Path, prompt: str, *args: str,
               api_key: str = CLIENT_KEY) -> ClaudeRun:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir / "home"),
           "LANG": "C.UTF-8", "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": api_key,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
           # An error answer is the test's finding; retrying it only spends the timeout.
           "CLAUDE_CODE_MAX_RETRIES": "0"}
    done = subprocess.run(
        [str(claude), "-p", prompt, "--output-format", "stream-json", "--verbose", *args],
        cwd=workdir / "project", env=env, capture_output=True, text=True,
        timeout=CLAUDE_TIMEOUT, stdin=subprocess.DEVNULL)
    events = []
    for line in done.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"type": "unparsed", "line": line})
    return ClaudeRun(done.returncode, events, done.stderr)


def answered_calls(upstream: StrictUpstream) -> list[Call]:
    return [c for c in upstream.messages_calls if c.status == 200]


@pytest.mark.parametrize("model", [None, "opus", "sonnet", "my-own-alias"])
def test_claude_code_answers(claude: Path, workdir: Path, model: str | None) -> None:
    """One prompt with Claude Code's default model (and its aliases, and a name it does not
    know): its first request carries role "system" mid-conversation, thinking, a
    context_management that needs its beta header, and cache_control."""
    args = ["--model", model] if model else []
    with StrictUpstream() as upstream, ProxyServer(gateway_config(upstream)) as proxy:
        run = run_claude(claude, proxy.url, workdir, "say hi", *args)
        assert run.succeeded(), f"{run.why()}; upstream refused: {rejections(upstream)}"
        assert run.result["result"] == "answered: say hi"
        call = answered_calls(upstream)[0]
        assert "context-management-2025-06-27" in (call.header("anthropic-beta") or "")
        assert CLIENT_KEY not in json.dumps(call.headers)  # the provider's key, not the client's
        assert "system" in [m["role"] for m in call.body["messages"]]
        # The signed thinking block and the cache usage reached Claude Code as sent.
        sent = call.answer["content"][0]
        assert run.blocks("thinking") == [sent]
        usage = call.answer["usage"]
        assert run.result["usage"]["cache_creation_input_tokens"] == \
            usage["cache_creation_input_tokens"] > 0
        assert not upstream.rejections


def test_claude_code_tool_loop(claude: Path, workdir: Path) -> None:
    """Thinking + Read, thinking + Bash, thinking + text: each later request carries every
    earlier signed thinking block first in its assistant turn, unchanged."""
    project = workdir / "project"
    (project / "notes.txt").write_text("the secret word is pineapple\n")
    plan = [("Read", {"file_path": str(project / "notes.txt")}),
            ("Bash", {"command": "echo hi", "description": "Print hi"})]
    with StrictUpstream(tool_calls=plan) as upstream, \
            ProxyServer(gateway_config(upstream)) as proxy:
        run = run_claude(claude, proxy.url, workdir, "read notes.txt, then echo hi",
                         "--allowedTools", "Read", "Bash(echo hi)")
        assert run.succeeded(), f"{run.why()}; upstream refused: {rejections(upstream)}"
        assert run.result["result"] == "tool said: hi"
        calls = answered_calls(upstream)
        assert [c.answer["content"][-1]["type"] for c in calls] == [
            "tool_use", "tool_use", "text"]
        for turn, call in enumerate(calls[1:], 1):
            assistants = [m for m in call.body["messages"] if m["role"] == "assistant"]
            assert len(assistants) == turn
            for earlier, assistant in zip(calls, assistants, strict=False):
                issued = earlier.answer["content"]
                assert assistant["content"][0] == issued[0]
                assert issued[0]["signature"] == sign(issued[0]["thinking"])
                assert assistant["content"][-1] == issued[-1]  # the tool_use
        results = [b for b in walk_blocks(calls[-1].body["messages"])
                   if b["type"] == "tool_result"]
        assert "pineapple" in json.dumps(results[0]) and results[1]["content"] == "hi"
        total_read = sum(c.answer["usage"]["cache_read_input_tokens"] for c in calls)
        assert total_read > 0
        assert run.result["usage"]["cache_read_input_tokens"] == total_read


def test_claude_code_reads_a_pdf(claude: Path, workdir: Path) -> None:
    pdf = tiny_pdf("The launch code is 4711")
    path = workdir / "project" / "report.pdf"
    path.write_bytes(pdf)
    with StrictUpstream(tool_calls=[("Read", {"file_path": str(path)})]) as upstream, \
            ProxyServer(gateway_config(upstream)) as proxy:
        run = run_claude(claude, proxy.url, workdir, "what does report.pdf say?")
        assert run.succeeded(), f"{run.why()}; upstream refused: {rejections(upstream)}"
        documents = [b for c in answered_calls(upstream)
                     for b in walk_blocks(c.body["messages"]) if b["type"] == "document"]
        assert documents, "no document block reached the upstream"
        assert documents[0]["source"] == {"type": "base64", "media_type": "application/pdf",
                                          "data": base64.b64encode(pdf).decode()}
        assert run.result["result"].startswith("tool said: PDF file read")


def test_claude_code_context_counts_tokens_upstream(claude: Path, workdir: Path) -> None:
    """``/context`` counts tokens with POST /v1/messages/count_tokens?beta=true; the counts
    come from the provider, with no billable max_tokens=1 calls as a fallback."""
    with StrictUpstream() as upstream, ProxyServer(gateway_config(upstream)) as proxy:
        run = run_claude(claude, proxy.url, workdir, "/context")
        assert run.succeeded(), f"{run.why()}; upstream refused: {rejections(upstream)}"
        counted = upstream.on("/v1/messages/count_tokens")
        assert counted, "no count_tokens request reached the upstream"
        assert all(c.status == 200 for c in counted), rejections(upstream)
        fallbacks = [c for c in upstream.messages_calls if c.body.get("max_tokens") == 1]
        assert not fallbacks, f"{len(fallbacks)} max_tokens=1 calls instead of count_tokens"
        table = next(b["text"] for b in run.blocks("text") if "Context Usage" in b["text"])
        messages_row = next(line for line in table.splitlines()
                            if line.startswith("| Messages |"))
        tokens = int(messages_row.split("|")[2].strip())
        assert tokens in [c.answer["input_tokens"] for c in counted]


def test_claude_code_to_openai_provider(claude: Path, workdir: Path) -> None:
    """Claude Code's first request, served by a provider of the other format."""
    with StrictUpstream() as upstream, ProxyServer(gateway_config(upstream, "openai")) as proxy:
        run = run_claude(claude, proxy.url, workdir, "say hi")
        assert run.succeeded(), f"{run.why()}; upstream refused: {rejections(upstream)}"
        assert run.result["result"] == "answered: say hi"
        sent = upstream.on("/v1/chat/completions")[0].body
        assert sent["model"] == "gpt-strict"
        texts = json.dumps(sent["messages"])
        assert "say hi" in texts and "Primary working directory" in texts


def test_claude_code_direct_tool_loop_control(claude: Path, workdir: Path) -> None:
    """Control: the same tool loop straight to the strict upstream, without hookproxy,
    succeeds, so a failure above is hookproxy's and not the fake's."""
    project = workdir / "project"
    (project / "notes.txt").write_text("the secret word is pineapple\n")
    with StrictUpstream(tool_calls=[("Read", {"file_path": str(project / "notes.txt")})]
                        ) as upstream:
        run = run_claude(claude, upstream.url, workdir, "read notes.txt",
                         api_key=ANTHROPIC_KEY)
        assert run.succeeded(), f"{run.why()}; upstream refused: {rejections(upstream)}"
        assert "pineapple" in run.result["result"]
        assert not upstream.rejections


def tiny_pdf(text: str) -> bytes:
    """A valid one-page PDF showing ``text``, with a correct cross-reference table."""
    stream = f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream
        + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n"
            "%%EOF\n").encode()
    return bytes(out)


# --- LangChain --------------------------------------------------------------------------


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"18C and sunny in {city}"


@pytest.fixture
def weather_gateway() -> Iterator[tuple[StrictUpstream, ProxyServer]]:
    with StrictUpstream(tool_calls=[("get_weather", {"city": "Paris"})]) as upstream, \
            ProxyServer(gateway_config(upstream)) as proxy:
        yield upstream, proxy


def chat_anthropic(proxy: ProxyServer, streaming: bool) -> Any:
    from langchain_anthropic import ChatAnthropic

    # Budgeted thinking, as LangChain's docs show it (it refuses it for claude-opus-5-5).
    settings: dict[str, Any] = {
        "model": "claude-sonnet-4-5", "base_url": proxy.url, "api_key": SecretStr(CLIENT_KEY),
        "max_tokens": 2048, "max_retries": 0, "streaming": streaming,
        "thinking": {"type": "enabled", "budget_tokens": 1024}}
    return ChatAnthropic(**settings)


def two_turns(llm: Any, question: str) -> tuple[Any, Any]:
    from langchain_core.messages import HumanMessage, ToolMessage

    bound = llm.bind_tools([get_weather])
    history: list[Any] = [HumanMessage(question)]
    first = bound.invoke(history)
    assert first.tool_calls, first
    call = first.tool_calls[0]
    history += [first, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    return first, bound.invoke(history)


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_langchain_anthropic_thinking_and_tools(
        weather_gateway: tuple[StrictUpstream, ProxyServer], streaming: bool) -> None:
    upstream, proxy = weather_gateway
    try:
        first, second = two_turns(chat_anthropic(proxy, streaming), "Weather in Paris?")
    except Exception as error:
        pytest.fail(f"{type(error).__name__}: {error}; upstream refused: "
                    f"{rejections(upstream)}")
    assert second.text == "tool said: 18C and sunny in Paris"
    issued = answered_calls(upstream)[0].answer["content"]
    assert [b["type"] for b in issued] == ["thinking", "tool_use"]
    shown = first.content[0]
    assert (shown["type"], shown["thinking"], shown["signature"]) == (
        "thinking", issued[0]["thinking"], issued[0]["signature"])
    sent_back = answered_calls(upstream)[1].body["messages"][1]
    assert sent_back["role"] == "assistant"
    assert sent_back["content"][0] == issued[0]
    assert sent_back["content"][-1]["id"] == issued[-1]["id"]
    assert not upstream.rejections


def test_langchain_anthropic_redacted_thinking(
        weather_gateway: tuple[StrictUpstream, ProxyServer]) -> None:
    upstream, proxy = weather_gateway
    try:
        _, second = two_turns(chat_anthropic(proxy, True),
                              f"Weather in Paris? {REDACTED_TRIGGER}")
    except Exception as error:
        pytest.fail(f"{type(error).__name__}: {error}; upstream refused: "
                    f"{rejections(upstream)}")
    assert second.text == "tool said: 18C and sunny in Paris"
    issued = answered_calls(upstream)[0].answer["content"]
    assert [b["type"] for b in issued] == ["thinking", "redacted_thinking", "tool_use"]
    sent_back = answered_calls(upstream)[1].body["messages"][1]["content"]
    assert sent_back[:2] == issued[:2]


@pytest.fixture
def openai_gateway() -> Iterator[tuple[StrictUpstream, ProxyServer]]:
    with StrictUpstream() as upstream, \
            ProxyServer(gateway_config(upstream, "openai")) as proxy:
        yield upstream, proxy


def test_langchain_openai_two_choices(openai_gateway: tuple[StrictUpstream, ProxyServer]
                                      ) -> None:
    """ChatOpenAI with n=2. LangChain refuses n>1 together with streaming ("n must be 1
    when streaming"), so its two choices come from a plain call; the stream is below."""
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    upstream, proxy = openai_gateway
    llm = ChatOpenAI(model="gpt-strict", base_url=f"{proxy.url}/v1",
                     api_key=SecretStr(CLIENT_KEY),
                     n=2, max_retries=0)
    result = llm.generate([[HumanMessage("hello")]])
    assert [g.text for g in result.generations[0]] == [
        "choice 0: answered: hello", "choice 1: answered: hello"]
    assert upstream.on("/v1/chat/completions")[0].body["n"] == 2


def test_openai_two_choices_streamed_apart(openai_gateway: tuple[StrictUpstream, ProxyServer]
                                          ) -> None:
    """n=2 streaming with the openai SDK (the client ChatOpenAI wraps): every chunk holds a
    delta for choice 0 and for choice 1, and they stay apart."""
    upstream, proxy = openai_gateway
    stream = proxy.openai(api_key=CLIENT_KEY).chat.completions.create(
        model="gpt-strict", n=2, stream=True, messages=[{"role": "user", "content": "hello"}])
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert texts == {0: "choice 0: answered: hello", 1: "choice 1: answered: hello"}
    assert finishes == {0: "stop", 1: "stop"}
    assert not upstream.rejections


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_langchain_anthropic_thinking_and_tools_to_an_openai_provider(streaming: bool) -> None:
    """ChatAnthropic with thinking and a tool, served by an OpenAI-format provider: the
    thinking budget becomes reasoning_effort, the tool loop translates both ways."""
    with StrictUpstream(tool_calls=[("get_weather", {"city": "Paris"})]) as upstream, \
            ProxyServer(gateway_config(upstream, "openai")) as proxy:
        try:
            first, second = two_turns(chat_anthropic(proxy, streaming), "Weather in Paris?")
        except Exception as error:
            pytest.fail(f"{type(error).__name__}: {error}; upstream refused: "
                        f"{rejections(upstream)}")
        calls = [c for c in upstream.on("/v1/chat/completions") if c.status == 200]
    assert second.text == "tool said: 18C and sunny in Paris"
    assert first.tool_calls[0]["args"] == {"city": "Paris"}
    assert calls[0].body["reasoning_effort"] == "low"  # a 1,024-token budget
    turn = calls[1].body["messages"]
    assert [m["role"] for m in turn] == ["user", "assistant", "tool"]
    assert turn[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert not upstream.rejections
