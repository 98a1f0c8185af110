"""SqliteStorage: the conformance suite plus what is SQLite-specific (URLs, schema, errors)."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _wait import wait_for

from conversa import ChatMessage, create_session, open_storage
from conversa.errors import (
    CorruptSessionError,
    InvalidSessionId,
    SessionBusy,
    StorageError,
    UnsupportedStorageURL,
)
from conversa.storage import ConversationStorage
from conversa.storage import _sqlite_migrations as migrations
from conversa.storage import sqlite as sqlite_module
from conversa.storage._sqlite_migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from conversa.storage.base import SearchHit
from conversa.storage.sqlite import SqliteStorage
from conversa.testing.conformance import StorageConformance


class TestSqliteConformance(StorageConformance):
    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[ConversationStorage]:
        async with SqliteStorage(tmp_path / "sessions.db") as store:
            yield store


def _user(text: str, **meta: Any) -> ChatMessage:
    return ChatMessage.user(text, metadata=meta)


def _raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection beside the storage's, to inspect or damage the file."""
    return sqlite3.connect(path, isolation_level=None)


async def _on_conn(store: SqliteStorage, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """Run ``fn`` on the storage's own connection (per-connection PRAGMAs live there)."""
    return await store._run(fn)


# -- URLs -------------------------------------------------------------------------------------


def test_url_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqliteStorage.from_url("sqlite:///data/rel.db")
    assert store.path == tmp_path / "data" / "rel.db"
    assert store.durability == "crash"


def test_url_absolute_path_and_durability(tmp_path: Path) -> None:
    store = SqliteStorage.from_url(f"sqlite:///{tmp_path}/abs.db?durability=power")
    assert str(tmp_path).startswith("/")
    assert store.path == tmp_path / "abs.db"
    assert store.durability == "power"


def test_url_percent_escapes(tmp_path: Path) -> None:
    store = SqliteStorage.from_url(f"sqlite:///{tmp_path}/with%20space.db")
    assert store.path == tmp_path / "with space.db"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://relative.db",  # two slashes: the name lands in the host part
        "sqlite:///",
        "sqlite://",
        "sqlite:///x.db?durability=sometimes",
        "sqlite:///x.db?mode=ro",
    ],
)
def test_bad_urls_say_what_to_write(url: str) -> None:
    with pytest.raises(UnsupportedStorageURL) as err:
        SqliteStorage.from_url(url)
    assert "sqlite:///" in str(err.value) or "durability" in str(err.value)


def test_bad_durability_argument() -> None:
    with pytest.raises(ValueError, match="power"):
        SqliteStorage("x.db", durability="sometimes")  # type: ignore[arg-type]


def test_open_storage_routes_urls_and_db_paths(tmp_path: Path) -> None:
    by_url = open_storage(f"sqlite:///{tmp_path}/a.db")
    by_path = open_storage(tmp_path / "b.db")
    assert isinstance(by_url, SqliteStorage) and by_url.path == tmp_path / "a.db"
    assert isinstance(by_path, SqliteStorage) and by_path.path == tmp_path / "b.db"


@pytest.mark.parametrize(("durability", "synchronous"), [("crash", 1), ("power", 2)])
async def test_pragmas(tmp_path: Path, durability: Any, synchronous: int) -> None:
    async with SqliteStorage(tmp_path / "p.db", durability=durability) as store:
        assert await store.count("s") == 0
        pragmas = await _on_conn(
            store,
            lambda c: [
                c.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "busy_timeout")
            ],
        )
    assert pragmas == ["wal", synchronous, 10_000]


# -- opening: files, schema, errors -----------------------------------------------------------


