"""PostgresStorage against the real local PostgreSQL: conformance, concurrency, failures, secrets.

Every test works in its own schema and drops it afterwards. The server is never stopped:
"the server goes away" is a TCP proxy on 127.0.0.1 that the test cuts, or
pg_terminate_backend of this test's own connections.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
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
from conversa.storage import ConversationStorage, PostgresStorage
from conversa.storage.postgres import MIGRATIONS
from conversa.testing.conformance import StorageConformance

URL = os.environ.get("CONVERSA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_PARTS = urlsplit(URL)
HOST, PORT = _PARTS.hostname or "127.0.0.1", _PARTS.port or 5432
DATABASE = _PARTS.path.lstrip("/")


with_url = partial(_with_url, URL)
"""This module's server URL with another host part, database or options."""


require_server("PostgreSQL", URL, "CONVERSA_TEST_POSTGRES_URL", 5432)

pytestmark = pytest.mark.postgres

RUN = uuid.uuid4().hex[:10]
_counter = itertools.count()


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    """A plain asyncpg connection to look at the server directly."""
    con = await asyncpg.connect(URL)
    yield con
    await con.close()


@pytest.fixture
async def schema(admin: Any) -> AsyncIterator[str]:
    """A schema of this test alone; dropped, and checked gone, afterwards."""
    name = f"conversa_test_{RUN}_{next(_counter)}"
    yield name
    await admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    assert await admin.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", name) == 0


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresStorage]:
    storage = open_storage(with_url(schema=schema))
    assert isinstance(storage, PostgresStorage)
    yield storage
    await storage.close()


class TestPostgresConformance(StorageConformance):
    @pytest.fixture
    async def storage(self, store: PostgresStorage) -> AsyncIterator[ConversationStorage]:
        yield store


# -- URL, schema and migrations -----------------------------------------------------------


def test_url_forms_and_repr() -> None:
    assert isinstance(open_storage("postgres://postgres@127.0.0.1:5432/test"), PostgresStorage)
    shown = repr(open_storage(with_url(schema="s1", table_prefix="app_")))
    assert "schema='s1'" in shown and "table_prefix='app_'" in shown
    with pytest.raises(
        UnsupportedStorageURL, match="known options: application_name, pool_size, schema"
    ):
        open_storage(with_url(schem="typo"))
    with pytest.raises(StorageError, match="letters, digits and _"):
        open_storage(with_url(schema='x"; DROP TABLE y; --'))
    with pytest.raises(StorageError, match="must be a number"):
        open_storage(with_url(timeout="soon"))


async def test_tables_created_once_and_versioned(schema: str, admin: Any) -> None:
    stores = [open_storage(with_url(schema=schema)) for _ in range(4)]
    try:
        # four instances meet an empty database at once: one migrates, all work
        await asyncio.gather(
            *(s.append(f"s{i}", [ChatMessage.user("x")]) for i, s in enumerate(stores))
        )
        assert sorted(await stores[0].list_sessions()) == ["s0", "s1", "s2", "s3"]
        version = await admin.fetchval(f'SELECT version FROM "{schema}".conversa_schema_version')
        assert version == len(MIGRATIONS)
        tables = await admin.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY 1", schema
        )
        assert [t["tablename"] for t in tables] == [
            "conversa_messages",
            "conversa_schema_version",
            "conversa_sessions",
            "conversa_state",
        ]
        await admin.execute(f'UPDATE "{schema}".conversa_schema_version SET version = 99')
        newer = open_storage(with_url(schema=schema))
        with pytest.raises(StorageError, match="version 99, newer than this conversa knows"):
            await newer.count("s0")
        await newer.close()
    finally:
        for s in stores:
            await s.close()


async def test_table_prefix_separates_apps(schema: str) -> None:
    a = open_storage(with_url(schema=schema, table_prefix="app_a_"))
    b = open_storage(with_url(schema=schema, table_prefix="app_b_"))
    try:
        await a.append("same", [ChatMessage.user("from a")])
        await b.append("same", [ChatMessage.user("from b")])
        assert [m.text for m in await a.load("same")] == ["from a"]
        assert [m.text for m in await b.load("same")] == ["from b"]
    finally:
        await a.close()
        await b.close()


