"""RedisStorage against the real local Redis: conformance, concurrency, failures and secrets.

Every test writes under its own key prefix and deletes it afterwards. The server is never
stopped: "the server goes away" is a TCP proxy on 127.0.0.1 that the test cuts, or CLIENT KILL
of this test's own connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import traceback
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from _services import CutProxy, blackhole, check_writers, require_server, run_writers, unused_port
from _services import with_url as _with_url
from _wait import wait_for

from conversa import (
    BackendUnavailable,
    ChatMessage,
    CorruptSessionError,
    StorageError,
    UnsupportedStorageURL,
    open_storage,
)
from conversa.storage import ConversationStorage, RedisStorage
from conversa.storage._urls import redact_url
from conversa.testing.conformance import StorageConformance

URL = os.environ.get("CONVERSA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_PARTS = urlsplit(URL)
HOST, PORT = _PARTS.hostname or "127.0.0.1", _PARTS.port or 6379


def with_url(
    url: str = URL, netloc: str | None = None, path: str | None = None, **opts: Any
) -> str:
    """``url`` (default: this module's server) with another host part, database or options."""
    return _with_url(url, netloc, path, **opts)


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
    with pytest.raises(UnsupportedStorageURL, match="known options: lease_ttl, prefix, timeout, ttl"):
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


async def test_tail_reads_only_the_newest(store: RedisStorage, admin: Any, prefix: str) -> None:
    """With an early message damaged in the server, load fails but tail of the newest works."""
    msgs = [ChatMessage.user(str(i)) for i in range(6)]
    await store.append("s", msgs[:1])
    await store.append("s", msgs[1:])
    await admin.lset(f"{prefix}m:s", 1, "{not json")
    with pytest.raises(CorruptSessionError):
        await store.load("s")
    assert await store.tail("s") == msgs[5:]
    assert await store.tail("s", 4) == msgs[2:]
    with pytest.raises(CorruptSessionError, match=r"message 1 of session 's'.*damaged"):
        await store.tail("s", 5)
    assert await store.tail("unknown", 3) == []
    assert await store.count("s") == 6


# -- many processes -----------------------------------------------------------------------


async def test_four_processes_append_to_one_session(store: RedisStorage, prefix: str) -> None:
    await run_writers(with_url(prefix=prefix), ["shared"] * 4, 250)
    check_writers(await store.load("shared"), [0, 1, 2, 3], 250)
    assert await store.count("shared") == 1000


async def test_four_processes_append_to_four_sessions(store: RedisStorage, prefix: str) -> None:
    sessions = [f"own-{w}" for w in range(4)]
    await run_writers(with_url(prefix=prefix), sessions, 250)
    for w, sid in enumerate(sessions):
        check_writers(await store.load(sid), [w], 250)
    assert sorted(await store.list_sessions()) == sessions


# -- the server goes away -----------------------------------------------------------------


@pytest.fixture
async def proxy() -> AsyncIterator[CutProxy]:
    p = CutProxy(HOST, PORT)
    await p.start()
    yield p
    await p.stop()


def proxied(proxy: CutProxy, prefix: str) -> RedisStorage:
    netloc = _PARTS.netloc.rsplit("@", 1)[0] + "@" if "@" in _PARTS.netloc else ""
    storage = open_storage(with_url(netloc=f"{netloc}127.0.0.1:{proxy.port}", prefix=prefix))
    assert isinstance(storage, RedisStorage)
    return storage


def client_saw_the_drop(storage: RedisStorage) -> bool:
    """Whether every idle connection of the client has read the end of its stream."""
    idle = storage._client.connection_pool._get_free_connections()
    return all(c._reader is None or c._reader.at_eof() for c in idle)


@pytest.mark.parametrize(("mode", "stored"), [("half", False), ("after", True)])
async def test_append_cut_midway_is_all_or_nothing(
    proxy: CutProxy, prefix: str, store: RedisStorage, mode: str, stored: bool
) -> None:
    storage = proxied(proxy, prefix)
    try:
        first = [ChatMessage.user("before")]
        await storage.append("s", first)
        batch = [ChatMessage.user(f"CUT-{uuid.uuid4().hex} {i}") for i in range(3)]
        proxy.trigger, proxy.mode = batch[0].text.encode(), mode
        with pytest.raises(BackendUnavailable, match=r"Redis at redis://127\.0\.0\.1:"):
            await storage.append("s", batch)
        assert proxy.trigger is None, "the proxy never saw the append"
        assert await store.load("s") == (first + batch if stored else first)
        # the next operation reconnects by itself
        after = [ChatMessage.assistant("after")]
        await storage.append("s", after)
        assert await storage.load("s") == (first + batch if stored else first) + after
    finally:
        await storage.close()


async def test_reads_and_writes_survive_dropped_connections(proxy: CutProxy, prefix: str) -> None:
    storage = proxied(proxy, prefix)
    try:
        await storage.append("s", [ChatMessage.user("one")])
        proxy.drop_all()
        # In life the event loop runs between an outage and the next write, and so notices
        # the closed connection; a write is never retried, so wait until the client has seen it.
        await wait_for(lambda: client_saw_the_drop(storage), "the client to see the drop")
        await storage.append("s", [ChatMessage.user("two")])
        proxy.drop_all()
        # a read right after the drop: retried on a fresh connection
        assert [m.text for m in await storage.load("s")] == ["one", "two"]
    finally:
        await storage.close()


async def test_client_kill_then_next_operation_reconnects(store: RedisStorage, admin: Any) -> None:
    await store.append("s", [ChatMessage.user("one")])
    client_id = await store._client.client_id()
    assert await admin.client_kill_filter(_id=client_id) == 1
    await store.append("s", [ChatMessage.user("two")])
    assert await store.count("s") == 2
    assert await store._client.client_id() != client_id


async def test_server_gone_then_back(proxy: CutProxy, prefix: str) -> None:
    storage = proxied(proxy, prefix)
    try:
        await storage.append("s", [ChatMessage.user("one")])
        port = proxy.port
        await proxy.stop()
        with pytest.raises(BackendUnavailable, match="check that Redis is running"):
            await storage.append("s", [ChatMessage.user("lost")])
        with pytest.raises(BackendUnavailable):
            await storage.load("s")
        await proxy.start(port)
        await storage.append("s", [ChatMessage.user("two")])
        assert [m.text for m in await storage.load("s")] == ["one", "two"]
    finally:
        await storage.close()


# -- wrong addresses and credentials ------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "hint"),
    [
        ("wrong-host", "check that Redis is running and the host and port are right"),
        ("wrong-port", "check that Redis is running and the host and port are right"),
        ("missing-db", "the database number does not exist"),
        ("no-answer", "no answer in time"),
    ],
)
async def test_unreachable_is_one_clear_line(where: str, hint: str, prefix: str) -> None:
    hole = blackhole()
    url = {
        "wrong-host": with_url(netloc=f"127.0.0.2:{PORT}", prefix=prefix),
        "wrong-port": with_url(netloc=f"127.0.0.1:{unused_port()}", prefix=prefix),
        "missing-db": with_url(path="/9999", prefix=prefix),
        "no-answer": with_url(netloc=f"127.0.0.1:{hole.getsockname()[1]}", timeout=0.5),
    }[where]
    storage = open_storage(url)
    try:
        with pytest.raises(BackendUnavailable) as info:
            await storage.append("s", [ChatMessage.user("x")])
        message = str(info.value)
        assert "\n" not in message
        assert hint in message
        assert redact_url(url) in message
    finally:
        await storage.close()
        hole.close()


