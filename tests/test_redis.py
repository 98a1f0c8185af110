"""RedisStorage against the real local Redis: conformance, concurrency, failures and secrets.

Every test writes under its own key prefix and deletes it afterwards. The server is never
stopped: "the server goes away" is a TCP proxy on 127.0.0.1 that the test cuts, or CLIENT KILL
of this test's own connection.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from _server_suite import ServerBackendSuite
from _services import CutProxy, require_server
from _services import with_url as _with_url
from _wait import wait_for

from conversa import (
    ChatMessage,
    CorruptSessionError,
    StorageError,
    UnsupportedStorageURL,
    open_storage,
)
from conversa.storage import ConversationStorage, RedisStorage, UsageTotals
from conversa.testing.conformance import StorageConformance

URL = os.environ.get("CONVERSA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_PARTS = urlsplit(URL)
HOST, PORT = _PARTS.hostname or "127.0.0.1", _PARTS.port or 6379


with_url = partial(_with_url, URL)
"""This module's server URL with another host part, database or options."""


require_server("Redis", URL, "CONVERSA_TEST_REDIS_URL", 6379)

pytestmark = pytest.mark.redis

RUN = uuid.uuid4().hex[:10]
_counter = itertools.count()


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    """A plain redis-py client to look at the server directly."""
    client = aioredis.Redis.from_url(URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(admin: Any) -> AsyncIterator[str]:
    """A key prefix of this test alone; its keys are deleted, and checked gone, afterwards."""
    name = f"conversa-test-{RUN}-{next(_counter)}:"
    yield name
    keys = [k async for k in admin.scan_iter(match=f"{name}*", count=1000)]
    if keys:
        await admin.delete(*keys)
    assert [k async for k in admin.scan_iter(match=f"{name}*")] == []


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStorage]:
    storage = open_storage(with_url(prefix=prefix))
    assert isinstance(storage, RedisStorage)
    yield storage
    await storage.close()


class TestRedisConformance(StorageConformance):
    @pytest.fixture
    async def storage(self, store: RedisStorage) -> AsyncIterator[ConversationStorage]:
        yield store


# -- URL, prefix and TTL ------------------------------------------------------------------


def test_url_forms_and_repr() -> None:
    assert isinstance(open_storage("rediss://127.0.0.1:6379/0"), RedisStorage)
    shown = repr(open_storage(with_url(prefix="app1:", ttl=60)))
    assert "prefix='app1:'" in shown and "RedisStorage(" in shown
    with pytest.raises(
        UnsupportedStorageURL, match="known options: lease_ttl, prefix, timeout, ttl"
    ):
        open_storage(with_url(prefx="typo"))
    with pytest.raises(StorageError, match="number"):
        open_storage(with_url(ttl="soon"))


async def test_keys_stay_under_the_prefix(prefix: str, admin: Any) -> None:
    other = f"{prefix}other:"
    a, b = open_storage(with_url(prefix=prefix)), open_storage(with_url(prefix=other))
    try:
        await a.append("shared-id", [ChatMessage.user("from a")])
        await a.set_state("shared-id", {"k": 1}, ttl=30)
        await b.append("shared-id", [ChatMessage.user("from b")])
        assert [m.text for m in await a.load("shared-id")] == ["from a"]
        assert [m.text for m in await b.load("shared-id")] == ["from b"]
        await b.delete("shared-id")
        assert await a.exists("shared-id")
        keys = {k async for k in admin.scan_iter(match=f"{prefix}*")}
        assert keys == {
            f"{prefix}{k}"
            for k in (
                "m:shared-id",
                "i:shared-id",
                "s:shared-id",
                "x:shared-id",
                "sessions",
                "clock",
                "other:clock",
            )
        }
    finally:
        await a.close()
        await b.close()


async def test_ttl_is_set_and_refreshed_on_write(prefix: str, admin: Any) -> None:
    storage = open_storage(with_url(prefix=prefix, ttl=1000))
    try:
        await storage.append("s", [ChatMessage.user("hi")])
        await storage.set_state("s", {"k": 1}, ttl=500)
        keys = [f"{prefix}{kind}:s" for kind in "misx"]
        for key in keys:
            assert 900 < await admin.ttl(key) <= 1000, key
        for key in keys:
            await admin.expire(key, 5)
        await storage.update_info("s", user_id="u")
        for key in keys:
            assert await admin.ttl(key) > 900, key
        # the session expires: its keys go, and list_sessions drops its index entry
        await admin.delete(*keys)
        assert await admin.zscore(f"{prefix}sessions", "s") is not None
        assert await storage.list_sessions() == []
        assert await admin.zscore(f"{prefix}sessions", "s") is None
        assert not await storage.exists("s")
    finally:
        await storage.close()


