"""Every endpoint where the traffic is watched: the dashboard's endpoint column and
filter (in Debian's Chromium, driven by Playwright) and ``hookproxy tail --endpoint``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.harness import ProxyServer, wait_for
from tests.test_dashboard_browser import CHROMIUM, FLAGS

CONFIG = {"providers": {"mock": {"type": "mock"}},
          "models": [{"name": "mock-1", "provider": "mock"}]}


def _traffic(proxy: ProxyServer) -> None:
    client = proxy.openai()
    client.chat.completions.create(model="mock-1", messages=[{"role": "user", "content": "a"}])
    created = client.responses.create(model="mock-1", input="b")
    client.responses.retrieve(created.id)
    client.embeddings.create(model="mock-1", input="c")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nothing-here")


def test_dashboard_shows_and_filters_endpoints(tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), "Chromium is needed: .ci/run installs Debian's chromium"
    with ProxyServer({**CONFIG, "log": {"path": str(tmp_path / "r.jsonl")}}) as proxy, \
            sync_playwright() as playwright:
        _traffic(proxy)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{proxy.url}/dashboard")
            rows = page.locator("#rows tbody tr")
            expect(rows).to_have_count(5)
            expect(rows.nth(1)).to_contain_text("/v1/embeddings")
            page.select_option("#f-endpoint", "/v1/responses")
            expect(rows).to_have_count(2)  # the POST and the GET of the stored response
            expect(rows.first).to_contain_text("/v1/responses/resp_")
            page.select_option("#f-endpoint", "other")
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("404")
            page.select_option("#f-endpoint", "")
            page.select_option("#group-by", "endpoint")
            expect(page.locator("#breakdown")).to_contain_text("/v1/embeddings")
        finally:
            browser.close()


def test_tail_shows_and_filters_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ProxyServer({**CONFIG, "log": {"path": str(path)}}) as proxy:
        _traffic(proxy)
        wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 5)
    command = [sys.executable, "-m", "proxy.cli", "tail", "--file", str(path), "--no-follow"]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    assert "mock-1 -> mock/mock-1  embeddings" in shown
    only = subprocess.run([*command, "--endpoint", "responses"], capture_output=True,
                          text=True, timeout=30).stdout.splitlines()
    assert len(only) == 2 and "  responses  " in only[0] and "  responses/resp_" in only[1]