async def test_nul_and_exact_numbers_roundtrip(
    store: PostgresStorage, admin: Any, schema: str
) -> None:
    odd = "nul\x00 private\ue000 both\ue000\x00\ue001\ue002 end"
    msg = ChatMessage.user(odd, name=odd, metadata={odd: [1e300, -0.0, 5e-324, 2**70]})
    await store.append("s", [msg])
    assert await store.load("s") == [msg]
    info = await store.update_info("s", title=odd, user_id=odd, metadata={"k": odd})
    assert (info.title, info.user_id, info.metadata) == (odd, odd, {"k": odd})
    assert [i.session_id for i in await store.find_sessions(user_id=odd)] == ["s"]
    await store.set_state("s", {odd: odd})
    assert await store.get_state("s") == {odd: odd}
    await store.delete_state("s", [odd])
    assert await store.get_state("s") == {}
    # the body is the message's JSON, exactly; SQL can look inside (where there is no NUL)
    table = f'"{schema}".conversa_messages'
    assert await admin.fetchval(f"SELECT body FROM {table}") == msg.to_json()
    await store.append("s", [ChatMessage.assistant("plain", metadata={"model": "m1"})])
    sql = f"SELECT body::json->'metadata'->>'model' FROM {table} WHERE seq = 1"
    assert await admin.fetchval(sql) == "m1"


