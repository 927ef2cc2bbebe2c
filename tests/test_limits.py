"""Keys' limits hold exactly under concurrency and for streams: a request reserves what it
may cost before the provider is called and is charged what it used once it is over."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import structlog

from tests.harness import ProxyServer, upstream_config, wait_for

KEYS = {"TEAM_A_KEY": "sk-team-a-limits-0123456789", "TEAM_B_KEY": "sk-team-b-limits-0123456789",
        "HP_ADMIN_KEY": "admin-limits-0123456789"}
# 64 characters: an estimated 16 tokens of prompt. The fake upstream reports 11 + 7 = 18
# tokens (OpenAI) or 13 + 5 (Anthropic) for any answer.
PROMPT = [{"role": "user", "content": "tell me about limits that hold under concurrency, "
                                      "please, exactly"[:64]}]
MAX_TOKENS = 7
RESERVED = 16 + MAX_TOKENS  # tokens a request reserves
PRICE = 1000.0  # per million tokens, in and out: a token costs 0.001
RESERVED_COST = RESERVED * PRICE / 1e6  # 0.023
USED_COST = 18 * PRICE / 1e6  # 0.018


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    return KEYS


def limits_config(upstream: Any, tmp_path: Path, **team_a: Any) -> dict[str, Any]:
    config = upstream_config(upstream)
    config["models"] += [
        {"name": "priced", "provider": "oai", "model": "priced-model",
         "input_price": PRICE, "output_price": PRICE},
        {"name": "priced-ant", "provider": "ant", "model": "priced-model",
         "input_price": PRICE, "output_price": PRICE},
        {"name": "drip", "provider": "oai", "model": "priced-drip",
         "input_price": PRICE, "output_price": PRICE},
        {"name": "cut", "provider": "ant", "model": "priced-cut",
         "input_price": PRICE, "output_price": PRICE},
    ]
    config["log"] = {"path": str(tmp_path / "requests.jsonl")}
    config["auth"] = {"admin_key_env": "HP_ADMIN_KEY", "keys": {
        "team-a": {"key_env": "TEAM_A_KEY", **team_a},
        "team-b": {"key_env": "TEAM_B_KEY"}}}
    return config


def records(tmp_path: Path, count: int) -> list[dict[str, Any]]:
    path = tmp_path / "requests.jsonl"

    def read() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        found = [json.loads(x) for x in path.read_text().splitlines()]
        return found if len(found) >= count else []

    return wait_for(read)


def clear_of_the_minute() -> None:
    """rpm and tpm count per clock minute: a test of them must not straddle two."""
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


def concurrently(url: str, key: str, count: int, model: str = "priced",
                 **extra: Any) -> list[int]:
    """Sends ``count`` requests at once; their statuses."""
    async def run() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key,
                                      max_retries=0, timeout=30) as client:
            async def one() -> int:
                try:
                    await client.chat.completions.create(
                        model=model, messages=PROMPT, max_tokens=MAX_TOKENS, **extra)
                except openai.APIStatusError as exc:
                    return exc.status_code
                return 200

            return list(await asyncio.gather(*(one() for _ in range(count))))

    return asyncio.run(run())


def test_concurrent_requests_never_overspend_tokens_or_a_budget(upstream, tmp_path, keys):
    # Room for three reservations of tokens, and of money; each request uses less than it
    # reserved, but not enough less for a fourth to fit afterwards.
    clear_of_the_minute()
    config = limits_config(upstream, tmp_path, tpm=3 * RESERVED,
                           daily_budget=round(3 * RESERVED_COST, 6))
    with ProxyServer(config) as proxy:
        statuses = concurrently(proxy.url, keys["TEAM_A_KEY"], 50)
    assert sorted(statuses) == [200] * 3 + [429] * 47
    found = records(tmp_path, 50)
    answered = [r for r in found if r["status"] == 200]
    assert len(answered) == 3
    for record in answered:
        assert record["limits"]["reserved_tokens"] == RESERVED
        assert record["limits"]["reserved_cost"] == pytest.approx(RESERVED_COST)
        assert record["limits"]["tokens"] == 18
        assert record["limits"]["cost"] == pytest.approx(record["cost"])
    assert sum(r["cost"] for r in found) == pytest.approx(3 * USED_COST)
    refused = [r for r in found if r["status"] == 429]
    assert {r["error"]["type"] for r in refused} <= {"rate_limit_tpm", "budget_exhausted"}


def test_requests_per_minute_hold_exactly_under_concurrency(upstream, tmp_path, keys):
    clear_of_the_minute()
    with ProxyServer(limits_config(upstream, tmp_path, rpm=20)) as proxy:
        statuses = concurrently(proxy.url, keys["TEAM_A_KEY"], 60, model="gpt-test")
        # The other key is not counted with it.
        assert concurrently(proxy.url, keys["TEAM_B_KEY"], 5, model="gpt-test") == [200] * 5
    assert sorted(statuses) == [200] * 20 + [429] * 40


def test_every_answer_carries_what_is_left(upstream, tmp_path, keys):
    clear_of_the_minute()
    config = limits_config(upstream, tmp_path, rpm=5, tpm=1000, daily_budget=1.0,
                           monthly_budget=10.0)
    with ProxyServer(config) as proxy:
        client = proxy.openai(api_key=keys["TEAM_A_KEY"])
        first = client.chat.completions.with_raw_response.create(
            model="priced", messages=PROMPT, max_tokens=MAX_TOKENS)
        proxy.settled(None)
        second = client.chat.completions.with_raw_response.create(
            model="priced", messages=PROMPT, max_tokens=MAX_TOKENS)
        h1, h2 = first.headers, second.headers
        assert h1["x-ratelimit-limit-requests"] == "5"
        assert h1["x-ratelimit-remaining-requests"] == "4"
        assert h2["x-ratelimit-remaining-requests"] == "3"
        assert 0 < int(h1["x-ratelimit-reset-requests"].rstrip("s")) <= 60
        assert h1["x-ratelimit-limit-tokens"] == "1000"
        # After this request's reservation; the second sees the first one's real use.
        assert int(h1["x-ratelimit-remaining-tokens"]) == 1000 - RESERVED
        assert int(h2["x-ratelimit-remaining-tokens"]) == 1000 - 18 - RESERVED
        assert float(h1["x-ratelimit-limit-budget-daily"]) == 1.0
        assert float(h1["x-ratelimit-remaining-budget-daily"]) == pytest.approx(
            1.0 - RESERVED_COST)
        assert float(h2["x-ratelimit-remaining-budget-daily"]) == pytest.approx(
            1.0 - USED_COST - RESERVED_COST)
        assert float(h2["x-ratelimit-remaining-budget-monthly"]) == pytest.approx(
            10.0 - USED_COST - RESERVED_COST)
        # The Anthropic endpoint and streams carry them too, and so does a refusal.
        ant = proxy.anthropic(api_key=keys["TEAM_A_KEY"])
        with ant.messages.with_streaming_response.create(
                model="priced-ant", max_tokens=MAX_TOKENS, messages=PROMPT,
                stream=True) as streamed:
            assert streamed.headers["x-ratelimit-remaining-requests"] == "2"
        proxy.settled(None)
        client.chat.completions.create(model="priced", messages=PROMPT, max_tokens=1)
        client.chat.completions.create(model="priced", messages=PROMPT, max_tokens=1)
        with pytest.raises(openai.RateLimitError, match="5 requests per minute") as caught:
            client.chat.completions.create(model="priced", messages=PROMPT, max_tokens=1)
        headers = caught.value.response.headers
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(headers["retry-after"]) <= 61
        # A key without limits gets none of these.
        plain = proxy.openai(api_key=keys["TEAM_B_KEY"]).chat.completions.with_raw_response\
            .create(model="priced", messages=PROMPT, max_tokens=1)
        assert "x-ratelimit-remaining-requests" not in plain.headers


def test_count_tokens_is_a_request_of_no_tokens(upstream, tmp_path, keys):
    clear_of_the_minute()
    config = limits_config(upstream, tmp_path, rpm=2, tpm=1000)
    with ProxyServer(config) as proxy:
        # A client that leaves while its count is under way: counted, never charged tokens
        # (a count generates nothing).
        with pytest.raises(anthropic.APITimeoutError):
            proxy.anthropic(api_key=keys["TEAM_A_KEY"], timeout=0.3).messages.count_tokens(
                model="ant/claude-delay-1000", messages=PROMPT)
        records(tmp_path, 1)  # settled
        client = proxy.anthropic(api_key=keys["TEAM_A_KEY"])
        counted = client.messages.with_raw_response.count_tokens(model="priced-ant",
                                                                 messages=PROMPT)
        assert counted.headers["x-ratelimit-limit-requests"] == "2"
        assert counted.headers["x-ratelimit-remaining-requests"] == "0"
        assert counted.headers["x-ratelimit-remaining-tokens"] == "1000"
        for refused in (lambda: client.messages.count_tokens(model="priced-ant",
                                                             messages=PROMPT),
                        lambda: client.messages.create(model="priced-ant", messages=PROMPT,
                                                       max_tokens=MAX_TOKENS)):
            with pytest.raises(anthropic.RateLimitError, match="2 requests per minute") \
                    as caught:
                refused()
            error: Any = caught.value.body
            assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
            assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
        found = records(tmp_path, 4)
    assert [r["status"] for r in found] == [499, 200, 429, 429]
    assert [r["limits"].get("tokens", 0) for r in found[:2]] == [0, 0]


def test_crossing_a_budget_warn_threshold_is_logged_counted_and_marked(upstream, tmp_path,
                                                                        keys):
    config = limits_config(upstream, tmp_path, daily_budget=0.1, daily_budget_warn=0.5)
    with ProxyServer(config) as proxy:
        client = proxy.openai(api_key=keys["TEAM_A_KEY"])
        with structlog.testing.capture_logs() as logged:
            for _ in range(4):  # 0.018 each: the third carries it past 0.05
                client.chat.completions.create(model="priced", messages=PROMPT,
                                               max_tokens=MAX_TOKENS)
                proxy.settled(None)
        request = urllib.request.Request(proxy.url + "/metrics", headers={
            "authorization": f"Bearer {keys['HP_ADMIN_KEY']}"})
        metrics = urllib.request.urlopen(request).read().decode()
    found = records(tmp_path, 4)
    assert [r["limits"].get("warnings", []) for r in found] == [[], [], ["daily"], []]
    warnings = [e for e in logged if e["event"] == "budget_warning"]
    assert len(warnings) == 1 and warnings[0]["key"] == "team-a"
    assert warnings[0]["budget"] == "daily" and warnings[0]["spent"] == pytest.approx(0.054)
    assert 'hookproxy_budget_warnings_total{budget="daily",key="team-a"} 1.0' in metrics


def test_a_request_larger_than_the_limit_is_told_so(upstream, tmp_path, keys):
    config = limits_config(upstream, tmp_path, daily_budget=0.01)
    with ProxyServer(config) as proxy, pytest.raises(
            openai.RateLimitError, match=r"this request alone may cost 0\.023000"):
        proxy.openai(api_key=keys["TEAM_A_KEY"]).chat.completions.create(
            model="priced", messages=PROMPT, max_tokens=MAX_TOKENS)


def _cut_stream(url: str, key: str) -> int:
    """Streams from the dripping model, reads three chunks and hangs up; or the status
    it was refused with."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    try:
        stream = client.chat.completions.create(model="drip", messages=PROMPT,
                                                max_tokens=200, stream=True)
    except openai.APIStatusError as exc:
        return exc.status_code
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    return 499