@pytest.fixture
async def acl_user(admin: Any, prefix: str) -> AsyncIterator[tuple[str, str]]:
    """A temporary ACL user allowed only this test's keys; deleted afterwards."""
    user, password = f"conversa-test-{RUN}", f"s3cret-{uuid.uuid4().hex}"
    await admin.execute_command(
        "ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{prefix}*", "+@all"
    )
    yield user, password
    assert await admin.execute_command("ACL", "DELUSER", user) == 1


async def test_credentials_never_leak(
    acl_user: tuple[str, str], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    user, password = acl_user
    caplog.set_level(logging.DEBUG)
    good = with_url(netloc=f"{user}:{password}@{HOST}:{PORT}", prefix=prefix)
    storage = open_storage(good)
    assert password not in repr(storage) and "***" in repr(storage)
    await storage.append("s", [ChatMessage.user("authorised")])
    assert await storage.count("s") == 1
    await storage.close()

    seen: list[str] = []
    for url, hint in [
        (with_url(netloc=f"{user}:wrong-{password}@{HOST}:{PORT}", prefix=prefix), "credentials"),
        (with_url(netloc=f"{user}:{password}@127.0.0.1:{unused_port()}", prefix=prefix), "port"),
        (with_url(netloc=f"{user}:{password}@{HOST}:{PORT}", path="/9999"), "database number"),
    ]:
        storage = open_storage(url)
        with pytest.raises(BackendUnavailable) as info:
            await storage.load("s")
        assert hint in str(info.value)
        assert "\n" not in str(info.value)
        seen += [repr(storage), *traceback.format_exception(info.value)]
        await storage.close()
    seen.append(caplog.text)
    assert not [text for text in seen if password in text]


async def test_missing_dependency_message() -> None:
    code = (
        "import sys; sys.modules['redis'] = None; sys.modules['redis.asyncio'] = None\n"
        "from conversa import open_storage, BackendUnavailable\n"
        "try:\n    open_storage('redis://127.0.0.1:6379/0')\n"
        "except BackendUnavailable as e:\n    print(e)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert "pip install 'conversa-ai[redis]'" in out.decode()
