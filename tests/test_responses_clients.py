"""Real Responses API clients through hookproxy: the Codex CLI (``codex exec``), the OpenAI
Agents SDK with its default (Responses) model, pydantic-ai's ``OpenAIResponsesModel`` and
LangChain's ``ChatOpenAI(use_responses_api=True)``, against the mock and the strict fake
upstream (tests/strict_upstream.py) in each provider format.

Codex is the pinned npm package that .ci/run installs into .ci/node; a test that cannot
find it fails and says how to install it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy import RequestContext, ToolResultPart
from tests.harness import ProxyServer
from tests.strict_upstream import ANTHROPIC_KEY, OPENAI_KEY, StrictUpstream
from tests.test_responses_api import gateway_config

CODEX_VERSION = "0.169.0"
ROOT = Path(__file__).resolve().parent.parent
CODEX = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "codex"
INSTALL_STEP = (f"npm install --prefix .ci/node @openai/codex@{CODEX_VERSION} (the install "
                "step in .ci/run)")
CODEX_TIMEOUT = 90
CLIENT_KEY = "dummy"


@pytest.fixture(autouse=True)
def upstream_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRICT_UPSTREAM_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("STRICT_UPSTREAM_OPENAI_KEY", OPENAI_KEY)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"18C and sunny in {city}"


@pytest.fixture
def weather() -> Iterator[tuple[StrictUpstream, ProxyServer]]:
    with StrictUpstream(tool_calls=[("get_weather", {"city": "Paris"})]) as upstream, \
            ProxyServer(gateway_config(upstream)) as proxy:
        yield upstream, proxy
        assert not upstream.rejections, [(c.path, c.error) for c in upstream.rejections]


# --- Codex CLI --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def codex() -> Path:
    if not CODEX.exists():
        pytest.fail(f"Codex is not installed at {CODEX}; run: {INSTALL_STEP}")
    version = subprocess.run([str(CODEX), "--version"], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL).stdout.strip()
    if version != f"codex-cli {CODEX_VERSION}":
        pytest.fail(f"{CODEX} is {version!r}, the tests pin {CODEX_VERSION}; run: "
                    f"{INSTALL_STEP}")
    return CODEX


@dataclass(repr=False)
class CodexRun:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def __repr__(self) -> str:
        return f"<Codex: exit {self.returncode}, {len(self.events)} events>"

    @property
    def said(self) -> str:
        """The agent's last message."""
        messages = [e["item"].get("text", "") for e in self.events
                    if e.get("type") == "item.completed"
                    and e.get("item", {}).get("type") == "agent_message"]
        return messages[-1] if messages else ""

    def commands(self) -> list[dict[str, Any]]:
        return [e["item"] for e in self.events if e.get("type") == "item.completed"
                and e.get("item", {}).get("type") == "command_execution"]

    def why(self) -> str:
        errors = [e for e in self.events if e.get("type") in ("error", "turn.failed")]
        return f"exit {self.returncode}: {errors or self.stderr[-1500:]}"


