"""The plugin author's guide stays in step with hookspecs.py, every hook has a test, and
the guide's example runs."""

from __future__ import annotations

import inspect
import re
import textwrap
import types
from pathlib import Path

import anthropic
import pytest

from proxy import hookspecs
from tests.test_plugins import serving

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "docs" / "plugins.md").read_text()


def _specs() -> dict[str, list[str]]:
    return {
        name: list(inspect.signature(function).parameters)
        for name, function in vars(hookspecs).items()
        if callable(function) and hasattr(function, "hookproxy_spec")
    }


def _documented() -> dict[str, list[str]]:
    reference = GUIDE.split("## Hook reference", 1)[1].split("\n## ", 1)[0]
    found = {}
    for name, args in re.findall(r"^### (\w+)\(([^)]*)\)\s*$", reference, re.MULTILINE):
        found[name] = [a.strip() for a in args.split(",") if a.strip()]
    return found


def test_there_are_hooks():
    assert {"request_start", "classify", "pre_routing", "stream_chunk", "post_response",
            "request_end", "on_error"} <= set(_specs())


@pytest.mark.parametrize("hook", sorted(_specs()))
def test_every_hook_is_in_the_reference_with_its_arguments(hook):
    documented = _documented()
    assert hook in documented, f"docs/plugins.md has no '### {hook}(...)' heading"
    assert documented[hook] == _specs()[hook], f"docs/plugins.md documents {hook} with " \
                                               f"other arguments than hookspecs.py"


def test_the_reference_documents_no_hook_that_does_not_exist():
    assert set(_documented()) <= set(_specs())


@pytest.mark.parametrize("hook", sorted(_specs()))
def test_every_hook_has_a_test_of_its_own(hook):
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert re.search(rf"^def test_hook_{hook}(?:_\w+)?\(", sources, re.MULTILINE), \
        f"no test named test_hook_{hook}... in tests/"


def _guide_example() -> types.ModuleType:
    return _guide_block("## A plugin in ten lines")


def test_the_guide_example_runs(upstream):
    with serving(upstream, {"ten_lines": {"note": "Be brief."}},
                 ("ten_lines", _guide_example())) as proxy:
        ping = [{"role": "user", "content": "ping"}]
        assert proxy.openai().chat.completions.create(
            model="gpt-test", messages=ping).choices[0].message.content == "pong"
        with proxy.anthropic().messages.stream(model="claude-test", max_tokens=9,
                                               messages=ping) as stream:
            assert "".join(stream.text_stream) == "pong"
        proxy.anthropic().messages.create(
            model="claude-test", max_tokens=9, messages=[{"role": "user", "content": "hi"}])
        assert upstream.last["system"] == "Be brief."


def _guide_block(heading: str) -> types.ModuleType:
    section = GUIDE.split(heading, 1)[1]
    code = textwrap.dedent(section.split("```python\n", 1)[1].split("```", 1)[0])
    module = types.ModuleType("worked_example")
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    return module


def test_the_worked_example_runs(hookproxy):
    from aiohttp import web

    from proxy.testing import Service

    asked = []

    async def limits(request: web.Request) -> web.Response:
        asked.append(request.match_info["caller"])
        return web.json_response({"per_minute": 2})

    with Service({"GET /limits/{caller}": limits}) as service:
        proxy = hookproxy(plugins={"tenant_quota": _guide_block("## A worked example")},
                          settings={"tenant_quota": {"service": service.url}})
        hi = [{"role": "user", "content": "hi"}]
        raw = proxy.openai().chat.completions.with_raw_response.create(
            model="gpt-fake", messages=hi)
        assert raw.headers["x-quota-remaining"] == "1"
        with proxy.anthropic().messages.with_streaming_response.create(
                model="claude-fake", max_tokens=20, messages=hi, stream=True) as streamed:
            assert streamed.headers["x-quota-remaining"] == "0"
        with pytest.raises(anthropic.RateLimitError, match="anonymous has used its 2"):
            proxy.anthropic().messages.create(model="claude-fake", max_tokens=20, messages=hi)
    assert asked == ["anonymous"]  # then from the store
    assert [r.annotations["tenant_quota"]["quota"]["used"] for r in proxy.settled()] == [1, 2, 3]


def test_the_reporting_example_runs(upstream):
    # The suite checks marked hooks (tests/conftest.py): an unreported change would fail.
    example = _guide_block("- **Say what you change.**")
    messages = [{"role": "user", "content": "see ACME-INTERNAL notes"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and now?"}]
    with serving(upstream, {"internal": {}}, ("internal", example)) as proxy:
        proxy.openai().chat.completions.create(model="gpt-test", messages=messages)
        assert upstream.last["messages"] == [
            {"role": "user", "content": "see [internal] notes"}, *messages[1:]]
