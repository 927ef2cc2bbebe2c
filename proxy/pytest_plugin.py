"""pytest fixtures for hookproxy plugin authors. hookproxy registers this module through
the ``pytest11`` entry point, so a plugin package's tests have them once hookproxy is
installed::

    def test_my_plugin(hookproxy):
        proxy = hookproxy(plugins={"mine": my_plugin}, settings={"mine": {"limit": 3}})
        reply = proxy.openai().chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
        assert proxy.provider.last["messages"][-1]["content"] == "hi"

``hookproxy(**kwargs)`` starts a ``proxy.testing.Proxy`` (same arguments) in front of the
test's ``hookproxy_provider`` and stops it after the test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from proxy.testing import FakeProvider, Proxy


@pytest.fixture
def hookproxy_provider() -> Iterator[FakeProvider]:
    """A started ``proxy.testing.FakeProvider``, for this test."""
    from proxy.testing import FakeProvider

    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def hookproxy(hookproxy_provider: FakeProvider) -> Iterator[Callable[..., Proxy]]:
    """Starts hookproxy (``proxy.testing.Proxy``) with the given plugins and settings in
    front of ``hookproxy_provider``; what it starts is stopped after the test."""
    from proxy.testing import Proxy

    with contextlib.ExitStack() as running:
        def start(**kwargs: Any) -> Proxy:
            kwargs.setdefault("provider", hookproxy_provider)
            return running.enter_context(Proxy(**kwargs))

        yield start