def codex_config(base_url: str, built_ins: bool = False) -> str:
    """The README's Codex config, pointed at ``base_url``; ``built_ins``: with web search
    and the sub-agent tools left on (for a Responses-capable provider)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Codex CLI in front of hookproxy.**", 1)[1]
    text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    config = tomllib.loads(text)
    assert config["model_providers"]["hookproxy"]["base_url"] == "http://127.0.0.1:8080/v1"
    text = text.replace("http://127.0.0.1:8080/v1", f"{base_url}/v1")
    if built_ins:
        text = text.replace('web_search = "disabled"', "").replace(
            "multi_agent = false", "")
    return text


def run_codex(codex: Path, base_url: str, workdir: Path, prompt: str, model: str,
              built_ins: bool = False) -> CodexRun:
    home = workdir / "codex-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(codex_config(base_url, built_ins))
    project = workdir / "project"
    project.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
           "CODEX_HOME": str(home), "HOOKPROXY_API_KEY": CLIENT_KEY, "LANG": "C.UTF-8"}
    done = subprocess.run(
        [str(codex), "exec", "--json", "--skip-git-repo-check", "--ephemeral", "-m", model,
         prompt], cwd=project, env=env, capture_output=True, text=True,
        timeout=CODEX_TIMEOUT, stdin=subprocess.DEVNULL)
    events = []
    for line in done.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"type": "unparsed", "line": line})
    return CodexRun(done.returncode, events, done.stderr)


def test_codex_exec_with_the_mock(codex: Path, tmp_path: Path) -> None:
    """The mock calls the first tool Codex offers (its shell), Codex runs it and sends the
    output back: one tool turn, through the Responses API, translated for the mock."""
    seen: list[RequestContext] = []
    config = {"providers": {"mock": {"type": "mock"}},
              "models": [{"name": "mock-1", "provider": "mock"}], "log": {"path": ""}}
    with ProxyServer(config, on_finish=seen.append) as proxy:
        run = run_codex(codex, proxy.url, tmp_path, "say hi", "mock-1")
    assert run.returncode == 0, run.why()
    assert run.said.startswith("The tool returned: ")
    assert run.commands()[0]["command"].endswith("mock")
    posts = [c for c in seen if c.endpoint == "/v1/responses"]
    assert len(posts) == 2 and all(c.status == 200 for c in posts)
    results = [p for m in posts[1].request.messages for p in m.content
               if isinstance(p, ToolResultPart)]
    assert results and posts[1].request.tools[0].name == "exec_command"


@pytest.mark.parametrize("fmt", ["responses", "anthropic"])
def test_codex_exec_with_a_provider(codex: Path, tmp_path: Path, fmt: str) -> None:
    """Codex runs ``echo hi`` as the upstream scripts it, and gets the answer. A
    Responses-capable provider gets Codex's requests as they came, its built-in web search
    and its sub-agent tool namespace included; an Anthropic one gets them translated."""
    with StrictUpstream(tool_calls=[("exec_command", {"cmd": "echo hi"})]) as upstream, \
            ProxyServer(gateway_config(upstream)) as proxy:
        model = "gpt-resp" if fmt == "responses" else "claude"
        run = run_codex(codex, proxy.url, tmp_path, "run echo hi", model,
                        built_ins=fmt == "responses")
        assert run.returncode == 0, f"{run.why()}; refused: {upstream.rejections}"
        assert run.said.startswith("tool said: ") and "hi" in run.said
        assert run.commands()[0]["aggregated_output"].strip().endswith("hi")
        path = "/v1/responses" if fmt == "responses" else "/v1/messages"
        calls = upstream.on(path)
        assert len(calls) == 2 and not upstream.rejections
        if fmt == "responses":
            first, second = calls[0].body, calls[1].body
            assert {t["type"] for t in first["tools"]} >= {"web_search", "namespace"}
            assert first["model"] == "gpt-strict" and "client_metadata" in first
            outputs = [i for i in second["input"] if i.get("type") == "function_call_output"]
            assert "hi" in json.dumps(outputs)
        else:
            results = [b for m in calls[1].body["messages"] for b in m["content"]
                       if isinstance(b, dict) and b.get("type") == "tool_result"]
            assert "hi" in json.dumps(results)


# --- OpenAI Agents SDK ------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-resp", "claude", "gpt-chat"])
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
def test_agents_sdk_default_model_with_a_tool(weather: tuple[StrictUpstream, ProxyServer],
                                              model: str, streamed: bool) -> None:
    from agents import Agent, OpenAIProvider, RunConfig, Runner, function_tool
    from openai import AsyncOpenAI

    upstream, proxy = weather
    client = AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    # The default provider, with its default: the Responses API.
    run_config = RunConfig(model_provider=OpenAIProvider(openai_client=client),
                           tracing_disabled=True)
    agent = Agent(name="weather", instructions="Answer about the weather.", model=model,
                  tools=[function_tool(get_weather)])

    async def run() -> Any:
        if not streamed:
            return (await Runner.run(agent, "Weather in Paris?", run_config=run_config)
                    ).final_output
        result = Runner.run_streamed(agent, "Weather in Paris?", run_config=run_config)
        async for _ in result.stream_events():
            pass
        return result.final_output

    assert asyncio.run(run()) == "tool said: 18C and sunny in Paris"
    assert len([c for c in upstream.calls if c.status == 200]) == 2


# --- pydantic-ai and LangChain ----------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-resp", "claude"])
def test_pydantic_ai_responses_model(weather: tuple[StrictUpstream, ProxyServer],
                                     model: str) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    _, proxy = weather
    llm = OpenAIResponsesModel(model, provider=OpenAIProvider(base_url=f"{proxy.url}/v1",
                                                             api_key=CLIENT_KEY))
    agent = Agent(llm, tools=[get_weather])
    assert agent.run_sync("Weather in Paris?").output == "tool said: 18C and sunny in Paris"

    async def streamed() -> str:
        async with agent.run_stream("Weather in Paris?") as result:
            return await result.get_output()

    assert asyncio.run(streamed()) == "tool said: 18C and sunny in Paris"


def test_langchain_chat_openai_with_the_responses_api(
        weather: tuple[StrictUpstream, ProxyServer]) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    _, proxy = weather
    llm = ChatOpenAI(model="claude", base_url=f"{proxy.url}/v1", api_key=SecretStr(CLIENT_KEY),
                     use_responses_api=True, max_retries=0).bind_tools([get_weather])
    history: list[Any] = [HumanMessage("Weather in Paris?")]
    first = llm.invoke(history)
    call = first.tool_calls[0]
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    history += [first, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    assert llm.invoke(history).text == "tool said: 18C and sunny in Paris"
