"""The built-in classifiers, through a live server (tags come back in x-hookproxy-tags)."""

from __future__ import annotations

import pytest

from classifiers.code import looks_like_code
from classifiers.language import detect_language
from tests.test_plugins import serving

CLASSIFIERS = {
    "keyword": {"tags": {"billing": ["invoice", "credit card"], "art": ["art"]}},
    "regex": {"tags": {"ticket": r"\b[A-Z]{2,}-\d+\b"}},
    "prompt_size": {"thresholds": {"long_context": 50, "huge": 100000}},
    "code": {},
    "features": {},
    "language": {},
}


def _tags(proxy, **kwargs) -> set[str]:
    raw = proxy.openai().chat.completions.with_raw_response.create(model="mock-1", **kwargs)
    raw.parse()
    return set(filter(None, raw.headers.get("x-hookproxy-tags", "").split(",")))


def _say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_each_classifier_tags_what_it_should(upstream):
    with serving(upstream, classifiers=CLASSIFIERS) as proxy:
        assert _tags(proxy, messages=_say("Where is my INVOICE for JIRA-42?")) == {
            "billing", "ticket", "lang:en"}
        # whole words only: "start" is not "art"
        assert _tags(proxy, messages=_say("Let us start")) == {"lang:en"}
        assert "long_context" in _tags(proxy, messages=_say("word " * 60))
        assert "code" in _tags(proxy, messages=_say("Please write a python function"))
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        image = [{"type": "text", "text": "what is this"},
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]
        assert {"tools", "images", "json"} <= _tags(
            proxy, messages=[{"role": "user", "content": image}], tools=tools,
            response_format={"type": "json_object"})
        assert _tags(proxy, messages=_say("Bonjour, comment est-ce que je peux payer?")) \
            >= {"lang:fr"}


def test_features_sees_images_inside_tool_results(upstream):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AA"}}
    turns = [{"role": "user", "content": "look"},
             {"role": "assistant", "content": [{"type": "tool_use", "id": "t1",
                                                "name": "shot", "input": {}}]}]
    with serving(upstream, classifiers={"features": {}}) as proxy:
        for content, expected in (([{"type": "text", "text": "ok"}], {"tool_results"}),
                                  ([image], {"tool_results", "images"})):
            raw = proxy.anthropic().messages.with_raw_response.create(
                model="mock-1", max_tokens=5, messages=[*turns, {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": content}]}])
            raw.parse()
            assert set(raw.headers["x-hookproxy-tags"].split(",")) == expected


def test_streaming_requests_are_tagged_too(upstream):
    with serving(upstream, classifiers={"features": {}}) as proxy:
        raw = proxy.openai().chat.completions.with_raw_response.create(
            model="mock-1", messages=_say("hi"), stream=True)
        assert raw.headers["x-hookproxy-tags"] == "streaming"


def test_code_questions_and_small_talk_go_to_different_models(upstream):
    routes = [{"tags_all": ["code"], "to": "claude-test"}]
    with serving(upstream, classifiers={"code": {}}, routes=routes) as proxy:
        client = proxy.anthropic()
        code = client.messages.with_raw_response.create(
            model="gpt-test", max_tokens=20,
            messages=_say("Why does this fail?\n```\nfor (i = 0; i < n; i++) {\n```"))
        chat = client.messages.with_raw_response.create(
            model="gpt-test", max_tokens=20, messages=_say("How was your weekend?"))
        assert code.headers["x-hookproxy-model"] == "claude-test"
        assert chat.headers["x-hookproxy-model"] == "gpt-test"


@pytest.mark.parametrize(("text", "expected"), [
    ("def add(a, b):\n    return a + b", True),
    ("Traceback (most recent call last):\n  File x", True),
    ("SELECT name FROM users WHERE id = 1", True),
    ("Can you refactor this function to be faster?", True),
    ("How do I reverse a list in Rust?", True),
    ("What a lovely day for a walk in the park.", False),
    ("I would like to book a table for two tonight.", False),
])
def test_looks_like_code(text, expected):
    assert looks_like_code(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ("What is the weather like in Paris today?", "en"),
    ("¿Qué tiempo hace hoy en la ciudad?", "es"),
    ("Wie ist das Wetter heute in der Stadt?", "de"),
    ("Qual é a previsão do tempo para você hoje?", "pt"),
    ("今日の天気はどうですか", "ja"),
    ("今天天气怎么样", "zh"),
    ("오늘 날씨 어때요", "ko"),
    ("Какая сегодня погода?", "ru"),
    ("Яка сьогодні погода у місті?", "uk"),  # noqa: RUF001
    ("ما هو الطقس اليوم", "ar"),
    ("12345 !!!", None),
])
def test_detect_language(text, expected):
    assert detect_language(text) == expected


def test_bad_classifier_settings_name_the_classifier(upstream):
    from proxy.config import ConfigError

    with pytest.raises(ConfigError,
                       match=r"\[classifiers.regex\].*not a pattern hookproxy can run"), \
            serving(upstream, classifiers={"regex": {"tags": {"x": "(oops"}}}):
        pass
