"""The ABC's defaults: a third-party backend with only the core (and the meta pair) conforms."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conversa import (
    BackendUnavailable,
    ChatMessage,
    CorruptSessionError,
    InvalidSessionId,
    UnsupportedStorageURL,
    open_storage,
)
from conversa.errors import StorageConfigError
from conversa.session import create_session
from conversa.storage import ConversationStorage
from conversa.storage._stored import decode_info, decode_message
from conversa.storage.base import UNSET, Unset
from conversa.testing import ScriptedModel
from conversa.testing.conformance import StorageConformance


class CoreOnly(ConversationStorage):
    """Only the five abstract methods, none of them checking ids: the least the README asks."""

    def __init__(self) -> None:
        self.rows: dict[str, list[str]] = {}
        self.order: dict[str, int] = {}
        self.clock = itertools.count()

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        self.order[session_id] = next(self.clock)
        self.rows[session_id] = [m.to_json() for m in history]

    async def load(self, session_id: str) -> list[ChatMessage]:
        return [ChatMessage.from_json(r) for r in self.rows.get(session_id, [])]

    async def delete(self, session_id: str) -> None:
        for d in (self.rows, self.order):
            d.pop(session_id, None)

    async def list_sessions(self) -> list[str]:
        return sorted(self.order, key=self.order.__getitem__, reverse=True)

    async def exists(self, session_id: str) -> bool:
        return session_id in self.order


class MinimalStorage(CoreOnly):
    """The five core methods plus load_meta/save_meta, which persist info and state."""

    def __init__(self) -> None:
        super().__init__()
        self.meta: dict[str, str] = {}

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        await super().save(session_id, history)
        await self.touch(session_id)

    async def delete(self, session_id: str) -> None:
        await super().delete(session_id)
        self.meta.pop(session_id, None)

    async def load_meta(self, session_id: str) -> dict[str, Any] | None:
        raw = self.meta.get(session_id)
        return json.loads(raw) if raw else None

    async def save_meta(self, session_id: str, meta: dict[str, Any]) -> None:
        self.order[session_id] = next(self.clock)
        self.meta[session_id] = json.dumps(copy.deepcopy(meta))


class TestMinimalBackendConformance(StorageConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[ConversationStorage]:
        yield MinimalStorage()


_IN_MEMORY_WARNING = "ignore:CoreOnly does not implement load_meta:UserWarning"


@pytest.mark.filterwarnings(_IN_MEMORY_WARNING)
class TestCoreOnlyBackendConformance(StorageConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[ConversationStorage]:
        yield CoreOnly()


async def test_core_only_backend_keeps_state_in_memory_and_says_so() -> None:
    store = CoreOnly()
    with pytest.warns(UserWarning, match=r"load_meta\(\) and save_meta\(\).*in memory only"):
        session = await create_session("s", store, model=ScriptedModel(["hello"]))
        await session.state.set("k", {"v": 1})
    result = await session.send_message("hi")
    assert result.success
    assert [m.text for m in await store.load("s")] == ["hi", "hello"]
    reopened = await create_session("s", store, model=ScriptedModel())
    assert reopened.state.get("k") == {"v": 1}
    info = await store.get_info("s")
    assert info is not None and info.title == "hi"
    await store.delete("s")
    assert await store.get_state("s") == {} and await store.get_info("s") is None


async def test_the_abc_validates_ids_for_every_override() -> None:
    store = CoreOnly()
    with pytest.raises(InvalidSessionId):
        await store.save("bad\x00id", [])
    assert store.rows == {}
    with pytest.raises(InvalidSessionId):
        await store.exists(42)  # type: ignore[arg-type]


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


async def test_search_default_finds_substrings_newest_session_first() -> None:
    store = MinimalStorage()
    await store.append(
        "old", [ChatMessage.user("The Quick brown fox"), ChatMessage.assistant("ok")]
    )
    await store.append("new", [ChatMessage.user("no match"), ChatMessage.assistant("quick reply")])
    hits = await store.search("QUICK")
    assert [(h.session_id, h.position, h.message.text) for h in hits] == [
        ("new", 1, "quick reply"),
        ("old", 0, "The Quick brown fox"),
    ]
    assert len(await store.search("quick", limit=1)) == 1
    assert await store.search("   ") == []


async def test_copy_session_between_backends_is_repeatable() -> None:
    from conversa.storage import InMemoryStorage
    from conversa.storage.transfer import copy_session, migrate

    source, target = MinimalStorage(), InMemoryStorage()
    await source.append("a", [ChatMessage.user("hello"), ChatMessage.assistant("hi")])
    await source.update_info("a", user_id="alice", status="completed", metadata={"x": 1})
    await source.set_state("a", {"k": [1, 2]})
    await source.set_state("a", {"soon": 1}, ttl=6)
    await source.append("b", [ChatMessage.user("second")])
    await source.update_info("b", title="Named")
    for _ in range(2):
        copied = [c async for c in migrate(source, target)]
        assert [(c.session_id, c.messages, c.state_keys) for c in copied] == [
            ("a", 2, 2),
            ("b", 1, 0),
        ]
    assert await target.list_sessions() == ["b", "a"]
    assert await target.load("a") == await source.load("a")
    assert await target.get_state_entries("a") == await source.get_state_entries("a")
    soon = (await target.get_state_entries("a"))["soon"].expires_at
    assert soon is not None and soon <= datetime.now(UTC) + timedelta(seconds=6)
    for sid in ("a", "b"):
        copied_info, source_info = await target.get_info(sid), await source.get_info(sid)
        assert copied_info is not None and source_info is not None
        assert (copied_info.created_at, copied_info.updated_at) == (
            source_info.created_at,
            source_info.updated_at,
        )
    info = await target.get_info("a")
    assert info is not None
    assert (info.user_id, info.status, info.metadata, info.title) == (
        "alice",
        "completed",
        {"x": 1},
        "hello",
    )
    info_b = await target.get_info("b")
    assert info_b is not None and info_b.title == "Named"
    fork = await copy_session(target, target, "a", "a-fork")
    assert fork.messages == 2
    await target.append("a-fork", [ChatMessage.user("diverge")])
    assert await target.count("a") == 2


# -- configuration and errors: one type for bad settings, causes kept ----------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?ttl=soon",
        "redis://127.0.0.1:6379/0?timeout=x",
        "postgresql://postgres@127.0.0.1:5432/test?pool_size=many",
        "postgresql://postgres@127.0.0.1:5432/test?timeout=later",
        "sqlite:///x.db?durability=always",
        "file:///tmp/x?durability=always",
    ],
)
def test_bad_numbers_and_durability_in_urls_raise_the_config_error(url: str) -> None:
    with pytest.raises(StorageConfigError) as err:
        open_storage(url)
    assert isinstance(err.value, UnsupportedStorageURL)


def test_bad_numbers_in_urls_keep_their_cause() -> None:
    with pytest.raises(StorageConfigError) as err:
        open_storage("redis://127.0.0.1:6379/0?ttl=soon")
    assert isinstance(err.value.__cause__, ValueError)


def test_bad_constructor_settings_raise_the_config_error(tmp_path: Any) -> None:
    from conversa.storage import FileSystemStorage, PostgresStorage, RedisStorage, SqliteStorage

    bad: list[Callable[[], object]] = [
        lambda: FileSystemStorage(tmp_path, durability="always"),
        lambda: SqliteStorage(tmp_path / "x.db", durability="always"),  # type: ignore[arg-type]
        lambda: RedisStorage(ttl=0),
        lambda: RedisStorage(timeout=-1),
        lambda: PostgresStorage(timeout=0),
        lambda: PostgresStorage(pool_size=0),
        lambda: PostgresStorage(schema="no spaces"),
    ]
    for make in bad:
        with pytest.raises(StorageConfigError):
            make()


async def test_redis_connection_errors_keep_their_cause() -> None:
    from conversa.storage import RedisStorage

    store = RedisStorage("redis://127.0.0.1:1/0", timeout=2)
    try:
        with pytest.raises(BackendUnavailable) as err:
            await store.count("s")
        assert err.value.__cause__ is not None
    finally:
        await store.close()


def test_decoders_name_the_place_and_keep_the_cause() -> None:
    with pytest.raises(CorruptSessionError, match=r"^message 3 in T is damaged: invalid JSON") as e:
        decode_message('{"role": "user"', "message 3 in T", "fix it")
    assert isinstance(e.value.__cause__, json.JSONDecodeError)
    with pytest.raises(CorruptSessionError, match="the metadata of session 's' in T") as e:
        decode_info(
            "s",
            {"metadata": "[1]"},
            created_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
            message_count=0,
            default_title=None,
            where="T",
        )


def test_state_value_error_is_exported_everywhere() -> None:
    import conversa
    import conversa.storage
    from conversa import errors

    assert conversa.StateValueError is errors.StateValueError
    assert conversa.storage.StateValueError is errors.StateValueError
    assert issubclass(errors.StateValueError, ValueError)


async def test_update_info_without_fields_only_touches() -> None:
    store = MinimalStorage()
    await store.append("s", [ChatMessage.user("hi")])
    info = await store.update_info("s")
    assert (info.title, info.status, info.metadata) == ("hi", "active", {})
    assert repr(UNSET) == "UNSET" and isinstance(UNSET, Unset)
