from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy import dispatch
from tests.harness import ProxyServer, upstream_config
from tests.redis_server import RedisServer
from tests.upstreams import FakeUpstream

# Every plugin marked reports_changes is checked, on every request of the suite, to report
# each change it makes (an unreported one fails the request with a 500 naming it).
dispatch.CHECK_REPORTS = True


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream: FakeUpstream) -> Iterator[ProxyServer]:
    with ProxyServer(upstream_config(upstream)) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix."""
    server = RedisServer().start()
    yield server
    server.stop()
