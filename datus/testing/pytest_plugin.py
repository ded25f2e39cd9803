"""pytest fixtures for the fake provider server.

Enable with `pytest_plugins = ["datus.testing.pytest_plugin"]` in a conftest.

- `fake_server`: a fresh, started server per test (starting one takes milliseconds), so a test
  may change its key, latency or script freely and never sees another test's requests.
- `fake_server_session`: one server for the whole run, for session-scoped fixtures and for
  subprocesses that need a stable URL. It is shared: call `.reset()` before relying on its
  script, requests or latency.
- `fake_agent_server`: a fresh server answering unscripted requests like a plausible model
  (the ``agent`` fallback: JSON with the keys asked for, tool calls, then an answer) instead of
  the echo.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from datus.testing.fake_server import FakeProviderServer

__all__ = ["fake_agent_server", "fake_server", "fake_server_session"]


@pytest.fixture(scope="session")
def fake_server_session() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


@pytest.fixture
def fake_server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        server.reset()
        yield server


@pytest.fixture
def fake_agent_server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(fallback="agent") as server:
        yield server
