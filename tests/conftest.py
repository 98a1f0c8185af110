"""Shared test settings and fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _cli import child_env
from _closing import close_all
from hypothesis import settings

from conversa.testing.server import FakeOpenAIServer

# CI machines are small: let hypothesis take its time rather than flag slow examples.
settings.register_profile("conversa", deadline=None)
settings.load_profile("conversa")


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    """The fake OpenAI-compatible model server on 127.0.0.1, stopped after the test."""
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def env(tmp_path: Path, server: FakeOpenAIServer) -> dict[str, str]:
    """The environment of a `conversa` child: only 127.0.0.1, everything else in tmp_path."""
    return child_env(tmp_path, server)


@pytest.fixture
async def close_opened() -> AsyncIterator[None]:
    """Close, on the test's event loop, what the test registered with ``_closing.opened``."""
    yield
    await close_all()
