"""Encryption at rest (issue 15): EncryptedStorage over every backend, keys, migrate, rekey.

The plaintext checks read what each backend really keeps: every file under the file store's
directory, the SQLite database with its WAL and every table, every Redis key of the test's
prefix by type, and every row of the PostgreSQL test schema as text. Each also finds a value
that stays clear (the session id), so a grep that sees nothing cannot pass by accident.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from _cli import CONVERSA
from _services import postgres_space, redis_space, require_server
from click.testing import CliRunner

from conversa import (
    BackendUnavailable,
    ChatMessage,
    CorruptSessionError,
    InMemoryStorage,
    ToolCall,
    UnsupportedStorageURL,
    open_storage,
)
from conversa.cli._app import cli
from conversa.errors import EncryptionError, EncryptionKeyError
from conversa.storage import (
    ConversationStorage,
    EncryptedStorage,
    RouteVisit,
    SessionFlow,
    SqliteStorage,
)
from conversa.storage import encrypted as enc
from conversa.testing.conformance import StorageConformance

KEY_A, KEY_B = enc.generate_key(), enc.generate_key()
ENV_A, ENV_B = "CONVERSA_TEST_KEY_A", "CONVERSA_TEST_KEY_B"
REDIS_URL = os.environ.get("CONVERSA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "CONVERSA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
RUN = uuid.uuid4().hex[:10]
_counter = itertools.count()


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both keys in the environment (child processes inherit them)."""
    monkeypatch.setenv(ENV_A, KEY_A)
    monkeypatch.setenv(ENV_B, KEY_B)


def keyed(url: str, env: str = ENV_A) -> str:
    """``url`` with the option that encrypts it with the key in ``env``."""
    return f"{url}{'&' if '?' in url else '?'}{enc.KEY_OPTION}={env}"


# -- namespaces of the server backends (as tests/test_redis.py and test_postgres.py) ---------


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A Redis URL with a key prefix of this test alone; its keys are deleted afterwards."""
    require_server("Redis", REDIS_URL, "CONVERSA_TEST_REDIS_URL", 6379)
    async with redis_space(REDIS_URL, f"conversa-test-enc-{RUN}-{next(_counter)}:") as url:
        yield url


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A PostgreSQL URL with a schema of this test alone; dropped afterwards."""
    require_server("PostgreSQL", POSTGRES_URL, "CONVERSA_TEST_POSTGRES_URL", 5432)
    async with postgres_space(POSTGRES_URL, f"conversa_test_enc_{RUN}_{next(_counter)}") as url:
        yield url


# -- the conformance suite over the wrapper, on every backend --------------------------------


