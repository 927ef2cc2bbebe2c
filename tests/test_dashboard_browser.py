"""The dashboard page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from proxy import RequestContext, hookimpl
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, upstream_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "Chromium is needed: .ci/run installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def test_dashboard_shows_traffic_live(upstream, browser, tmp_path):
    config = upstream_config(upstream, classifiers={"language": {}})
    config["log"] = {"path": str(tmp_path / "requests.jsonl")}
    with ProxyServer(config) as proxy:
        client = proxy.openai()
        client.chat.completions.create(model="gpt-test", messages=[
            {"role": "user", "content": "an earlier request"}])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script("window.__xss = 0")
        page.goto(f"{proxy.url}/dashboard")
        expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        rows = page.locator("#rows tbody tr")
        expect(rows).to_have_count(1)  # replayed from what the server holds
        expect(page.locator("#c-total")).to_have_text("1")

        # A request sent through the proxy appears within a second, newest first.
        hostile = ('hello, what is this? <img src=x onerror="window.__xss=1">'
                   "<script>window.__xss=2</script>")
        raw = client.chat.completions.with_raw_response.create(
            model="claude-test", messages=[{"role": "user", "content": hostile}])
        request_id = raw.headers["x-request-id"]
        newest = page.locator(f'#rows tbody tr[data-id="{request_id}"]')
        expect(newest).to_be_visible(timeout=1000)
        expect(rows.first).to_have_attribute("data-id", request_id)
        expect(newest).to_contain_text("claude-test")
        expect(newest).to_contain_text("lang:en")
        expect(page.locator("#c-total")).to_have_text("2")  # the counters move

        # Its detail opens, with the prompt shown as text, never run as markup.
        newest.click()
        detail = page.locator("#detail")
        expect(detail).to_be_visible()
        expect(page.locator("#d-messages")).to_contain_text("<script>window.__xss=2</script>")
        expect(page.locator("#d-response")).to_contain_text("echo: hello")
        expect(page.locator("#d-attempts")).to_contain_text("ant")
        assert page.evaluate("window.__xss") == 0
        assert page.locator("#d-messages img").count() == 0

        # A failed request shows as an error; a filter hides the other rows.
        with pytest.raises(Exception):  # noqa: B017 - any SDK error will do
            client.chat.completions.create(model="nope", messages=[
                {"role": "user", "content": "x"}])
        expect(rows).to_have_count(3)
        page.fill("#f-model", "claude")
        expect(rows).to_have_count(1)
        page.fill("#f-model", "")
        page.select_option("#f-status", "error")
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("404")
        expect(page.locator("#c-errors")).to_have_text("100.0%")
        page.select_option("#f-status", "")
        expect(page.locator("#c-errors")).to_have_text("33.3%")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        page.close()


class _Annotates:
    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        ctx.annotate("verdict", {"allowed": True, "score": 0.25})
        ctx.annotate("tenant", '<img src=x onerror="window.__xss=3">')


def test_detail_view_shows_plugin_annotations(upstream, browser):
    host = PluginHost()
    host.discover()
    host.add(_Annotates(), "notes")
    with ProxyServer(upstream_config(upstream, plugins={"notes": {}}), host=host) as proxy:
        raw = proxy.anthropic().messages.with_raw_response.create(
            model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script("window.__xss = 0")
        page.goto(f"{proxy.url}/dashboard")
        page.locator(f'#rows tbody tr[data-id="{raw.headers["x-request-id"]}"]').click()
        facts = page.locator("#d-facts")
        expect(facts).to_contain_text("notes · verdict")
        expect(facts).to_contain_text('{"allowed":true,"score":0.25}')
        # Shown as text, never run as markup.
        expect(facts).to_contain_text('<img src=x onerror="window.__xss=3">')
        assert page.evaluate("window.__xss") == 0 and facts.locator("img").count() == 0
        page.close()
