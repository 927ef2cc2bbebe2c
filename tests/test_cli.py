"""The ``hookproxy`` command as a user runs it, on the shipped config.toml."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
HOKPROXY_ENV_ROOT = ROOT
HOOKPROXY = [sys.executable, "-m", "proxy.cli"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HOOKPROXY, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=60)


def serve_in(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """`hookproxy serve` on the config.toml in ``workdir``, as a subprocess, once it
    answers /health."""
    port = _free_port()
    process = subprocess.Popen([*HOOKPROXY, "serve", "--port", str(port)], cwd=workdir,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            return process, url
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"serve did not start: {process.communicate()[0]}") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`hookproxy serve` on a copy of the shipped config.toml, as a subprocess."""
    workdir = tmp_path_factory.mktemp("serve")
    shutil.copy(ROOT / "config.toml", workdir / "config.toml")
    process, url = serve_in(workdir)
    yield url, str(workdir)
    process.terminate()
    output = process.communicate(timeout=20)[0]
    assert process.returncode == 0, output


def test_shipped_config_serves_openai_sdk(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)
    result = client.chat.completions.create(
        model="mock-1", messages=[{"role": "user", "content": "Hello proxy"}])
    assert "Hello proxy" in result.choices[0].message.content
    stream = client.chat.completions.create(
        model="mock-1", messages=[{"role": "user", "content": "Hello proxy"}], stream=True)
    assert "Hello proxy" in "".join(c.choices[0].delta.content or "" for c in stream)
    assert [m.id for m in client.models.list()] == ["mock-1", "llama3.2"]


def test_shipped_config_serves_anthropic_sdk(served):
    url, _ = served
    client = anthropic.Anthropic(base_url=url, api_key="anything", max_retries=0)
    message = client.messages.create(
        model="mock-1", max_tokens=100, messages=[{"role": "user", "content": "Hi there"}])
    assert "Hi there" in message.content[0].text
    with client.messages.stream(model="mock-1", max_tokens=100,
                                messages=[{"role": "user", "content": "Hi there"}]) as stream:
        assert "Hi there" in "".join(stream.text_stream)


def test_mock_calls_tools(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)
    result = client.chat.completions.create(
        model="mock-1", messages=[{"role": "user", "content": "weather?"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}])
    call = result.choices[0].message.tool_calls[0]
    assert call.function.name == "weather" and call.function.arguments == '{"city":"mock"}'


def test_unset_key_provider_is_a_clear_404(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="OPENAI_API_KEY is not set"):
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "hi"}])


def test_check_shipped_config():
    result = run("check")
    assert result.returncode == 0, result.stderr
    assert "config.toml: OK" in result.stdout
    assert "OPENAI_API_KEY is not set" in result.stdout
    assert "mock-1                   -> mock/mock-1" in result.stdout
    assert "llama3.2                 -> local/llama3.2" in result.stdout


@pytest.mark.parametrize(("text", "expected"), [
    ('[providers.mock]\ntype = "mock"\ntiemout = 3\n', "unknown field `tiemout`"),
    ('[providers.mock]\ntype = "mock"\ntiemout = 3\n', "providers.mock"),
    ('[providers.x]\ntype = "nope"\n', "providers.x.type"),
    ('[[models]]\nname = "a"\nprovider = "ghost"\n', "models[0].provider"),
    ('[server]\nport = "eighty"\n', "server.port"),
    ("[server\n", "invalid TOML"),
    ('[plugins.not_installed]\n', "no plugin named 'not_installed'"),
])
def test_check_names_file_and_key(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in ("check", "serve"):
        result = run(command, "--config", str(path))
        assert result.returncode == 2
        assert str(path) in result.stderr and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path):
    result = run("check", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2 and "file not found" in result.stderr


def test_the_readme_quickstart_runs(served, capsys):
    """The README's quickstart snippets, as written, against `hookproxy serve`."""
    url, _ = served
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = quickstart.split("```python\n")[1:]
    assert len(blocks) == 2
    for block in blocks:
        code = block.split("```", 1)[0].replace("http://127.0.0.1:8080", url)
        exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("Mock answer from mock-1") == 4
    assert "You said: Hello!" in printed and "You said: Stream, please" in printed


def test_check_warns_about_plain_http_and_an_unset_admin_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[providers.remote]\ntype = "openai"\nbase_url = "http://llm.example.com/v1"\n'
                    '[providers.local]\ntype = "openai"\nbase_url = "http://localhost:11434/v1"\n'
                    '[auth]\nadmin_key_env = "HOOKPROXY_TEST_UNSET_ADMIN"\n'
                    '[auth.keys.a]\nkey_sha256 = "' + "0" * 64 + '"\n')
    result = run("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "providers.remote.base_url is plain http to llm.example.com" in result.stderr
    assert "providers.local" not in result.stderr  # loopback is fine
    assert "HOOKPROXY_TEST_UNSET_ADMIN, which is not set" in result.stderr
    assert "refuse everyone" in result.stderr


def test_model_names_differing_only_in_case_are_an_error(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[providers.mock]\ntype = "mock"\n'
                    '[[models]]\nname = "Mock-1"\nprovider = "mock"\n'
                    '[[models]]\nname = "mock-1"\nprovider = "mock"\n')
    for command in ("check", "serve"):
        result = run(command, "--config", str(path))
        assert result.returncode == 2
        assert "'mock-1' differs from 'Mock-1' only in case" in result.stderr