async def test_expired_state_keys_are_removed(store: RedisStorage, admin: Any, prefix: str) -> None:
    await store.set_state("s", {"short": 1}, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    await store.set_state("s", {"kept": 2})
    assert await admin.hlen(f"{prefix}s:s") == 2
    assert await store.get_state("s") == {"kept": 2}
    assert await admin.hgetall(f"{prefix}s:s") == {"kept": "2"}
    assert await admin.exists(f"{prefix}x:s") == 0


async def test_damaged_message_is_reported(store: RedisStorage, admin: Any, prefix: str) -> None:
    await store.append("s", [ChatMessage.user("ok")])
    await admin.rpush(f"{prefix}m:s", "{not json")
    with pytest.raises(CorruptSessionError, match=r"message 1 of session 's'.*damaged"):
        await store.load("s")
    assert await admin.llen(f"{prefix}m:s") == 2


async def test_damaged_reserved_info_is_reported_by_every_read(
    store: RedisStorage, admin: Any, prefix: str
) -> None:
    await store.append("s", [ChatMessage.user("ok")], usage=UsageTotals(1, 1, 1))
    await admin.hset(f"{prefix}i:s", "r:flow.data", "{not json")
    for read in (store.get_info, store.get_state_and_flow):
        with pytest.raises(CorruptSessionError, match=r"reserved info of session 's'.*i:s"):
            await read("s")
    await admin.hset(f"{prefix}i:s", "r:flow.data", '{"booking": {"to": "Paris"}}')
    entries, flow = await store.get_state_and_flow("s")
    assert entries == {} and flow.data == {"booking": {"to": "Paris"}}


async def test_a_damaged_counter_refuses_the_write_whole(
    store: RedisStorage, admin: Any, prefix: str
) -> None:
    await store.append("s", [ChatMessage.user("q")], usage=UsageTotals(10, 2, 1))
    for damage in ("many", "007", "1" * 19):
        await admin.hset(f"{prefix}i:s", "r:usage.calls", damage)
        await _refused_whole(store)
    assert await store.count("s") == 1  # nothing of any write was applied
    assert await admin.hget(f"{prefix}i:s", "r:usage.prompt_tokens") == "10"


async def _refused_whole(store: RedisStorage) -> None:
    for write in (
        store.append("s", [ChatMessage.assistant("a")], usage=UsageTotals(1, 1, 1)),
        store.add_usage("s", prompt_tokens=1, calls=1),
    ):
        with pytest.raises(CorruptSessionError, match=r"r:usage\.calls of session s at .*damaged"):
            await write


def client_saw_the_drop(storage: RedisStorage) -> bool:
    """Whether every idle connection of the client has read the end of its stream."""
    idle = storage._client.connection_pool._get_free_connections()
    return all(c._reader is None or c._reader.at_eof() for c in idle)


async def test_client_kill_then_next_operation_reconnects(store: RedisStorage, admin: Any) -> None:
    await store.append("s", [ChatMessage.user("one")])
    client_id = await store._client.client_id()
    assert await admin.client_kill_filter(_id=client_id) == 1
    await store.append("s", [ChatMessage.user("two")])
    assert await store.count("s") == 2
    assert await store._client.client_id() != client_id


class TestRedisServer(ServerBackendSuite):
    NAME, URL, SPACE_OPTION = "Redis", URL, "prefix"
    DRIVER_MODULES, EXTRA = ("redis", "redis.asyncio"), "redis"
    UNREACHABLE = (
        ("missing-db", "the database number does not exist"),
        ("no-answer", "no answer in time"),
    )
    CUTS = (  # a write is one Lua script: it ran whole or not at all
        ("append", "half", False),
        ("append", "after", True),
        ("save", "half", False),
        ("save", "after", True),
    )

    @pytest.fixture
    def space(self, prefix: str) -> str:
        return prefix

    async def damage_message(self, admin: Any, space: str, session_id: str, n: int) -> None:
        await admin.lset(f"{space}m:{session_id}", n, "{not json")

    @pytest.fixture
    def unreachable_urls(self, prefix: str) -> dict[str, str]:
        return {"missing-db": self.url(prefix, path="/9999")}

    @pytest.fixture
    async def login(self, admin: Any, prefix: str) -> AsyncIterator[tuple[str, str]]:
        """A temporary ACL user allowed only this test's keys; deleted afterwards."""
        user, password = f"conversa-test-{RUN}", f"s3cret-{uuid.uuid4().hex}"
        await admin.execute_command(
            "ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{prefix}*", "+@all"
        )
        yield user, password
        assert await admin.execute_command("ACL", "DELUSER", user) == 1

    @pytest.fixture
    def wrong_logins(self, login: tuple[str, str], prefix: str) -> list[tuple[str, str]]:
        user, password = login
        netloc = f"{user}:{password}@{HOST}:{PORT}"
        return [
            (self.url(prefix, netloc=f"{user}:wrong-{password}@{HOST}:{PORT}"), "credentials"),
            (self.url(None, netloc=netloc, path="/9999"), "database number"),
        ]

    async def test_reads_and_writes_survive_dropped_connections(
        self, proxy: CutProxy, prefix: str
    ) -> None:
        storage = open_storage(self.proxied(proxy, prefix))
        try:
            await storage.append("s", [ChatMessage.user("one")])
            proxy.drop_all()
            # In life the event loop runs between an outage and the next write, and so notices
            # the closed connection; a write is never retried, so wait until the client has
            # seen it.
            await wait_for(lambda: client_saw_the_drop(storage), "the client to see the drop")
            await storage.append("s", [ChatMessage.user("two")])
            proxy.drop_all()
            # a read right after the drop: retried on a fresh connection
            assert [m.text for m in await storage.load("s")] == ["one", "two"]
        finally:
            await storage.close()