def test_streams_cut_off_by_their_clients_are_charged(upstream, tmp_path, keys):
    # Room for two reservations of 216 tokens' worth (0.216); eight streams at once.
    config = limits_config(upstream, tmp_path, daily_budget=0.45)
    with ProxyServer(config) as proxy:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: _cut_stream(proxy.url, keys["TEAM_A_KEY"]),
                                     range(8)))
        cut = statuses.count(499)
        assert cut >= 2 and set(statuses) <= {499, 429}
        found = records(tmp_path, 8)
        charged = [r for r in found if r["status"] == 499]
        assert len(charged) == cut
        for record in charged:
            # The provider generated what the client read, and more: charged as estimated.
            assert record["usage_estimated"] is True
            assert record["input_tokens"] == 16 and record["output_tokens"] >= 3
            assert record["cost"] > 0
            assert record["limits"]["estimated"] is True
            assert record["limits"]["cost"] == pytest.approx(record["cost"])
        spent = sum(r["cost"] for r in charged)
        # The budget saw every one of them: what is left says so.
        after = proxy.openai(api_key=keys["TEAM_A_KEY"]).chat.completions.with_raw_response\
            .create(model="priced", messages=PROMPT, max_tokens=MAX_TOKENS)
        remaining = float(after.headers["x-ratelimit-remaining-budget-daily"])
        assert remaining == pytest.approx(0.45 - spent - RESERVED_COST, abs=1e-6)
    # Never more than one request's reservation over the limit.
    assert spent <= 0.45 + (16 + 200) * PRICE / 1e6


def test_a_stream_the_provider_breaks_midway_is_charged_for_what_came(upstream, tmp_path,
                                                                      keys):
    with ProxyServer(limits_config(upstream, tmp_path, daily_budget=1.0)) as proxy:
        client = proxy.anthropic(api_key=keys["TEAM_A_KEY"])
        with pytest.raises(anthropic.APIError), client.messages.stream(
                model="cut", max_tokens=MAX_TOKENS, messages=PROMPT) as stream:
            for _ in stream:
                pass
    (record,) = records(tmp_path, 1)
    assert record["status"] == 502 and record["usage_estimated"] is True
    # The provider said 13 input tokens at the start; the text that came is estimated.
    assert record["input_tokens"] == 13 and record["output_tokens"] >= 1
    assert record["limits"]["cost"] == pytest.approx(record["cost"]) and record["cost"] > 0
