"""`conversa sessions migrate` between files, SQLite, Redis and PostgreSQL (the real servers)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from _cli import kept
from _services import require_server
from click.testing import CliRunner

from conversa.cli._app import cli
from conversa.compaction import SummaryRange, summary_record
from conversa.messages import ChatMessage
from conversa.model import Usage
from conversa.storage import ConversationStorage, SummaryMark, UsageTotals, open_storage

REDIS = os.environ.get("CONVERSA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES = os.environ.get("CONVERSA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


require_server("Redis", REDIS, "CONVERSA_TEST_REDIS_URL", 6379)
require_server("PostgreSQL", POSTGRES, "CONVERSA_TEST_POSTGRES_URL", 5432)


def _with_query(url: str, **query: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in query.items())


@pytest.fixture
def servers() -> Iterator[tuple[str, str]]:
    """A Redis URL and a PostgreSQL URL of this test alone; both are emptied afterwards."""
    run = uuid.uuid4().hex[:10]
    prefix, schema = f"conversa-test-migrate-{run}:", f"conversa_test_migrate_{run}"
    yield _with_query(REDIS, prefix=prefix), _with_query(POSTGRES, schema=schema)

    async def clean() -> None:
        client = aioredis.from_url(REDIS)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        assert not [k async for k in client.scan_iter(match=f"{prefix}*")]
        await client.aclose()
        con = await asyncpg.connect(POSTGRES)
        await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await con.close()

    asyncio.run(clean())


async def _snapshot(url: str) -> dict[str, Any]:
    async with open_storage(url) as storage:
        out: dict[str, Any] = {
            sid: await kept(storage, sid) for sid in await storage.list_sessions()
        }
        out["__order__"] = await storage.list_sessions()
        return out


async def _fill(url: str) -> None:
    storage: ConversationStorage = open_storage(url)
    try:
        for n in range(4):
            texts = [f"message {n}.{i} ü 雪" for i in range(2 * n + 1)]
            await storage.save(
                f"user-{n}",
                [
                    ChatMessage(role="user" if i % 2 == 0 else "assistant", content=t)
                    for i, t in enumerate(texts)
                ],
            )
        await storage.set_state("user-2", {"plan": ["a", "b"]})
        await storage.set_state("user-2", {"token": "t"}, ttl=600)
        await storage.update_info(
            "user-3", title="Named", user_id="u3", status="completed", metadata={"k": 1}
        )
        # compaction's share: a summary record (an ordinary message), the usage totals and
        # where the summary is; every copy keeps them
        history = await storage.load("user-3")
        covers = SummaryRange(history[0].id, history[3].id, 4)
        record = summary_record(
            "s", covers, model="m", tokens_before=9, tokens_after=2, usage=Usage(4, 1)
        )
        await storage.append("user-3", [record])
        await storage.add_usage("user-3", prompt_tokens=900, completion_tokens=80, calls=7)
        await storage.set_summary_mark("user-3", SummaryMark(len(history), 3))
    finally:
        await storage.close()


def test_migrate_through_every_backend(tmp_path: Path, servers: tuple[str, str]) -> None:
    redis_url, pg_url = servers
    files = str(tmp_path / "files")
    sqlite_url = f"sqlite:///{tmp_path / 'final.db'}"
    asyncio.run(_fill(files))
    expected = asyncio.run(_snapshot(files))
    assert expected["user-3"][4] == (UsageTotals(900, 80, 7), SummaryMark(7, 3))
    runner = CliRunner()
    for source, target in [(files, redis_url), (redis_url, pg_url), (pg_url, sqlite_url)]:
        for _ in range(2):  # a second run changes nothing
            result = runner.invoke(cli, ["sessions", "migrate", "--from", source, "--to", target])
            assert result.exit_code == 0, result.output
            assert "migrated 4 sessions (17 messages); verified" in result.output
        assert asyncio.run(_snapshot(target)) == expected