class TestEncryptedMemory(StorageConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[ConversationStorage]:
        store = EncryptedStorage(InMemoryStorage(), KEY_A)
        yield store
        await store.close()


class _ByURL(StorageConformance):
    """The suite over ``open_storage(url?encryption_key_env=...)``; the URL leases in a child."""

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError

    @pytest.fixture
    def lease_url(self, url: str) -> str | None:
        return url

    @pytest.fixture
    async def storage(self, url: str) -> AsyncIterator[ConversationStorage]:
        store = open_storage(url)
        assert isinstance(store, EncryptedStorage)
        yield store
        await store.close()


class TestEncryptedFile(_ByURL):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return keyed(f"file://{tmp_path / 'sessions'}")


class TestEncryptedSqlite(_ByURL):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return keyed(f"sqlite:///{tmp_path / 'store.db'}?durability=crash")


@pytest.mark.redis
class TestEncryptedRedis(_ByURL):
    @pytest.fixture
    def url(self, redis_url: str) -> str:
        return keyed(redis_url)


@pytest.mark.postgres
class TestEncryptedPostgres(_ByURL):
    @pytest.fixture
    def url(self, postgres_url: str) -> str:
        return keyed(postgres_url)


# -- no plaintext at rest -------------------------------------------------------------------

SID = "visible-session-id"
SECRETS = (
    "okapisystem",
    "zebracontent",
    "yakcontentpart",
    "walrusargument",
    "quaggatoolresult",
    "vicunamessagemeta",
    "tapirtitle",
    "serowinfometa",
    "urialstatevalue",
    "nilgaisavedcontent",
    "ibexflowdata",
)


async def write_secrets(store: ConversationStorage) -> None:
    """Every kind of value that must be encrypted, written through every kind of write."""
    call = ToolCall("call-1", "lookup", json.dumps({"query": "walrusargument"}))
    await store.append(
        SID,
        [
            ChatMessage.system("okapisystem prompt"),
            ChatMessage.user("hello zebracontent", metadata={"note": "vicunamessagemeta"}),
            ChatMessage.user([{"type": "text", "text": "yakcontentpart here"}]),
            ChatMessage.assistant("", tool_calls=[call]),
            ChatMessage.tool("call-1", "quaggatoolresult"),
        ],
    )
    await store.update_info(SID, title="tapirtitle", metadata={"tag": "serowinfometa"})
    await store.set_state(SID, {"cart": {"item": "urialstatevalue"}}, ttl=600)
    await store.save(f"{SID}-saved", [ChatMessage.user("nilgaisavedcontent first")])
    flow = _flow({"booking": {"destination": "ibexflowdata"}, "greet": {}})
    await store.set_flow(SID, flow)
    # and everything reads back, searches and lists through the wrapper
    assert [h.session_id for h in await store.search("zebracontent")] == [SID]
    assert [h.position for h in await store.search("yakcontent")] == [2]
    info = await store.get_info(SID)
    assert info is not None and info.title == "tapirtitle"
    assert info.metadata == {"tag": "serowinfometa"}
    saved = await store.get_info(f"{SID}-saved")
    assert saved is not None and saved.title == "nilgaisavedcontent first"
    assert (await store.get_state(SID)) == {"cart": {"item": "urialstatevalue"}}
    assert info.flow == flow and (await store.get_state_and_flow(SID))[1] == flow
    assert [i.session_id for i in await store.find_sessions(route="booking")] == [SID]
    loaded = await store.load(SID)
    assert loaded[3].tool_calls[0].arguments == call.arguments
    assert loaded[1].metadata == {"note": "vicunamessagemeta"}


def _flow(data: dict[str, Any], at: datetime | None = None) -> SessionFlow:
    """A flow in route "booking" since ``at`` (default: now), with ``data`` collected."""
    at = at or datetime.now(UTC)
    return SessionFlow(
        route="booking", entered_at=at, history=(RouteVisit("booking", at),), data=data
    )


def assert_no_plaintext(blob: bytes, where: str) -> None:
    low = blob.lower()
    assert SID.encode() in low, f"the check does not see the data in {where}"
    leaked = [s for s in SECRETS if s.encode() in low]
    assert not leaked, f"plaintext {leaked} found in {where}"


def files_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def sqlite_rows(path: Path) -> bytes:
    """Every row of every table (FTS shadow tables too), as text."""
    con = sqlite3.connect(path)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = [repr(con.execute(f'SELECT * FROM "{n}"').fetchall()) for n in names]
    finally:
        con.close()
    return "\n".join(rows).encode()


async def test_no_plaintext_in_the_files(tmp_path: Path) -> None:
    directory = tmp_path / "sessions"
    store = open_storage(keyed(f"file://{directory}"))
    await write_secrets(store)
    assert_no_plaintext(files_under(directory), "the session files (store open)")
    await store.close()
    assert_no_plaintext(files_under(directory), "the session files")
    for index in directory.rglob("*.db"):
        assert_no_plaintext(sqlite_rows(index) + SID.encode(), f"the rows of {index.name}")


async def test_no_plaintext_in_the_sqlite_database_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = open_storage(keyed(f"sqlite:///{path}"))
    await write_secrets(store)
    files = [p for p in tmp_path.iterdir() if p.name.startswith("store.db")]
    assert any(p.name.endswith("-wal") for p in files)  # the WAL is read too, while it exists
    assert_no_plaintext(b"".join(p.read_bytes() for p in files), "the database, WAL and SHM")
    await store.close()
    assert_no_plaintext(path.read_bytes(), "the database file")
    assert_no_plaintext(sqlite_rows(path), "the database's rows")


async def secrets_written(url: str, option: str) -> str:
    """Write the secrets through an encrypted store at server ``url``; its namespace option."""
    store = open_storage(keyed(url))
    await write_secrets(store)
    await store.close()
    return parse_qs(urlsplit(url).query)[option][0]


@pytest.mark.redis
async def test_no_plaintext_in_redis(redis_url: str) -> None:
    import redis.asyncio as aioredis

    prefix = await secrets_written(redis_url, "prefix")
    client = aioredis.Redis.from_url(REDIS_URL)
    dump: list[Any] = []
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            kind = (await client.type(key)).decode()
            read = {
                "string": lambda k: client.get(k),
                "hash": lambda k: client.hgetall(k),
                "list": lambda k: client.lrange(k, 0, -1),
                "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
                "set": lambda k: client.smembers(k),
                "stream": lambda k: client.xrange(k),
            }[kind]
            dump.append((key, await read(key)))
    finally:
        await client.aclose()
    assert dump
    assert_no_plaintext(repr(dump).encode() + _raw_bytes(dump), "the Redis keys")


def _raw_bytes(value: Any) -> bytes:
    """The bytes inside redis-py's results (repr escapes non-ASCII bytes)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        return b"".join(_raw_bytes(k) + _raw_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return b"".join(_raw_bytes(v) for v in value)
    return str(value).encode()


@pytest.mark.postgres
async def test_no_plaintext_in_postgres_rows(postgres_url: str) -> None:
    import asyncpg

    schema = await secrets_written(postgres_url, "schema")
    con = await asyncpg.connect(POSTGRES_URL)
    try:
        tables = await con.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
        assert tables
        rows = [
            r[0]
            for t in tables
            for r in await con.fetch(f'SELECT t::text FROM "{schema}"."{t[0]}" t')
        ]
    finally:
        await con.close()
    assert_no_plaintext("\n".join(rows).encode(), "the PostgreSQL rows")


# -- keys: wrong, missing, malformed -----------------------------------------------------------


async def snapshot(store: ConversationStorage, sid: str) -> tuple[Any, ...]:
    return (
        await store.load(sid),
        await store.get_info(sid),
        await store.get_state_entries(sid),
    )


async def test_a_wrong_key_reads_nothing_and_writes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    right = open_storage(keyed(url))
    await right.append("full", [ChatMessage.user("secret one"), ChatMessage.assistant("two")])
    await right.update_info("full", title="t", metadata={"m": 1})
    await right.set_state("full", {"k": "v"})
    await right.set_state("state-only", {"k": "v"})
    await right.update_info("info-only", metadata={"m": 1})
    await right.set_times(
        "full", created_at=datetime(2020, 1, 1, tzinfo=UTC), updated_at=datetime(2020, 1, 2)
    )
    before = {sid: await snapshot(right, sid) for sid in ("full", "state-only", "info-only")}

    wrong = open_storage(keyed(url, ENV_B))
    with pytest.raises(EncryptionKeyError, match=f"not with this storage's key from \\${ENV_B}"):
        await wrong.load("full")
    for read in (wrong.get_info, wrong.get_state, lambda s: wrong.tail(s, 1)):
        with pytest.raises(EncryptionKeyError):
            await read("full")  # type: ignore[operator]
    with pytest.raises(EncryptionKeyError):
        await wrong.find_sessions()
    with pytest.raises(EncryptionKeyError):
        await wrong.search("secret")
    writes: list[Callable[[str], Awaitable[object]]] = [
        lambda s: wrong.append(s, [ChatMessage.user("overwrite?")]),
        lambda s: wrong.save(s, []),
        lambda s: wrong.pop(s),
        lambda s: wrong.truncate(s, 0),
        lambda s: wrong.set_state(s, {"k": "new"}),
        lambda s: wrong.delete_state(s, ["k"]),
        lambda s: wrong.clear_state(s),
        lambda s: wrong.update_info(s, status="completed"),
        lambda s: wrong.set_times(s, created_at=datetime.now(UTC), updated_at=datetime.now()),
        lambda s: wrong.delete(s),
    ]
    for sid in ("full", "state-only", "info-only"):
        for write in writes:
            with pytest.raises(EncryptionKeyError, match="nothing was changed"):
                await write(sid)
    # counts and listings need no key: they stay clear
    assert await wrong.count("full") == 2
    assert set(await wrong.list_sessions()) == {"full", "state-only", "info-only"}
    await wrong.close()
    assert {sid: await snapshot(right, sid) for sid in before} == before  # times too
    await right.close()


async def test_a_wrong_key_starts_no_session_beside_the_stores_own(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    right = open_storage(keyed(url))
    await right.append("old", [ChatMessage.user("sealed with A")])
    await right.update_info("info-only", metadata={"m": 1})  # no message: its info is checked
    await right.append("damaged", [ChatMessage.user("x")])
    for n in range(9):  # newer still: sessions create_session made, nothing in them to check
        await right.append(f"empty-{n}", [])
    with sqlite3.connect(tmp_path / "store.db") as con:  # damage, not another key: passed over
        con.execute("UPDATE messages SET data = '{bad' WHERE session_id = 'damaged'")
    con.close()
    await right.set_times(
        "damaged", created_at=datetime.now(UTC), updated_at=datetime.now(UTC) + timedelta(1)
    )
    stored = sorted(await right.list_sessions())
    news: list[Callable[[EncryptedStorage, str], Awaitable[object]]] = [
        lambda store, s: store.append(s, [ChatMessage.user("a second key's session?")]),
        lambda store, s: store.save(s, [ChatMessage.user("x")]),
        lambda store, s: store.set_state(s, {"k": "v"}),
        lambda store, s: store.update_info(s, title="t"),
        lambda store, s: store.add_usage(s, calls=1),
    ]
    for new in news:
        wrong = EncryptedStorage(SqliteStorage(tmp_path / "store.db"), KEY_B)
        with pytest.raises(EncryptionKeyError, match="nothing was changed"):
            await new(wrong, "fresh")
        await wrong.close()
    assert sorted(await right.list_sessions()) == stored
    # a plain store gets no sealed session either: migrate copies it into an encrypted one
    plain = SqliteStorage(tmp_path / "plain.db")
    await plain.append("p", [ChatMessage.user("clear")])
    await plain.append("p-empty", [])
    sealing = EncryptedStorage(plain, KEY_A)
    with pytest.raises(EncryptionError, match="sessions migrate"):
        await sealing.append("fresh", [ChatMessage.user("sealed?")])
    assert sorted(await plain.list_sessions()) == ["p", "p-empty"]
    await sealing.close()
    # the store's key (as an old key, mid-rekey, too) and an empty store start sessions
    for store in (
        EncryptedStorage(SqliteStorage(tmp_path / "store.db"), KEY_A),
        EncryptedStorage(SqliteStorage(tmp_path / "store.db"), KEY_B, old_keys=[KEY_A]),
        EncryptedStorage(SqliteStorage(tmp_path / "empty.db"), KEY_B),
    ):
        await store.delete("fresh")
        await store.append("fresh", [ChatMessage.user("fine")])
        assert [m.text for m in await store.load("fresh")] == ["fine"]
        await store.close()
    await right.close()


def test_missing_or_empty_key_variable_opens_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.db"
    monkeypatch.delenv("CONVERSA_TEST_NO_KEY", raising=False)
    with pytest.raises(EncryptionKeyError, match="CONVERSA_TEST_NO_KEY, which is not set"):
        open_storage(keyed(f"sqlite:///{path}", "CONVERSA_TEST_NO_KEY"))
    monkeypatch.setenv("CONVERSA_TEST_NO_KEY", " ")
    with pytest.raises(EncryptionKeyError, match="which is empty"):
        open_storage(keyed(f"sqlite:///{path}", "CONVERSA_TEST_NO_KEY"))
    monkeypatch.setenv("CONVERSA_TEST_NO_KEY", "short")
    with pytest.raises(EncryptionKeyError, match=r"at least 32 bytes.*generate_key"):
        open_storage(keyed(f"sqlite:///{path}", "CONVERSA_TEST_NO_KEY"))
    assert not path.exists()


def test_the_url_names_a_variable_never_the_key(tmp_path: Path) -> None:
    base = f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(UnsupportedStorageURL, match="must name one environment variable"):
        open_storage(f"{base}?{enc.KEY_OPTION}=")
    with pytest.raises(UnsupportedStorageURL, match="must name one environment variable"):
        open_storage(f"{base}?{enc.KEY_OPTION}={ENV_A}&{enc.KEY_OPTION}={ENV_B}")
    # the inner URL keeps its other options, byte for byte, in any order
    assert enc.split_key_option(f"{base}?durability=power&{enc.KEY_OPTION}=K") == (
        f"{base}?durability=power",
        "K",
    )
    assert enc.split_key_option(f"memory://?{enc.KEY_OPTION}=K") == ("memory://", "K")
    store = open_storage(f"{base}?{enc.KEY_OPTION}={ENV_A}&durability=power")
    assert isinstance(store, EncryptedStorage)
    assert "durability='power'" in repr(store) and KEY_A not in repr(store)
    assert store.key_id == enc.key_id(KEY_A)
    with pytest.raises(UnsupportedStorageURL, match="known options"):
        open_storage(f"{base}?{enc.KEY_OPTION}={ENV_A}&typo=1")


def test_the_cli_says_the_key_is_missing_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVERSA_TEST_NO_KEY", raising=False)
    url = keyed(f"sqlite:///{tmp_path / 'store.db'}", "CONVERSA_TEST_NO_KEY")
    result = CliRunner().invoke(cli, ["sessions", "list", "--storage", url])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: the encryption key is read from the environment variable CONVERSA_TEST_NO_KEY, "
        "which is not set: set it to the store's key"
    ]


async def test_plain_data_under_the_wrapper_is_refused() -> None:
    inner = InMemoryStorage()
    await inner.append("plain", [ChatMessage.user("not encrypted")])
    store = EncryptedStorage(inner, KEY_A)
    with pytest.raises(EncryptionError, match=r"is not encrypted.*sessions migrate"):
        await store.load("plain")
    with pytest.raises(EncryptionError, match="is not encrypted"):
        await store.append("plain", [ChatMessage.user("more")])
    assert await inner.count("plain") == 1
    await inner.set_flow("plain-flow", _flow({"booking": {"to": "Paris"}}))
    for read in (store.get_info, store.get_state_and_flow):
        with pytest.raises(EncryptionError, match=r"flow data of route 'booking'.*not encrypted"):
            await read("plain-flow")


async def test_altered_or_moved_records_do_not_decrypt() -> None:
    inner = InMemoryStorage()
    store = EncryptedStorage(inner, KEY_A)
    await store.append("a", [ChatMessage.user("one")])
    await store.append("b", [ChatMessage.user("two")])
    stored = (await inner.load("a"))[0]
    token = stored.content
    assert isinstance(token, str)
    # another digit of the token's own alphabet ("A" would not do: the hex decoder reads it
    # as "a", the digit "*" stands for, so one time in sixteen it changed nothing)
    middle = len(token) // 2
    other = "!" if token[middle] != "!" else "#"
    flipped = token[:middle] + other + token[middle + 1 :]
    await inner.save("a", [stored.replace(content=flipped)])
    with pytest.raises(CorruptSessionError, match="damaged or altered"):
        await store.load("a")
    await inner.save("b", [stored])  # a record of session "a", copied into "b"
    with pytest.raises(CorruptSessionError, match="does not decrypt"):
        await store.load("b")
    # the clear fields are bound to the token too: a changed role or tool name is caught
    call = ToolCall("c1", "harmless", "{}")
    await store.save("c", [ChatMessage.assistant("", tool_calls=[call]), ChatMessage.user("u")])
    sealed = await inner.load("c")
    renamed = sealed[0].replace(tool_calls=(ToolCall("c1", "rm_rf", ""),))
    for altered in (renamed, sealed[1].replace(role="system")):
        await inner.save("c", [altered])
        with pytest.raises(CorruptSessionError, match="damaged or altered"):
            await store.load("c")
    # a route's sealed data moved to another route does not open there
    await store.set_flow("d", _flow({"booking": {"to": "Paris"}, "greet": {}}))
    info = await inner.get_info("d")
    assert info is not None
    data = info.flow.data
    swapped = {"booking": data["greet"], "greet": data["booking"]}
    await inner.set_flow("d", dataclasses.replace(info.flow, data=swapped))
    with pytest.raises(CorruptSessionError, match="damaged or altered"):
        await store.get_info("d")


def test_without_cryptography_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'conversa-ai\[encryption\]'"):
        EncryptedStorage(InMemoryStorage(), KEY_A)


# -- migrate in and out ----------------------------------------------------------------------

LONG_AGO = datetime(2021, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


async def fill(store: ConversationStorage, sessions: int = 3, messages: int = 4) -> None:
    """Sessions with set and default titles, metadata, state with and without expiry, old times."""
    later = datetime.now(UTC) + timedelta(hours=1)
    for s in range(sessions):
        sid = f"chat-{s}"
        history = [ChatMessage.system("be brief")]
        for i in range(messages):
            history.append(ChatMessage.user(f"question {s}.{i} zebracontent", metadata={"i": i}))
            call = ToolCall(f"c{i}", "look", json.dumps({"q": f"walrusargument {i}"}))
            history.append(ChatMessage.assistant("", tool_calls=[call]))
            history.append(ChatMessage.tool(f"c{i}", "quaggatoolresult"))
        await store.save(sid, history)
        if s % 2:
            await store.update_info(sid, title=f"tapirtitle {s}", metadata={"x": "serowinfometa"})
        await store.update_info(sid, user_id=f"user-{s % 2}", status="active")
        await store.set_state(sid, {"forever": {"v": "urialstatevalue"}})
        await store.set_state(sid, {"later": [s]}, expires_at=later)
        await store.set_flow(sid, _flow({"booking": {"to": f"ibexflowdata {s}"}}, LONG_AGO))
        moment = LONG_AGO + timedelta(minutes=s)
        await store.set_times(sid, created_at=moment, updated_at=moment)


async def everything(store: ConversationStorage) -> dict[str, Any]:
    return {sid: await snapshot(store, sid) for sid in await store.list_sessions()}


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_migrate_into_and_out_of_an_encrypted_store(tmp_path: Path) -> None:
    plain_url = f"sqlite:///{tmp_path / 'plain.db'}"
    secret_url = keyed(f"sqlite:///{tmp_path / 'secret.db'}")
    back_url = f"file://{tmp_path / 'back'}"

    async def filled() -> dict[str, Any]:
        async with open_storage(plain_url) as plain:
            await fill(plain)
            return await everything(plain)

    want = asyncio.run(filled())
    out = invoke("sessions", "migrate", "--from", plain_url, "--to", secret_url)
    assert "migrated 3 sessions (39 messages)" in out

    async def check_secret() -> None:
        async with open_storage(secret_url) as secret:
            assert await everything(secret) == want  # titles, metadata, state expiry, times
            found = await secret.find_sessions(user_id="user-1")
            assert [i.title for i in found] == ["tapirtitle 1"]

    asyncio.run(check_secret())
    raw = (tmp_path / "secret.db").read_bytes()
    assert b"zebracontent" not in raw and b"urialstatevalue" not in raw

    invoke("sessions", "migrate", "--from", secret_url, "--to", back_url)
    assert asyncio.run(read_all(back_url)) == want


async def read_all(url: str) -> dict[str, Any]:
    async with open_storage(url) as store:
        return await everything(store)


# -- key rotation ----------------------------------------------------------------------------


def key_ids_in(path: Path) -> set[str]:
    """The key ids named by the tokens anywhere in a SQLite database's rows."""
    text = sqlite_rows(path).decode("utf-8", "replace")
    found = set()
    for part in text.split(enc.PREFIX)[1:]:
        found.add(part.split(":", 1)[0])
    return found


def test_rekey_re_encrypts_in_place_and_keeps_everything(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"

    async def filled() -> dict[str, Any]:
        async with open_storage(keyed(url)) as store:
            await fill(store)
            return await everything(store)

    want = asyncio.run(filled())
    rekey = ["sessions", "rekey", "--old-key-env", ENV_A, "--new-key-env", ENV_B]
    out = invoke(*rekey, "--storage", keyed(url))  # the URL's own key option is ignored
    assert "rekeyed 3 sessions (0 finished from an earlier run, 0 already" in out
    assert f"?encryption_key_env={ENV_B}" in out
    assert key_ids_in(tmp_path / "store.db") == {enc.key_id(KEY_B)}
    assert asyncio.run(read_all(keyed(url, ENV_B))) == want
    with pytest.raises(EncryptionKeyError, match=enc.key_id(KEY_B)):
        asyncio.run(read_all(keyed(url, ENV_A)))
    again = invoke(*rekey, "--storage", url)
    assert "rekeyed 0 sessions (0 finished from an earlier run, 3 already" in again


async def test_rekey_interrupted_before_the_times_finishes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inner = InMemoryStorage()
    store = EncryptedStorage(inner, KEY_A)
    await fill(store, sessions=2)
    want = await everything(store)

    async def killed(*args: Any) -> None:
        raise KeyboardInterrupt  # as if the process died just before the times were restored

    real = enc._restore_times
    monkeypatch.setattr(enc, "_restore_times", killed)
    with pytest.raises(KeyboardInterrupt):
        async for _ in enc.rekey(inner, KEY_A, KEY_B):
            pass
    monkeypatch.setattr(enc, "_restore_times", real)
    first = (await inner.list_sessions())[0]  # the one the kill interrupted
    done = {r.session_id: r.done async for r in enc.rekey(inner, KEY_A, KEY_B)}
    assert done[first] == "finished" and set(done.values()) == {"finished", "rekeyed"}
    assert await everything(EncryptedStorage(inner, KEY_B)) == want
    assert {r.done async for r in enc.rekey(inner, KEY_A, KEY_B)} == {"already"}


async def test_rekey_refuses_the_same_key_and_a_third_key() -> None:
    inner = InMemoryStorage()
    await EncryptedStorage(inner, KEY_A).append("s", [ChatMessage.user("x")])
    with pytest.raises(EncryptionKeyError, match="the same key"):
        async for _ in enc.rekey(inner, KEY_A, KEY_A):
            pass
    before = await inner.load("s")
    with pytest.raises(EncryptionKeyError, match="nothing was changed"):
        async for _ in enc.rekey(inner, enc.generate_key(), KEY_B):
            pass
    assert await inner.load("s") == before


def _rekey_child(url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["sessions", "rekey", "--storage", url, "--old-key-env", ENV_A, "--new-key-env", ENV_B]
    return subprocess.Popen(
        [CONVERSA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_rekey_killed_mid_way_resumes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    total = 40

    async def prepare() -> dict[str, Any]:
        store = open_storage(keyed(url))
        await fill(store, sessions=total, messages=30)
        want = await everything(store)
        await store.close()
        return want

    want = asyncio.run(prepare())
    mixed = 0
    for after in (1, 6, 15):  # kill after this many sessions were reported done
        child = _rekey_child(url)
        assert child.stdout is not None
        lines = []
        for _ in range(after):  # bounded: one line per session, then the kill
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        assert child.stderr is not None
        child.stderr.close()
        if len(key_ids_in(tmp_path / "store.db")) == 2:
            mixed += 1  # killed with sessions of both keys in the store
    assert mixed >= 1
    child = _rekey_child(url)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "rekeyed" in out.splitlines()[-1]
    assert key_ids_in(tmp_path / "store.db") == {enc.key_id(KEY_B)}

    async def check() -> None:
        store = open_storage(keyed(url, ENV_B))
        assert await everything(store) == want
        await store.close()

    asyncio.run(check())


def test_generate_key_and_key_id() -> None:
    key = enc.generate_key()
    assert len(key) == 44 and enc.key_id(key) != enc.key_id(enc.generate_key())
    assert len(enc.key_id(key)) == 12 and key not in enc.key_id(key)


async def test_a_session_with_tools_over_an_encrypted_store(tmp_path: Path) -> None:
    from conversa import create_session, tool
    from conversa.testing import ScriptedModel
    from conversa.testing.replies import tool_call

    @tool
    def remember(note: str) -> str:
        """Keep a note."""
        return f"kept {note} as quaggatoolresult"

    url = keyed(f"sqlite:///{tmp_path / 'store.db'}")
    model = ScriptedModel([tool_call("remember", {"note": "walrusargument"}), "okapi zebracontent"])
    session = await create_session("chat", url, model=model, tools=[remember])
    result = await session.send_message("please remember yakcontentpart")
    assert result.success
    await session.state.set("cart", ["urialstatevalue"])
    await session.close()
    reopened = await create_session("chat", url, model=ScriptedModel())
    assert [m.role for m in reopened.history] == ["user", "assistant", "tool", "assistant"]
    assert reopened.history[-1].text == "okapi zebracontent"
    assert reopened.state.get("cart") == ["urialstatevalue"]
    await reopened.close()
    blob = files_under(tmp_path)  # the database, its WAL and the lease files
    for secret in ("yakcontentpart", "walrusargument", "quaggatoolresult", "zebracontent"):
        assert secret.encode() not in blob
    assert b"chat" in blob


def test_rekey_without_its_keys_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVERSA_TEST_NO_KEY", raising=False)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["sessions", "rekey", "--storage", url, "--old-key-env", ENV_A]
    result = CliRunner().invoke(cli, [*args, "--new-key-env", "CONVERSA_TEST_NO_KEY"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: the encryption key is read from the environment variable CONVERSA_TEST_NO_KEY, "
        "which is not set: set it to the store's key"
    ]
    result = CliRunner().invoke(cli, [*args, "--new-key-env", ENV_A])
    assert result.output.splitlines() == ["error: the old and the new key are the same key"]
    assert not (tmp_path / "store.db").exists()
