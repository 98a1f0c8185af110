"""Listings whose cost does not grow with the store (issue 11): Redis, SQLite, PostgreSQL.

Counted, not timed: how many sessions a find_sessions call reads on Redis, and which index
the SQL backends' queries use.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from _services import require_server, with_url

from conversa import ChatMessage, open_storage
from conversa.storage import RedisStorage
from conversa.storage.base import SessionQuery
from conversa.storage.postgres import find_sql

REDIS = os.environ.get("CONVERSA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES = os.environ.get("CONVERSA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStorage]:
    require_server("Redis", REDIS, "CONVERSA_TEST_REDIS_URL", 6379)
    prefix = f"conversa-test-scale-{uuid.uuid4().hex[:10]}:"
    store = open_storage(with_url(REDIS, prefix=prefix))
    assert isinstance(store, RedisStorage)
    yield store
    await store.close()
    admin = aioredis.Redis.from_url(REDIS)
    keys = [k async for k in admin.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await admin.delete(*keys)
    await admin.aclose()


async def _fill(store: Any, n: int, users: int = 4) -> None:
    for i in range(n):
        await store.append(f"s{i:04d}", [ChatMessage.user(f"q{i}")])
        await store.update_info(f"s{i:04d}", user_id=f"u{i % users}")


def _count_reads(store: RedisStorage, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The session ids whose info the store reads from now on."""
    read: list[str] = []
    infos = store._infos

    async def counting(ids: Any) -> Any:
        read.extend(ids)
        return await infos(ids)

    monkeypatch.setattr(store, "_infos", counting)
    return read


@pytest.mark.redis
@pytest.mark.parametrize("total", [30, 300])
async def test_redis_find_reads_a_page_not_the_store(
    redis_store: RedisStorage, monkeypatch: pytest.MonkeyPatch, total: int
) -> None:
    await _fill(redis_store, total)
    await redis_store.find_sessions(user_id="u0", limit=1)  # a new store: nothing to build
    read = _count_reads(redis_store, monkeypatch)
    found = await redis_store.find_sessions(limit=5)
    assert [i.session_id for i in found] == [f"s{i:04d}" for i in range(total - 1, total - 6, -1)]
    assert len(read) == 5
    read.clear()
    mine = await redis_store.find_sessions(user_id="u1", limit=5)
    newest_u1 = [f"s{i:04d}" for i in range(total - 1, -1, -1) if i % 4 == 1][:5]
    assert [i.session_id for i in mine] == newest_u1
    assert len(read) == 5  # from the user's own index, not the whole store


@pytest.mark.redis
async def test_redis_user_index_follows_changes_and_deletes(redis_store: RedisStorage) -> None:
    await _fill(redis_store, 6, users=2)
    await redis_store.update_info("s0004", user_id="u1")  # moves from u0 to u1
    await redis_store.update_info("s0005", user_id=None)  # leaves u1
    await redis_store.delete("s0003")
    u0 = [i.session_id for i in await redis_store.find_sessions(user_id="u0")]
    u1 = [i.session_id for i in await redis_store.find_sessions(user_id="u1")]
    assert u0 == ["s0002", "s0000"]
    assert u1 == ["s0004", "s0001"]
    assert [i.session_id for i in await redis_store.find_sessions(limit=2)] == ["s0005", "s0004"]
    # pages go on past entries that are dropped on the way
    assert len(await redis_store.find_sessions(user_id="u1", limit=1)) == 1


@pytest.mark.redis
async def test_redis_user_index_is_built_for_an_older_store(redis_store: RedisStorage) -> None:
    await _fill(redis_store, 250, users=5)
    admin = aioredis.Redis.from_url(REDIS, decode_responses=True)
    prefix = redis_store._prefix
    try:
        # a store written before the per-user indexes existed
        old = [k async for k in admin.scan_iter(match=f"{prefix}u:*")]
        await admin.delete(*old, f"{prefix}users-indexed")
        fresh = open_storage(with_url(REDIS, prefix=prefix))
        found = await fresh.find_sessions(user_id="u2")
        assert [i.session_id for i in found] == [f"s{i:04d}" for i in range(247, 0, -5)]
        assert await admin.exists(f"{prefix}users-indexed")
        await fresh.close()
    finally:
        await admin.aclose()


def test_sqlite_find_queries_use_an_index(tmp_path: Path) -> None:
    import asyncio

    url = f"sqlite:///{tmp_path / 's.db'}"

    async def make() -> None:
        store = open_storage(url)
        await _fill(store, 3)
        await store.close()

    asyncio.run(make())
    db = sqlite3.connect(tmp_path / "s.db")
    for where, args in (("", ()), ("WHERE user_id = ?", ("u1",))):
        plan = " ".join(
            str(row[-1])
            for row in db.execute(
                f"EXPLAIN QUERY PLAN SELECT id FROM sessions {where} "
                "ORDER BY updated_at DESC LIMIT 20",
                args,
            )
        )
        assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, plan
    db.close()


@pytest.mark.postgres
async def test_postgres_find_queries_use_an_index() -> None:
    require_server("PostgreSQL", POSTGRES, "CONVERSA_TEST_POSTGRES_URL", 5432)
    import asyncpg

    schema = f"scale_{uuid.uuid4().hex[:10]}"
    store = open_storage(with_url(POSTGRES, schema=schema))
    con = await asyncpg.connect(POSTGRES)
    try:
        await _fill(store, 3)
        table = store._names.sessions  # type: ignore[attr-defined]
        # a tiny table: ask whether an index serves each query without a sort, even in the
        # generic plan a prepared statement ends up with
        await con.execute(
            "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off; "
            "SET plan_cache_mode = force_generic_plan"
        )
        for query in (SessionQuery(limit=20), SessionQuery(user_id="u1", limit=20)):
            sql, args = find_sql(table, query)
            types = ", ".join("text" if isinstance(a, str) else "int" for a in args)
            await con.execute(f"PREPARE q ({types}) AS {sql}")
            params = ", ".join(f"'{a}'" if isinstance(a, str) else str(a) for a in args)
            plan = " ".join(r[0] for r in await con.fetch(f"EXPLAIN EXECUTE q ({params})"))
            await con.execute("DEALLOCATE q")
            assert "Index" in plan and "Sort" not in plan and "Filter" not in plan, plan
    finally:
        await store.close()
        await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await con.close()
