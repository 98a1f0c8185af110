"""The ABC's defaults: a third-party backend with only the core and the meta pair conforms."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from conversa import ChatMessage, UnsupportedStorageURL, open_storage
from conversa.storage import ConversationStorage, validate_session_id
from conversa.testing.conformance import StorageConformance


class MinimalStorage(ConversationStorage):
    """Just the five core methods and load_meta/save_meta, as the docs tell third parties."""

    def __init__(self) -> None:
        self.rows: dict[str, list[str]] = {}
        self.meta: dict[str, str] = {}
        self.order: dict[str, int] = {}
        self.clock = itertools.count()

    def _touch(self, sid: str) -> None:
        self.order[validate_session_id(sid)] = next(self.clock)

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        self._touch(session_id)
        self.rows[session_id] = [m.to_json() for m in history]

    async def load(self, session_id: str) -> list[ChatMessage]:
        validate_session_id(session_id)
        return [ChatMessage.from_json(r) for r in self.rows.get(session_id, [])]

    async def delete(self, session_id: str) -> None:
        validate_session_id(session_id)
        for d in (self.rows, self.meta, self.order):
            d.pop(session_id, None)

    async def list_sessions(self) -> list[str]:
        return sorted(self.order, key=self.order.__getitem__, reverse=True)

    async def exists(self, session_id: str) -> bool:
        return validate_session_id(session_id) in self.order

    async def load_meta(self, session_id: str) -> dict[str, Any] | None:
        raw = self.meta.get(session_id)
        return json.loads(raw) if raw else None

    async def save_meta(self, session_id: str, meta: dict[str, Any]) -> None:
        self._touch(session_id)
        self.meta[session_id] = json.dumps(copy.deepcopy(meta))


class TestMinimalBackendConformance(StorageConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[ConversationStorage]:
        yield MinimalStorage()


class CoreOnly(MinimalStorage):
    load_meta = ConversationStorage.load_meta
    save_meta = ConversationStorage.save_meta


async def test_core_only_backend_says_what_to_implement() -> None:
    store = CoreOnly()
    await store.append("s", [ChatMessage.user("hi")])
    assert [m.text for m in await store.load("s")] == ["hi"]
    with pytest.raises(NotImplementedError, match=r"load_meta\(\) and save_meta\(\)"):
        await store.set_state("s", {"k": 1})


@pytest.mark.parametrize("url", ["", "ftp://x", "mongodb://localhost/db", "nosuch://"])
def test_unknown_urls_list_supported_forms(url: str) -> None:
    with pytest.raises(UnsupportedStorageURL) as err:
        open_storage(url)
    text = str(err.value)
    for form in ("memory://", "file://DIR", "sqlite:///PATH", "redis://", "postgresql://"):
        assert form in text


def test_unknown_url_hides_password() -> None:
    with pytest.raises(UnsupportedStorageURL) as err:
        open_storage("mongodb://bob:s3cret@localhost/db")
    assert "s3cret" not in str(err.value)
    assert "bob:***@localhost" in str(err.value)
