"""Routing through a live server: route rules, strategies, retries, fallback, cooldown."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import openai
import pytest

from proxy.context import RequestContext
from tests.harness import ProxyServer, upstream_config

HI = [{"role": "user", "content": "hello"}]
FAST = {"retries": 2, "backoff": 0.01, "backoff_max": 0.05, "cooldown_failures": 1000}


@contextmanager
def serving(upstream: Any, models: list[dict[str, Any]], routing: dict[str, Any] | None = None,
            **extra: Any) -> Iterator[tuple[ProxyServer, list[RequestContext]]]:
    finished: list[RequestContext] = []
    config = upstream_config(upstream, **extra)
    config["models"] = models
    config["providers"]["mock_a"] = {"type": "mock"}
    config["providers"]["mock_b"] = {"type": "mock"}
    config["providers"]["mock_c"] = {"type": "mock"}
    config["routing"] = {**FAST, **(routing or {})}
    with ProxyServer(config, on_finish=finished.append) as proxy:
        yield proxy, finished


def _providers(proxy: ProxyServer, model: str, n: int) -> Counter[str]:
    client = proxy.openai()
    seen: Counter[str] = Counter()
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=HI)
        seen[raw.headers["x-hookproxy-provider"]] += 1
    return seen


def test_transient_failures_are_retried_then_fall_back(upstream):
    models = [{"name": "duo", "targets": [{"provider": "oai", "model": "r1-primary"},
                                          {"provider": "ant", "model": "r1-backup"}]}]
    upstream.script("r1-primary", [503, "drop", 500])
    with serving(upstream, models) as (proxy, finished):
        raw = proxy.openai().chat.completions.with_raw_response.create(model="duo", messages=HI)
        assert raw.parse().choices[0].message.content == "echo: hello"
        assert raw.headers["x-hookproxy-provider"] == "ant"
        assert raw.headers["x-hookproxy-attempts"] == "4"
        attempts = proxy.settled(finished)[-1].attempts
        assert [(a.provider, a.status) for a in attempts] == [
            ("oai", 503), ("oai", 0), ("oai", 500), ("ant", 200)]
        assert all(a.latency_ms > 0 for a in attempts)
        assert "unreachable" in (attempts[1].error or "")


def test_a_provider_that_times_out_falls_back_and_the_request_goes_on(upstream):
    # oai's timeout is 1.5 s (tests.harness); r30-slow answers after 3 s.
    models = [{"name": "duo", "targets": [{"provider": "oai", "model": "r30-slow"},
                                          {"provider": "ant", "model": "r30-backup"}]}]
    with serving(upstream, models, routing={"retries": 0}) as (proxy, finished):
        client = proxy.openai()
        raw = client.chat.completions.with_raw_response.create(model="duo", messages=HI)
        assert raw.parse().choices[0].message.content == "echo: hello"
        assert raw.headers["x-hookproxy-provider"] == "ant"
        attempts = proxy.settled(finished)[-1].attempts
        assert [(a.provider, a.status) for a in attempts] == [("oai", 0), ("ant", 200)]
        assert "timed out after 1.5s" in (attempts[0].error or "")
        # The same connection and the same process go on as before.
        again = client.chat.completions.create(model="oai/r30-fast", messages=HI)
        assert again.choices[0].message.content == "echo: hello"


def test_a_call_times_out_on_time_after_the_calls_before_it(upstream):
    """One timer watches a provider's calls: armed for the first call's deadline, it is
    armed again, when it fires, for the next call still in flight."""
    config = upstream_config(upstream)
    config["providers"]["ant"]["timeout"] = 1
    config["routing"] = {**FAST, "retries": 0}
    with ProxyServer(config) as proxy:
        client = proxy.anthropic()
        quick = client.messages.create(model="ant/r31-quick", max_tokens=9, messages=HI)
        assert quick.content[0].text == "echo: hello"
        time.sleep(0.5)  # the timer, armed for the quick call, fires while the next waits
        with pytest.raises(anthropic.APIStatusError, match="timed out after 1s") as caught:
            client.messages.create(model="ant/r31-slow", max_tokens=9, messages=HI)
        assert caught.value.status_code == 504  # r31-slow would answer after 3 s
        again = client.messages.create(model="ant/r31-quick", max_tokens=9, messages=HI)
        assert again.content[0].text == "echo: hello"


def test_a_retry_can_succeed_on_the_same_target(upstream):
    models = [{"name": "solo", "provider": "oai", "model": "r2-model"}]
    upstream.script("r2-model", [502])
    with serving(upstream, models) as (proxy, finished):
        message = proxy.anthropic().messages.create(model="solo", max_tokens=9, messages=HI)
        assert message.content[0].text == "echo: hello"
        assert [a.status for a in proxy.settled(finished)[-1].attempts] == [502, 200]


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_non_transient_errors_are_neither_retried_nor_fallen_back(upstream, status):
    model = f"r3-{status}"
    models = [{"name": "duo", "targets": [{"provider": "oai", "model": model},
                                          {"provider": "ant", "model": "r3-backup"}]}]
    upstream.script(model, [status])
    with serving(upstream, models) as (proxy, finished), \
            pytest.raises(openai.APIStatusError) as caught:
        proxy.openai().chat.completions.create(model="duo", messages=HI)
    assert caught.value.status_code == status
    assert upstream.count(model) == 1 and upstream.count("r3-backup") == 0
    assert len(proxy.settled(finished)[-1].attempts) == 1


def test_retry_after_is_honoured_up_to_the_cap(upstream):
    models = [{"name": "solo", "provider": "oai", "model": "r4-model"}]
    upstream.script("r4-model", [(429, "0.3"), (429, "30"), "ok"])
    with serving(upstream, models, {"retry_after_max": 0.2}) as (proxy, _):
        proxy.openai().chat.completions.create(model="solo", messages=HI)
    first, second, third = upstream.times_for("r4-model")
    assert second - first >= 0.2  # 0.3 asked, capped at 0.2
    assert 0.2 <= third - second < 5  # 30 asked, capped at 0.2


def test_context_length_error_falls_back_to_a_larger_context(upstream):
    models = [{"name": "ctx", "targets": [
        {"provider": "oai", "model": "r5-small", "context": 8000},
        {"provider": "oai", "model": "r5-same", "context": 8000},
        {"provider": "ant", "model": "r5-large", "context": 200000}]}]
    too_long = (400, "This model's maximum context length is 8000 tokens")
    upstream.script("r5-small", [too_long, too_long])
    with serving(upstream, models) as (proxy, finished):
        message = proxy.anthropic().messages.create(model="ctx", max_tokens=9, messages=HI)
        assert message.content[0].text == "echo: hello"
        assert [a.model for a in proxy.settled(finished)[-1].attempts] == ["r5-small", "r5-large"]
        assert upstream.count("r5-same") == 0
    # With no larger context configured, the 400 reaches the client.
    models = [{"name": "ctx", "provider": "oai", "model": "r5-small", "context": 8000}]
    with serving(upstream, models) as (proxy, _), \
            pytest.raises(anthropic.BadRequestError, match="maximum context length"):
        proxy.anthropic().messages.create(model="ctx", max_tokens=9, messages=HI)


def test_cooldown_skips_a_failing_target_then_brings_it_back(upstream):
    models = [{"name": "duo", "targets": [{"provider": "oai", "model": "r6-flaky"},
                                          {"provider": "ant", "model": "r6-backup"}]}]
    routing = {"retries": 0, "cooldown_failures": 2, "cooldown_window": 10, "cooldown": 0.5}
    upstream.script("r6-flaky", [500, 500])
    with serving(upstream, models, routing) as (proxy, finished):
        client = proxy.openai()
        for _ in range(4):
            client.chat.completions.create(model="duo", messages=HI)
        # Two failures put it in cooldown: the next two went straight to the backup.
        assert upstream.count("r6-flaky") == 2
        assert [len(ctx.attempts) for ctx in proxy.settled(finished)] == [2, 2, 1, 1]
        time.sleep(0.6)
        raw = client.chat.completions.with_raw_response.create(model="duo", messages=HI)
        assert raw.headers["x-hookproxy-model"] == "r6-flaky"


def test_every_target_cooling_down_is_a_clear_503(upstream):
    models = [{"name": "solo", "provider": "oai", "model": "r7-down"}]
    routing = {"retries": 0, "cooldown_failures": 1, "cooldown": 30}
    upstream.script("r7-down", [503])
    with serving(upstream, models, routing) as (proxy, _):
        client = proxy.openai()
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="solo", messages=HI)
        with pytest.raises(openai.APIStatusError, match="cooling down") as caught:
            client.chat.completions.create(model="solo", messages=HI)
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert upstream.count("r7-down") == 1


def test_streaming_falls_back_before_the_first_byte(upstream):
    models = [{"name": "duo", "targets": [{"provider": "ant", "model": "r8-primary"},
                                          {"provider": "oai", "model": "r8-backup"}]}]
    upstream.script("r8-primary", [503, "drop", 529])
    with serving(upstream, models) as (proxy, finished):
        with proxy.anthropic().messages.stream(model="duo", max_tokens=9, messages=HI) as s:
            assert "".join(s.text_stream) == "echo: hello"
        assert [a.status for a in proxy.settled(finished)[-1].attempts] == [503, 0, 529, 200]


def test_a_stream_cut_after_the_first_byte_records_the_chunk(upstream):
    models = [{"name": "cut", "provider": "oai", "model": "r9-cut"}]
    with serving(upstream, models) as (proxy, finished):
        stream = proxy.openai().chat.completions.create(
            model="cut", messages=[{"role": "user", "content": "a b c d"}], stream=True)
        with pytest.raises(openai.APIError):
            list(stream)
        ctx = proxy.settled(finished)[-1]
        # The upstream sends 3 events, then cuts the body off. When the cut is read in the
        # same batch as the last events (a busy machine), aiohttp reports it before them.
        assert ctx.failed_at_chunk in (1, 2, 3) and ctx.status == 502
        assert ctx.error is not None and ctx.error.stage == "upstream"


def test_round_robin_rotates_evenly(upstream):
    models = [{"name": "rr", "strategy": "round_robin", "targets": [
        {"provider": "mock_a"}, {"provider": "mock_b"}, {"provider": "mock_c"}]}]
    with serving(upstream, models) as (proxy, _):
        assert _providers(proxy, "rr", 30) == {"mock_a": 10, "mock_b": 10, "mock_c": 10}


def test_weighted_follows_the_weights(upstream):
    models = [{"name": "w", "strategy": "weighted", "targets": [
        {"provider": "mock_a", "weight": 3}, {"provider": "mock_b", "weight": 1}]}]
    with serving(upstream, models, {"seed": 7}) as (proxy, _):
        seen = _providers(proxy, "w", 400)
    assert 0.68 <= seen["mock_a"] / 400 <= 0.82


def test_least_latency_prefers_the_faster_target_after_warm_up(upstream):
    models = [{"name": "ll", "strategy": "least_latency", "targets": [
        {"provider": "oai", "model": "r10-delay-150"},
        {"provider": "oai", "model": "r10-delay-1"}]}]
    with serving(upstream, models) as (proxy, _):
        client = proxy.openai()
        for _ in range(12):
            client.chat.completions.create(model="ll", messages=HI)
    assert upstream.count("r10-delay-150") == 1  # measured once during warm-up
    assert upstream.count("r10-delay-1") == 11


def test_cheapest_picks_by_price(upstream):
    models = [{"name": "cheap", "strategy": "cheapest", "targets": [
        {"provider": "mock_a", "input_price": 3, "output_price": 15},
        {"provider": "mock_b", "input_price": 0.15, "output_price": 0.6},
        {"provider": "mock_c", "input_price": 1, "output_price": 4}]}]
    with serving(upstream, models) as (proxy, _):
        assert _providers(proxy, "cheap", 5) == {"mock_b": 5}


def test_route_rules_match_tags_model_and_first_match_wins(upstream):
    class Tagger:
        from proxy import hookimpl

        @hookimpl
        def classify(self, ctx):
            return ["code"] if "def " in ctx.request.prompt_text() else ["chat"]

    from proxy.plugins import PluginHost

    host = PluginHost()
    host.add(Tagger(), "tagger", "classifier")
    config = upstream_config(upstream, classifiers={"tagger": {}})
    config["models"] += [{"name": "coder", "provider": "oai", "model": "r11-coder"},
                         {"name": "chatty", "provider": "ant", "model": "r11-chatty"}]
    config["routes"] = [{"tags_all": ["code"], "to": "coder"},
                        {"model": "gpt-*", "tags_any": ["chat", "other"], "to": "chatty"}]
    with ProxyServer(config, host=host) as proxy:
        client = proxy.openai()
        code = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "fix: def f(): pass"}])
        assert code.headers["x-hookproxy-model"] == "r11-coder"
        assert code.headers["x-hookproxy-tags"] == "code"
        chat = client.chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
        assert chat.headers["x-hookproxy-model"] == "r11-chatty"
        other = client.chat.completions.with_raw_response.create(model="claude-test",
                                                                 messages=HI)
        assert other.headers["x-hookproxy-model"] == "claude-test"  # no rule matched


def test_response_headers_say_who_answered_and_the_overhead(upstream):
    models = [{"name": "solo", "provider": "oai", "model": "r12-model"}]
    with serving(upstream, models) as (proxy, _):
        raw = proxy.openai().chat.completions.with_raw_response.create(model="solo",
                                                                       messages=HI)
    assert len(raw.headers["x-request-id"]) == 32
    assert raw.headers["x-hookproxy-provider"] == "oai"
    assert raw.headers["x-hookproxy-model"] == "r12-model"
    assert float(raw.headers["x-hookproxy-overhead-ms"]) >= 0


@pytest.mark.parametrize(("models", "message"), [
    ([{"name": "x", "strategy": "fastest", "provider": "mock"}], "strategy"),
    ([{"name": "x", "strategy": "weighted",
       "targets": [{"provider": "mock", "weight": -1}]}], "models[0].targets[0].weight"),
    ([{"name": "x", "targets": [{"provider": "ghost"}]}], "models[0].targets[0].provider"),
    ([{"name": "x"}], "needs a provider or a list of targets"),
])
def test_bad_routing_config_names_the_key(upstream, models, message):
    from proxy.config import ConfigError, parse_config

    config = upstream_config(upstream)
    config["models"] = models
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(config, "r.toml")


def test_route_to_an_unknown_model_is_a_config_error(upstream):
    from proxy.config import ConfigError, parse_config

    config = upstream_config(upstream, routes=[{"tags_all": ["x"], "to": "nowhere"}])
    with pytest.raises(ConfigError, match=r"routes\[0\].to names 'nowhere'"):
        parse_config(config, "r.toml")


def test_a_failing_upstream_never_reaches_the_client_and_the_log_shows_attempts(
        upstream, tmp_path):
    import json

    models = [{"name": "duo", "targets": [{"provider": "oai", "model": "r13-status-503"},
                                          {"provider": "ant", "model": "r13-backup"}]}]
    routing = {"retries": 1, "cooldown_failures": 4, "cooldown": 0.3}
    log = {"path": str(tmp_path / "requests.jsonl")}
    with serving(upstream, models, routing, log=log) as (proxy, _):
        oai, ant = proxy.openai(), proxy.anthropic()
        for i in range(12):
            if i % 4 == 0:
                assert oai.chat.completions.create(model="duo", messages=HI).choices
            elif i % 4 == 1:
                assert "".join(c.choices[0].delta.content or "" for c in
                               oai.chat.completions.create(model="duo", messages=HI,
                                                           stream=True))
            elif i % 4 == 2:
                assert ant.messages.create(model="duo", max_tokens=9, messages=HI).content
            else:
                with ant.messages.stream(model="duo", max_tokens=9, messages=HI) as stream:
                    assert "".join(stream.text_stream)
            if i == 5:
                time.sleep(0.35)  # let the cooldown expire once
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text()
               .splitlines()]
    assert len(records) == 12 and all(r["status"] == 200 for r in records)
    shapes = [[(a["provider"], a["status"]) for a in r["attempts"]] for r in records]
    assert shapes[0] == [("oai", 503), ("oai", 503), ("ant", 200)]
    assert shapes[2] == [("ant", 200)]  # cooling down: straight to the backup
    assert [("oai", 503), ("oai", 503), ("ant", 200)] in shapes[6:]  # and back after it