async def test_file_is_private_and_created_lazily(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "sessions.db"
    store = SqliteStorage(path)
    assert not path.exists()  # nothing happens until first use
    await store.append("s", [_user("secret")])
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


async def test_wal_file_is_private_too(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    async with SqliteStorage(path) as store:
        await store.append("s", [_user("secret")])
        wal = path.with_name(path.name + "-wal")
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600


async def test_fresh_database_gets_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.count("x")
    with _raw(path) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION == len(MIGRATIONS)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"sessions", "messages", "state", "messages_fts"} <= names
    assert {"sessions_updated_at", "sessions_user_updated_at"} <= names


async def test_reopening_is_a_noop(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.append("s", [_user("kept")])
    with _raw(path) as conn:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        assert migrate(conn, str(path)) == 0
    async with SqliteStorage(path) as store:
        assert [m.text for m in await store.load("s")] == ["kept"]
    with _raw(path) as conn:
        again = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert again == schema


def test_migrate_applies_every_migration_once(tmp_path: Path) -> None:
    with _raw(tmp_path / "m.db") as conn:
        assert migrate(conn, "m.db") == SCHEMA_VERSION
        assert not conn.in_transaction
        assert migrate(conn, "m.db") == 0


def test_migrate_refuses_foreign_tables(tmp_path: Path) -> None:
    path = tmp_path / "other-app.db"
    with _raw(path) as conn:
        conn.execute("CREATE TABLE sessions (token TEXT)")
        with pytest.raises(StorageError, match="not a conversa SQLite database") as err:
            migrate(conn, str(path))
        assert "sessions" in str(err.value)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert not conn.in_transaction


@pytest.mark.parametrize("content", [b"hello, I am a text file\n" * 200, b"short"])
async def test_not_a_database(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    store = SqliteStorage(path)
    with pytest.raises(StorageError) as err:
        await store.load("s")
    message = str(err.value)
    assert str(path) in message
    assert "not a conversa SQLite database" in message
    assert path.read_bytes() == content  # left untouched
    await store.close()


async def test_create_session_that_fails_closes_the_storage_it_opened(tmp_path: Path) -> None:
    def workers() -> int:
        return sum(t.name == "conversa-sqlite" for t in threading.enumerate())

    before = workers()
    path = tmp_path / "s.db"
    holder = SqliteStorage(path)
    await holder.append("other", [ChatMessage.user("x")])

    errors: list[BaseException] = []  # their tracebacks keep each try's storage alive
    async with holder.lease("s", wait=0):
        for _ in range(3):  # a service retrying must not gather a connection per try
            with pytest.raises(SessionBusy) as caught:
                await create_session("s", f"sqlite:///{path}", turn_wait=0)
            errors.append(caught.value)
        await wait_for(
            lambda: workers() <= before + 1, "the connections create_session opened to close"
        )
        # a storage the caller passed stays the caller's to close
        with pytest.raises(SessionBusy):
            await create_session("s", holder, turn_wait=0)
        assert await holder.count("other") == 1
    await holder.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    async with SqliteStorage(path) as store:
        await store.append("s", [_user("x")])
    with _raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SqliteStorage(path)
    with pytest.raises(StorageError, match="newer conversa") as err:
        await store.count("s")
    assert str(path) in str(err.value)
    assert "upgrade" in str(err.value)
    await store.close()


@pytest.mark.parametrize(
    "damage",
    ['{"role": "user", "content": "trunc', '{"role": "wizard", "content": "x"}', "[1, 2]"],
)
async def test_corrupt_row_names_session_and_seq(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s.db"
    msgs = [_user(str(i)) for i in range(3)]
    async with SqliteStorage(path) as store:
        await store.append("chat-7", msgs)
        with _raw(path) as conn:
            conn.execute(
                "UPDATE messages SET data = ? WHERE session_id = 'chat-7' AND seq = 1", (damage,)
            )
        with pytest.raises(CorruptSessionError) as err:
            await store.load("chat-7")
        assert "'chat-7'" in str(err.value) and "seq 1" in str(err.value)
        with pytest.raises(CorruptSessionError):
            await store.pop("chat-7", 2)
        # the failed pop rolled back: nothing was removed
        assert await store.count("chat-7") == 3
        assert await store.pop("chat-7") == msgs[2:]


@pytest.mark.parametrize("metadata", ["{oops", "[1, 2]"])
async def test_corrupt_metadata_and_state(tmp_path: Path, metadata: str) -> None:
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.update_info("s", metadata={"a": 1})
        await store.set_state("s", {"k": 1})
        with _raw(path) as conn:
            conn.execute("UPDATE sessions SET metadata = ?", (metadata,))
            conn.execute("UPDATE state SET value = '[unclosed'")
        with pytest.raises(CorruptSessionError, match=r"'s'.*metadata"):
            await store.get_info("s")
        with pytest.raises(CorruptSessionError, match="'k'"):
            await store.get_state("s")


async def test_sqlite_errors_become_storage_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.set_state("s", {"k": 1})
        with _raw(path) as conn:
            conn.execute("DROP TABLE state")
        with pytest.raises(StorageError, match="no such table") as err:
            await store.get_state("s")
        assert not isinstance(err.value, sqlite3.Error)
        assert str(path) in str(err.value)


async def test_unencodable_text_is_refused_cleanly(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "s.db") as store:
        await store.append("s", [_user("fine")])
        # ChatMessage refuses lone surrogates; from_dict (the load path) skips that check, so
        # it is how one can still reach the store, which must refuse it cleanly too.
        broken = ChatMessage.from_dict({"role": "user", "content": "half \ud800 a pair"})
        with pytest.raises(StorageError, match="surrogate"):
            await store.append("s", [_user("ok"), broken])
        assert [m.text for m in await store.load("s")] == ["fine"]
        await store.set_state("s", {"k": "\ud800"})  # state is stored as ASCII JSON
        assert await store.get_state("s") == {"k": "\ud800"}


async def test_memory_database(tmp_path: Path) -> None:
    store = SqliteStorage.from_url("sqlite:///:memory:")
    await store.append("s", [_user("a")])
    assert [m.text for m in await store.load("s")] == ["a"]
    await store.close()
    assert not (tmp_path / ":memory:").exists()


async def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "s.db")
    await store.append("s", [_user("a")])
    await store.close()
    await store.close()
    with pytest.raises(StorageError, match="is closed"):
        await store.count("s")
    never_opened = SqliteStorage(tmp_path / "t.db")
    await never_opened.close()
    with pytest.raises(StorageError, match="is closed"):
        await never_opened.load("s")
    assert not (tmp_path / "t.db").exists()
    async with SqliteStorage(tmp_path / "s.db") as again:
        assert await again.count("s") == 1


# -- a program ends, closed or not -----------------------------------------------------------

# Each script leaves its storage open when its main code ends. Before, aiosqlite's non-daemon
# thread kept the process alive forever (in threading._shutdown), or printed "Event loop is
# closed" from that thread. EXIT_WAIT bounds the wait for the process to end.
EXIT_WAIT = 60

SYNC_SCRIPT = """
from conversa import create_session_sync
from conversa.testing import ScriptedModel

s = create_session_sync("s", "sqlite:///x.db", model=ScriptedModel())
print(s.send_message("hi").result)
"""

ASYNC_SCRIPT = """
import asyncio, sys
from conversa import create_session
from conversa.testing import ScriptedModel

async def main():
    session = await create_session("s", "sqlite:///x.db", model=ScriptedModel())
    print((await session.send_message("hi")).result)
    {ending}

asyncio.run(main())
"""

STORAGE_SCRIPT = """
import asyncio
from conversa import ChatMessage
from conversa.storage.sqlite import SqliteStorage

store = SqliteStorage("x.db")

async def main():
    for n in range(20):
        await store.append("s", [ChatMessage.user(f"m{n}")])

asyncio.run(main())
"""


def _run_script(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=EXIT_WAIT,
        check=False,
    )


def _stored(path: Path) -> list[str]:
    with _raw(path) as conn:
        rows = conn.execute("SELECT data FROM messages WHERE session_id = 's' ORDER BY seq")
        return [ChatMessage.from_json(data).text for (data,) in rows]


def test_a_script_with_an_open_sync_session_exits(tmp_path: Path) -> None:
    out = _run_script(tmp_path, SYNC_SCRIPT)
    assert (out.returncode, out.stdout, out.stderr) == (0, "echo: hi\n", "")
    # the connection was closed at exit: the WAL was checkpointed into the database
    assert not (tmp_path / "x.db-wal").exists()
    assert _stored(tmp_path / "x.db") == ["hi", "echo: hi"]


@pytest.mark.parametrize(
    ("ending", "code", "error"),
    [
        ("pass", 0, ""),
        ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
        ("sys.exit(3)", 3, ""),
    ],
)
def test_an_async_program_exits_however_its_coroutine_ends(
    tmp_path: Path, ending: str, code: int, error: str
) -> None:
    out = _run_script(tmp_path, ASYNC_SCRIPT.format(ending=ending))
    assert (out.returncode, out.stdout) == (code, "echo: hi\n")
    # the program's own traceback, if any, and nothing from the storage's thread
    assert out.stderr.strip().rpartition("\n")[2] == error, out.stderr
    assert "Event loop is closed" not in out.stderr and "Thread" not in out.stderr
    assert _stored(tmp_path / "x.db") == ["hi", "echo: hi"]


def test_a_storage_never_closed_keeps_every_append(tmp_path: Path) -> None:
    out = _run_script(tmp_path, STORAGE_SCRIPT)
    assert (out.returncode, out.stderr) == (0, "")
    assert _stored(tmp_path / "x.db") == [f"m{n}" for n in range(20)]


async def test_a_dropped_storage_closes_its_connection(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "s.db")
    await store.append("s", [_user("a")])
    worker = store._worker
    assert worker is not None and worker in sqlite_module._WORKERS
    del store
    worker.join(EXIT_WAIT)
    assert worker not in sqlite_module._WORKERS and worker.conn is None


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system of its own (a tmpfs mounted for this test only)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    try:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command to make a small file system")
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], timeout=30, check=False)


def _fill(directory: Path) -> None:
    """Write a file until the file system has no room left (bounded: it is 1 MiB)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(10_000):
            os.write(fd, b"x" * 4096)
        raise AssertionError(f"{directory} never filled up")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


async def test_a_full_disk_is_named_with_its_path(small_disk: Path) -> None:
    path = small_disk / "s.db"
    async with SqliteStorage(path) as store:
        await store.append("s", [_user("kept")])
    _fill(small_disk)
    # reopening, even to read: SQLite says only "disk I/O error" (it cannot size the -shm file)
    for read in (lambda s: s.load("s"), lambda s: s.count("s")):
        with pytest.raises(StorageError) as err:
            async with SqliteStorage(path) as reader:
                await read(reader)
        message = str(err.value)
        assert f"the disk holding {small_disk} is full" in message, message
        assert str(path) in message and "free some space" in message
        assert not isinstance(err.value, sqlite3.Error)
    (small_disk / "filler").unlink()
    async with SqliteStorage(path) as writer:
        assert await writer.count("s") == 1  # opened while there is room
        _fill(small_disk)
        # a write on the open connection: SQLite's own "database or disk is full"
        with pytest.raises(StorageError) as err:
            await writer.append("s", [_user("x" * 200_000)])
        assert f"the disk holding {small_disk} is full" in str(err.value), str(err.value)
    (small_disk / "filler").unlink()
    async with SqliteStorage(path) as store:
        assert [m.text for m in await store.load("s")] == ["kept"]


# -- concurrency and bookkeeping --------------------------------------------------------------


async def test_concurrent_appends_from_two_connections(tmp_path: Path) -> None:
    """Two connections on one file, two writers on each: BEGIN IMMEDIATE keeps appends whole."""
    path = tmp_path / "shared.db"
    stores = [SqliteStorage(path), SqliteStorage(path)]

    async def writer(store: SqliteStorage, w: str) -> None:
        for n in range(50):
            await store.append("s", [_user(f"{w}{n}-{j}", w=w, n=n, j=j) for j in range(3)])

    await asyncio.gather(*(writer(stores[k % 2], w) for k, w in enumerate("abcd")))
    history = await stores[1].load("s")
    assert await stores[0].count("s") == len(history) == 600
    seen: dict[str, list[int]] = {}
    for k in range(0, 600, 3):
        batch = [(m.metadata["w"], m.metadata["n"], m.metadata["j"]) for m in history[k : k + 3]]
        w, n, _ = batch[0]
        assert batch == [(w, n, j) for j in range(3)], f"append split at {k}"
        seen.setdefault(w, []).append(n)
    assert seen == {w: list(range(50)) for w in "abcd"}
    with _raw(path) as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM messages ORDER BY seq")]
    assert seqs == list(range(600))
    for store in stores:
        await store.close()


async def test_rapid_writes_order_strictly(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "s.db") as store:
        ids = [f"s{i}" for i in range(40)]
        for sid in ids:
            await store.append(sid, [_user(sid)])
        assert await store.list_sessions() == ids[::-1]
        infos = await store.find_sessions()
        stamps = [i.updated_at for i in infos]
        assert stamps == sorted(set(stamps), reverse=True)
        await store.set_state("s0", {"k": 1})
        assert (await store.list_sessions())[0] == "s0"


async def test_writes_order_even_when_the_clock_goes_back(tmp_path: Path) -> None:
    """A write after one stamped by a clock ahead of ours (NTP step, other host) sorts first."""
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.append("ahead", [_user("x")])
        with _raw(path) as conn:
            conn.execute("UPDATE sessions SET updated_at = updated_at + 3600000000")
        await store.append("now", [_user("y")])
        assert await store.list_sessions() == ["now", "ahead"]
        now, ahead = await store.find_sessions()
        assert now.updated_at > ahead.updated_at


async def test_default_title_follows_undo(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "s.db") as store:
        await store.append("s", [ChatMessage.system("sys")])
        await store.append("s", [ChatMessage.assistant("hi"), _user("first question")])
        await store.append("s", [_user("second question")])
        assert (info := await store.get_info("s")) and info.title == "first question"
        await store.pop("s")
        assert (info := await store.get_info("s")) and info.title == "first question"
        await store.truncate("s", 2)
        assert (info := await store.get_info("s")) and info.title is None
        await store.append("s", [_user("again")])
        assert (info := await store.get_info("s")) and info.title == "again"
        await store.save("s", [ChatMessage.system("x"), _user("saved")])
        assert (info := await store.get_info("s")) and info.title == "saved"


async def test_expired_state_rows_are_dropped_on_the_next_state_write(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.set_state("s", {"gone": 1}, expires_at=datetime(2000, 1, 1, tzinfo=UTC))
        await store.append("s", [_user("appending does not sweep")])
        with _raw(path) as conn:
            assert conn.execute("SELECT count(*) FROM state").fetchone()[0] == 1
        await store.set_state("s", {"other": 2})
        with _raw(path) as conn:
            assert [r[0] for r in conn.execute("SELECT key FROM state")] == ["other"]


async def test_append_reads_no_history(tmp_path: Path) -> None:
    """Every statement an append runs is an index lookup, so its cost does not grow with history."""
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.save("s", [_user(str(i)) for i in range(200)])
        await store.append("other", [_user("x")])
        statements: list[str] = []
        await _on_conn(store, lambda c: c.set_trace_callback(statements.append))
        await store.append("s", [_user("new"), ChatMessage.assistant("reply")])
        await _on_conn(store, lambda c: c.set_trace_callback(None))
        assert any(s.startswith("INSERT INTO messages") for s in statements)
        # the history is only ever added to, never read or counted
        assert all(s.startswith("INSERT") for s in statements if "messages" in s), statements
        with _raw(path) as conn:
            for sql in statements:
                if sql.split()[0] in ("BEGIN", "COMMIT"):
                    continue
                plan = " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
                # (SELECT last_insert_rowid(), for the search index's batches, reads no table)
                assert "SCAN" not in plan.replace("SCAN CONSTANT ROW", ""), f"{sql!r}: {plan}"


# -- tail -------------------------------------------------------------------------------------


async def test_tail_reads_only_the_newest_rows(tmp_path: Path) -> None:
    """With an early row damaged, load fails but tail(1) does not: it never reads that row."""
    path = tmp_path / "s.db"
    msgs = [_user(f"m{i}") for i in range(6)]
    async with SqliteStorage(path) as store:
        await store.append("s", msgs)
        with _raw(path) as conn:
            conn.execute("UPDATE messages SET data = '{oops' WHERE session_id = 's' AND seq = 1")
        with pytest.raises(CorruptSessionError):
            await store.load("s")
        assert await store.tail("s") == msgs[5:]
        assert await store.tail("s", 4) == msgs[2:]
        with pytest.raises(CorruptSessionError) as err:
            await store.tail("s", 5)
        assert "'s'" in str(err.value) and "seq 1" in str(err.value)


async def test_tail_validates_like_the_other_methods(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "s.db") as store:
        await store.append("s", [_user("a"), _user("b")])
        assert await store.tail("s", 0) == []
        assert await store.tail("unknown", 3) == []
        assert [m.text for m in await store.tail("s", 10)] == ["a", "b"]
        with pytest.raises(ValueError):
            await store.tail("s", -1)
        with pytest.raises(InvalidSessionId):
            await store.tail("", 1)


# -- full-text search -------------------------------------------------------------------------


def _found(hits: list[SearchHit]) -> list[tuple[str, int, str]]:
    return [(h.session_id, h.position, h.message.text) for h in hits]


def _fts_rows(path: Path) -> int:
    with _raw(path) as conn:
        return int(conn.execute("SELECT count(*) FROM messages_fts").fetchone()[0])


async def test_search_finds_words_across_sessions(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "s.db") as store:
        await store.append("older", [_user("The deployment failed"), _user("unrelated")])
        await store.append(
            "newer",
            [ChatMessage.system("be brief"), _user("how do I DEPLOY this?"), _user("Café time")],
        )
        hits = await store.search("deploy")
        assert _found(hits) == [  # newest session first, then by position; prefixes match
            ("newer", 1, "how do I DEPLOY this?"),
            ("older", 0, "The deployment failed"),
        ]
        # the full message comes back, equal to what was stored
        assert hits[1].message == (await store.load("older"))[0]
        assert _found(await store.search("deployment failed")) == [
            ("older", 0, "The deployment failed")
        ]
        assert _found(await store.search("cafe")) == [("newer", 2, "Café time")]
        assert await store.search("failed how") == []  # every word is required
        assert await store.search("nowhere") == []


async def test_search_limit_and_blank_queries(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "s.db") as store:
        await store.append("a", [_user(f"needle {i}") for i in range(10)])
        await store.append("b", [_user("needle b")])
        hits = await store.search("needle", limit=4)
        assert _found(hits) == [("b", 0, "needle b")] + [("a", i, f"needle {i}") for i in range(3)]
        assert len(await store.search("needle")) == 11
        assert await store.search("needle", limit=0) == []
        assert await store.search("") == []
        assert await store.search("  \t\n ") == []
        with pytest.raises(ValueError):
            await store.search("needle", limit=-1)


@pytest.mark.parametrize(
    "query",
    [
        '"',
        '"unbalanced',
        "*",
        "foo*",
        "AND",
        "OR NOT",
        "a AND",
        "(",
        "(a OR b)",
        ")",
        "-",
        "-x",
        "NEAR(a b)",
        "col:value",
        "^start",
        "{text}: x",
        "it's",
        "C++",
        "50%_off",
    ],
)
async def test_search_treats_fts_syntax_as_text(tmp_path: Path, query: str) -> None:
    async with SqliteStorage(tmp_path / "s.db") as store:
        await store.append("s", [_user("a and b, not near: x (see foo-bar) it's 50%_off")])
        hits = await store.search(query)
        assert all(h.session_id == "s" for h in hits)


async def test_search_special_characters_match_the_words(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "s.db") as store:
        await store.append(
            "s",
            [_user("use foo-bar here"), _user("this AND that"), _user('say "hi" (twice)')],
        )
        assert _found(await store.search("foo-bar")) == [("s", 0, "use foo-bar here")]
        assert _found(await store.search("and")) == [("s", 1, "this AND that")]
        assert _found(await store.search('"hi"')) == [("s", 2, 'say "hi" (twice)')]
        assert _found(await store.search("(twice)")) == [("s", 2, 'say "hi" (twice)')]
        assert await store.search("-") == []  # no word characters: nothing to look for
        assert _found(await store.search("- this")) == [("s", 1, "this AND that")]


async def test_search_content_parts(tmp_path: Path) -> None:
    parts = [
        {"type": "text", "text": "look at this chart"},
        {"type": "image_url", "image_url": {"url": "https://example.com/plot.png"}},
        {"type": "text", "text": "quarterly revenue"},
    ]
    async with SqliteStorage(tmp_path / "s.db") as store:
        await store.append("s", [_user("plain"), ChatMessage.user(parts)])
        hits = await store.search("quarterly")
        assert [(h.position, h.message.content) for h in hits] == [(1, parts)]
        assert _found(await store.search("chart revenue")) == [
            ("s", 1, "look at this chart\nquarterly revenue")
        ]
        assert await store.search("example") == []  # only text parts are indexed


async def test_search_has_no_stale_hits_after_any_write(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.append("t", [_user("common in t")])
        await store.append("s", [_user(f"word{i} common") for i in range(6)])
        assert len(await store.search("common")) == 7  # indexes everything

        assert [m.text for m in await store.pop("s")] == ["word5 common"]
        assert await store.search("word5") == []
        # the popped row had the highest id, so SQLite gives it to the next message: that one
        # must be indexed, and the popped text must not come back attached to it
        await store.append("s", [_user("replacement common")])
        with _raw(path) as conn:
            assert conn.execute("SELECT max(id) FROM messages").fetchone()[0] == 7
        assert _found(await store.search("replacement")) == [("s", 5, "replacement common")]
        assert await store.search("word5") == []

        await store.truncate("s", 2)
        assert [h.position for h in await store.search("common") if h.session_id == "s"] == [0, 1]
        assert await store.search("word3") == [] and await store.search("replacement") == []

        await store.save("s", [_user("saved anew")])
        assert await store.search("word0") == []
        assert _found(await store.search("saved")) == [("s", 0, "saved anew")]

        await store.delete("t")
        assert await store.search("common") == []
        assert _found(await store.search("anew")) == [("s", 0, "saved anew")]
    assert _fts_rows(path) == 1  # nothing left behind for deleted messages


async def test_search_sees_messages_appended_by_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as one, SqliteStorage(path) as two:
        await one.append("s", [_user("first apple")])
        assert len(await two.search("apple")) == 1
        await two.append("s", [_user("second apple")])
        await one.append("t", [_user("third apple")])
        hits = await asyncio.gather(one.search("apple"), two.search("apple"))
        assert (
            _found(hits[0])
            == _found(hits[1])
            == [
                ("t", 0, "third apple"),
                ("s", 0, "first apple"),
                ("s", 1, "second apple"),
            ]
        )
    assert _fts_rows(path) == 3


async def test_row_repaired_by_hand_is_reindexed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.append("s", [_user("original words")])
        assert len(await store.search("original")) == 1
        with _raw(path) as conn:
            conn.execute("UPDATE messages SET data = '{oops'")
        assert await store.search("original") == []  # a damaged row indexes as no text
        with _raw(path) as conn:
            conn.execute("UPDATE messages SET data = ?", (_user("repaired words").to_json(),))
        assert _found(await store.search("repaired")) == [("s", 0, "repaired words")]
        assert await store.search("original") == []


async def test_version_1_database_upgrades_and_becomes_searchable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written by the version-1 schema gets the index, filled, when it is opened."""
    path = tmp_path / "v1.db"
    parts = [{"type": "text", "text": "old"}, {"type": "text", "text": "multipart kiwi"}]
    with monkeypatch.context() as m:  # SqliteStorage as it was before m002
        m.setattr(migrations, "MIGRATIONS", (migrations.m001_initial,))
        m.setattr(migrations, "SCHEMA_VERSION", 1)
        async with SqliteStorage(path) as old:
            await old.append("a", [_user("kiwi one"), _user("banana"), _user("kiwi gone")])
            await old.pop("a")
            await old.append("b", [ChatMessage.user(parts), _user("kiwi two")])
            await old.append("c", [_user("kiwi doomed")])
            await old.delete("c")
            # without the index, search is the scanning default (also the no-FTS5 fallback)
            assert _found(await old.search("KIWI")) == [
                ("b", 0, "old\nmultipart kiwi"),
                ("b", 1, "kiwi two"),
                ("a", 0, "kiwi one"),
            ]
        with _raw(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            assert "messages_fts" not in names
    with _raw(path) as conn:
        conn.execute("UPDATE messages SET data = '[1, 2]' WHERE session_id = 'a' AND seq = 1")
    async with SqliteStorage(path) as store:
        assert await store.count("a") == 2  # opens it: the migration runs
        assert _fts_rows(path) == 4  # filled by the migration, damaged row included (as "")
        assert _found(await store.search("kiwi")) == [
            ("b", 0, "old\nmultipart kiwi"),
            ("b", 1, "kiwi two"),
            ("a", 0, "kiwi one"),
        ]
        assert await store.search("gone") == [] and await store.search("doomed") == []
        await store.append("a", [_user("kiwi three")])
        assert [h.position for h in await store.search("kiwi") if h.session_id == "a"] == [0, 2]
    with _raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
