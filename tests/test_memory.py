"""InMemoryStorage against the conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conversa import InMemoryStorage, open_storage
from conversa.storage import ConversationStorage
from conversa.testing.conformance import StorageConformance


class TestMemoryConformance(StorageConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[ConversationStorage]:
        async with InMemoryStorage() as store:
            yield store


def test_memory_url() -> None:
    assert isinstance(open_storage("memory://"), InMemoryStorage)