async def test_expired_state_rows_are_removed(
    store: PostgresStorage, admin: Any, schema: str
) -> None:
    await store.set_state("s", {"short": 1}, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    await store.set_state("s", {"kept": 2})
    rows = await admin.fetch(f'SELECT key FROM "{schema}".conversa_state')
    assert [r["key"] for r in rows] == ["kept"]


async def test_damaged_row_is_reported(store: PostgresStorage, admin: Any, schema: str) -> None:
    await store.append("s", [ChatMessage.user("ok")])
    await admin.execute(f"UPDATE \"{schema}\".conversa_messages SET body = '{{oops'")
    with pytest.raises(CorruptSessionError, match=r"message 0 of session 's'.*damaged"):
        await store.load("s")


async def test_append_leaves_search_words_to_a_batch(
    store: PostgresStorage, admin: Any, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No words are computed on the append's path; a batch or the next search fills them."""
    from conversa.storage import postgres as pg_module

    table = f'"{schema}".conversa_messages'

    async def unindexed() -> int:
        return int(await admin.fetchval(f"SELECT count(*) FROM {table} WHERE words IS NULL"))

    monkeypatch.setattr(pg_module, "index_text", lambda text: pytest.fail("words computed"))
    for i in range(3):
        await store.append("s", [ChatMessage.user(f"Café n{i}"), ChatMessage.assistant("ok")])
    assert await unindexed() == 6
    monkeypatch.undo()
    assert [h.position for h in await store.search("cafe")] == [0, 2, 4]
    assert await unindexed() == 0
    # a write number divisible by INDEX_BATCH indexes what appends left
    monkeypatch.setattr(pg_module, "INDEX_BATCH", 4)
    for i in range(8):
        await store.append("t", [ChatMessage.user(f"later {i}")])
    assert await unindexed() < 4
    assert len(await store.search("later", limit=None)) == 8 and await unindexed() == 0


async def terminate_backends_of(admin: Any, name: str) -> int:
    """pg_terminate_backend every connection of application ``name``; wait until all are gone."""
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
    pids = [r["pid"] for r in await admin.fetch(sql, name)]
    for pid in pids:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    gone = "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = ANY($1::int[])"
    await wait_for(lambda: admin.fetchval(gone, pids), "the terminated backends to go")
    return len(pids)


async def test_terminated_backend_then_next_operation_reconnects(admin: Any, schema: str) -> None:
    name = f"conversa-test-{schema}"
    storage = open_storage(with_url(schema=schema, application_name=name))
    try:
        await storage.append("s", [ChatMessage.user("one")])
        assert await terminate_backends_of(admin, name) >= 1
        await storage.append("s", [ChatMessage.user("two")])
        assert await terminate_backends_of(admin, name) >= 1
        assert [m.text for m in await storage.load("s")] == ["one", "two"]
        assert await terminate_backends_of(admin, name) >= 1
    finally:
        await storage.close()


# -- wrong addresses and credentials ------------------------------------------------------


def _error_response(sqlstate: str, message: str) -> bytes:
    fields = (
        b"".join(
            code + text.encode() + b"\0"
            for code, text in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
        )
        + b"\0"
    )
    return b"E" + struct.pack("!I", len(fields) + 4) + fields


class RefusingServer:
    """Speaks just enough of the PostgreSQL protocol to refuse a password (28P01).

    The local server trusts every connection from 127.0.0.1 (pg_hba ``trust``), so it
    accepts any password; this stands in for a server that checks them.
    """

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                body = await reader.readexactly(length - 4)
                if body[:4] == struct.pack("!I", 80877103):  # SSLRequest: no TLS here
                    writer.write(b"N")
                    continue
                user = body.split(b"user\0", 1)[1].split(b"\0", 1)[0].decode()
                writer.write(
                    _error_response("28P01", f'password authentication failed for user "{user}"')
                )
                await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def refusing() -> AsyncIterator[int]:
    server = RefusingServer()
    port = await server.start()
    yield port
    await server.stop()


class TestPostgresServer(ServerBackendSuite):
    NAME, URL, SPACE_OPTION = "PostgreSQL", URL, "schema"
    DRIVER_MODULES, EXTRA = ("asyncpg",), "postgres"
    UNREACHABLE = (
        ("missing-db", "create the database (createdb NAME) or fix its name in the URL"),
        ("wrong-user", "the server refused the login: check the user name"),
        ("wrong-password", "the server refused the password: check the user name and password"),
        ("no-answer", "no answer within 0.5s"),
    )
    CUTS = (
        ("append", "half", False),  # the statement never arrived whole
        ("append", "after", True),  # it ran and committed; only the reply was lost
        ("save", "half", False),
        ("save", "after", False),  # the INSERT ran, COMMIT never came: rolled back whole
    )

    @pytest.fixture
    def space(self, schema: str) -> str:
        return schema

    async def damage_message(self, admin: Any, space: str, session_id: str, n: int) -> None:
        sql = f"UPDATE \"{space}\".conversa_messages SET body = '{{oops' WHERE seq = {n}"
        await admin.execute(sql)

    @pytest.fixture
    def unreachable_urls(self, schema: str, refusing: int) -> dict[str, str]:
        return {
            "missing-db": self.url(schema, path=f"/nosuchdb_{RUN}"),
            "wrong-user": self.url(schema, netloc=f"nosuchrole_{RUN}@{HOST}:{PORT}"),
            "wrong-password": self.url(schema, netloc=f"postgres:bad@127.0.0.1:{refusing}"),
        }

    @pytest.fixture
    async def login(self, admin: Any, schema: str) -> AsyncIterator[tuple[str, str]]:
        """A temporary login role with a password, owning this test's schema; dropped afterwards."""
        name, password = f"conversa_test_{RUN}", f"s3cret-{uuid.uuid4().hex}"
        await admin.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")
        await admin.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{name}"')
        try:
            yield name, password
        finally:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.execute(f'DROP ROLE "{name}"')

    @pytest.fixture
    def wrong_logins(
        self, login: tuple[str, str], schema: str, refusing: int
    ) -> list[tuple[str, str]]:
        user, password = login
        netloc = f"{user}:{password}@{HOST}:{PORT}"
        return [
            (self.url(schema, netloc=f"{user}:{password}@127.0.0.1:{refusing}"), "password"),
            (self.url(None, netloc=netloc, path=f"/nosuchdb_{RUN}"), "createdb"),
        ]

    async def test_a_lost_connection_retires_its_pool_siblings(
        self, proxy: CutProxy, schema: str, admin: Any
    ) -> None:
        # Every backend of a full pool is terminated and the client hears the FATAL but not
        # the hang-up: each sibling still looks alive, so a retry that took one would fail.
        name = f"conversa-test-{schema}"
        url = self.url(schema, netloc=f"127.0.0.1:{proxy.port}", application_name=name, pool_size=4)
        storage = open_storage(url)
        try:
            await storage.append("s", [ChatMessage.user("one")])
            await asyncio.gather(*(storage.load("s") for _ in range(8)))
            proxy.linger = True
            assert await terminate_backends_of(admin, name) >= 2
            for _ in range(3):
                assert [m.text for m in await storage.load("s")] == ["one"]
        finally:
            proxy.linger = False
            proxy.drop_all()
            await storage.close()

    async def test_reads_survive_dropped_connections(self, proxy: CutProxy, schema: str) -> None:
        storage = open_storage(self.proxied(proxy, schema))
        try:
            await storage.append("s", [ChatMessage.user("one")])
            proxy.drop_all()
            # a read right after the drop: retried on a fresh connection
            assert [m.text for m in await storage.load("s")] == ["one"]
            proxy.drop_all()
            assert await storage.count("s") == 1
        finally:
            await storage.close()
