"""SqliteStorage: every session in one SQLite database (aiosqlite, WAL, one row per message).

Each operation is one transaction run as one plain function on aiosqlite's worker thread. That
keeps an append to a single thread hop (as cheap as a bare INSERT + commit) and means a
cancelled caller can never leave a transaction half done: the function always commits or rolls
back. Writes start with ``BEGIN IMMEDIATE`` so writers in other processes wait their turn
(up to the busy timeout) instead of failing or interleaving.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from os import PathLike
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import unquote, urlsplit

import aiosqlite

from ..errors import CorruptSessionError, StorageError, UnsupportedStorageURL
from ..messages import ChatMessage
from ._sqlite_migrations import FTS_TABLE, INDEX_AFTER_SQL, INDEXED_UPTO_SQL, migrate
from ._urls import Durability, durability_option, query_options, redact_url
from .base import (
    _UNSET,
    ConversationStorage,
    SearchHit,
    SessionInfo,
    info_fields,
    state_entries,
    title_from,
    validate_session_id,
)

BUSY_TIMEOUT = 10.0
"""Seconds a writer waits for another process's transaction before giving up."""
INDEX_BATCH = 2000
"""Messages a search indexes per write transaction while catching up (see m002)."""

_SYNCHRONOUS = {"crash": "NORMAL", "power": "FULL"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_INFO_COLUMNS = (
    "created_at, updated_at, message_count, title, first_user_text, user_id, status, metadata"
)

P = ParamSpec("P")
T = TypeVar("T")


class SqliteStorage(ConversationStorage):
    """Sessions in one SQLite database file. URL: ``sqlite:///rel.db``, ``sqlite:////abs.db``.

    ``durability="crash"`` (synchronous=NORMAL): an acknowledged write survives the process
    being killed. ``durability="power"`` (synchronous=FULL): it also survives power loss, at the
    cost of an fsync per write.
    """

    def __init__(
        self, path: str | PathLike[str] = "sessions.db", *, durability: Durability = "crash"
    ) -> None:
        self._durability = durability_option(durability)
        text = os.fspath(path)
        self._memory = text == ":memory:"
        self._path = Path(text) if self._memory else Path(text).expanduser().absolute()
        self._db: aiosqlite.Connection | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._fts = False  # set on opening: whether the database has the m002 FTS5 index

    @classmethod
    def from_url(cls, url: str) -> SqliteStorage:
        """Open ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db[?durability=power]``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite" or parts.netloc or len(parts.path) < 2:
            raise UnsupportedStorageURL(
                f"bad SQLite URL {redact_url(url)!r}: use sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (three slashes, then the path)"
            )
        option = query_options(url, {"durability"}).get("durability", "crash")
        return cls(unquote(parts.path[1:]), durability=durability_option(option, url))

    @property
    def path(self) -> Path:
        """The database file (absolute), or ``:memory:``."""
        return self._path

    @property
    def durability(self) -> Durability:
        """'crash' or 'power': what an acknowledged write survives."""
        return self._durability

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._path)!r}, durability={self._durability!r})"

    # -- connection -----------------------------------------------------------------------

    async def _connection(self) -> aiosqlite.Connection:
        db = self._db
        if db is not None:
            return db
        async with self._open_lock:
            if self._closed:
                # reopening would leave a connection (and its non-daemon thread) nobody closes
                raise StorageError(f"{self!r} is closed; create a new storage to use it again")
            if self._db is None:
                self._db = await self._open()
            return self._db

    async def _open(self) -> aiosqlite.Connection:
        if not self._memory:
            _create_private_file(self._path)
        try:
            db = await aiosqlite.connect(
                str(self._path), isolation_level=None, timeout=BUSY_TIMEOUT
            )
        except sqlite3.Error as exc:
            raise _storage_error(exc, str(self._path)) from exc
        try:
            self._fts = await _on_thread(
                db, _setup, _SYNCHRONOUS[self._durability], str(self._path)
            )
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise _storage_error(exc, str(self._path)) from exc
            raise
        return db

    async def _run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(conn, ...)`` on the connection's thread; sqlite3 errors become StorageError."""
        db = await self._connection()
        try:
            return await _on_thread(db, fn, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _storage_error(exc, str(self._path)) from exc
        except UnicodeEncodeError as exc:
            raise StorageError(
                f"cannot store text with a lone surrogate ({exc.object[exc.start : exc.end]!r}) "
                f"in {self._path}: SQLite stores UTF-8; clean the text and retry"
            ) from exc

    async def close(self) -> None:
        """Close the database connection (after the operations already under way)."""
        async with self._open_lock:
            self._closed = True
            db, self._db = self._db, None
        if db is not None:
            await db.close()

    # -- history --------------------------------------------------------------------------

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Replace the whole history in one transaction."""
        validate_session_id(session_id)
        rows = [m.to_json() for m in history]
        await self._run(_save, session_id, rows, _first_user(history))

    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history, in order."""
        validate_session_id(session_id)
        return await self._run(_load, session_id)

    async def delete(self, session_id: str) -> None:
        """Remove history, info and state of the session."""
        validate_session_id(session_id)
        await self._run(_delete, session_id)

    async def list_sessions(self) -> list[str]:
        """Session ids, most recently updated first."""
        return await self._run(_list_sessions)

    async def exists(self, session_id: str) -> bool:
        """Whether anything was written for the session."""
        validate_session_id(session_id)
        return await self._run(_exists, session_id)

    async def append(self, session_id: str, messages: Sequence[ChatMessage]) -> None:
        """Add messages to the end in one transaction; cost independent of the history."""
        validate_session_id(session_id)
        rows = [m.to_json() for m in messages]
        await self._run(_append, session_id, rows, _first_user(messages))

    async def count(self, session_id: str) -> int:
        """The number of stored messages, from the sessions row."""
        validate_session_id(session_id)
        return await self._run(_count, session_id)

    async def tail(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """The newest ``n`` messages in order: one indexed read of those rows only."""
        if n < 0:
            raise ValueError("n must be >= 0")
        validate_session_id(session_id)
        if n == 0:
            return []
        return await self._run(_tail, session_id, n)

    async def truncate(self, session_id: str, keep: int) -> None:
        """Keep only the oldest ``keep`` messages."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        validate_session_id(session_id)
        await self._run(_truncate, session_id, keep)

    async def pop(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """Remove and return the newest ``n`` messages."""
        if n < 0:
            raise ValueError("n must be >= 0")
        validate_session_id(session_id)
        if n == 0:
            return []
        return await self._run(_pop, session_id, n)

    # -- session info ---------------------------------------------------------------------

    async def get_info(self, session_id: str) -> SessionInfo | None:
        """The session's info from its sessions row, or None."""
        validate_session_id(session_id)
        return await self._run(_get_info, session_id)

    async def update_info(
        self,
        session_id: str,
        *,
        title: str | None = _UNSET,
        user_id: str | None = _UNSET,
        status: str = _UNSET,
        metadata: Mapping[str, Any] = _UNSET,
    ) -> SessionInfo:
        """Set the given info fields (creating the session if needed) and return the info."""
        validate_session_id(session_id)
        fields = info_fields(title=title, user_id=user_id, status=status, metadata=metadata)
        if "metadata" in fields:
            fields["metadata"] = _dumps(fields["metadata"])
        return await self._run(_update_info, session_id, fields)

    async def find_sessions(
        self,
        *,
        user_id: str | None = None,
        status: str | None = None,
        updated_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[SessionInfo]:
        """Infos matching every given filter, newest first, selected in SQL."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        where: list[str] = []
        params: list[Any] = []
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if updated_before is not None:
            where.append("updated_at < ?")
            params.append(_micros(updated_before))
        sql = f"SELECT id, {_INFO_COLUMNS} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return await self._run(_find_sessions, sql, params)

    async def search(self, query: str, *, limit: int = 50) -> list[SearchHit]:
        """Messages containing every word of ``query``, newest session first, then in order.

        Uses the FTS5 index; messages appended since the last search are indexed first, in
        batches of INDEX_BATCH, each its own short write transaction (see m002 for why).
        Each whitespace-separated word must occur as a word or the start of one (``deploy``
        finds "deployment"), ignoring case and accents. The words are quoted, so FTS syntax
        (``"``, ``*``, ``AND``, ``NEAR``, parentheses, ``-``) is plain text; a word with no
        letters or digits is ignored (alone, it finds nothing). Hits are ordered like the
        default search (sessions most recently updated first, then by position), not by bm25,
        so every backend lists them alike. Without FTS5 in this SQLite, the scanning default
        search is used.
        """
        if limit < 0:
            raise ValueError("limit must be >= 0")
        words = query.split()
        if not words or limit == 0:
            return []
        await self._connection()  # opening tells whether the index exists
        if not self._fts:
            return await super().search(query, limit=limit)
        return await self._run(_search, _fts_query(words), limit)

    # -- session state --------------------------------------------------------------------

    async def get_state(self, session_id: str) -> dict[str, Any]:
        """The session's state: every key that has not expired."""
        validate_session_id(session_id)
        return await self._run(_get_state, session_id)

    async def set_state(
        self, session_id: str, values: Mapping[str, Any], *, ttl: float | None = None
    ) -> None:
        """Set state keys; with ``ttl`` (seconds) they expire after that."""
        validate_session_id(session_id)
        entries = state_entries(values, ttl)
        rows = [(k, _dumps(e["value"]), e["expires_at"]) for k, e in entries.items()]
        await self._run(_set_state, session_id, rows)

    async def delete_state(self, session_id: str, keys: Iterable[str]) -> None:
        """Remove state keys; absent keys are ignored."""
        validate_session_id(session_id)
        await self._run(_delete_state, session_id, list(keys))

    async def clear_state(self, session_id: str) -> None:
        """Remove every state key of the session."""
        validate_session_id(session_id)
        await self._run(_clear_state, session_id)


async def _on_thread(
    db: aiosqlite.Connection,
    fn: Callable[Concatenate[sqlite3.Connection, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run ``fn(conn, ...)`` as one item of aiosqlite's queue, on its connection's thread.

    aiosqlite has no public way to run a whole transaction in one hop; its ``_execute`` and
    ``_conn`` have been stable since its first releases and the tests cover every use.
    """
    result = await db._execute(fn, db._conn, *args, **kwargs)  # type: ignore[no-untyped-call]
    return cast(T, result)


# -- opening --------------------------------------------------------------------------------


def _create_private_file(path: Path) -> None:
    """Create the database file readable by its owner only (and its directory, if missing)."""
    try:
        _make_private_dirs(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StorageError(
            f"cannot create the SQLite database {path}: {exc.strerror or exc}; "
            "check that its directory is writable"
        ) from exc
    os.close(fd)


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents, each with mode 0700."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for d in reversed(missing):
        # mkdir(parents=True) would give the parents the default mode, not 0700
        d.mkdir(mode=0o700, exist_ok=True)


def _setup(conn: sqlite3.Connection, synchronous: str, where: str) -> bool:
    """PRAGMAs, then the schema migrations (runs on the connection's thread).

    Returns whether the database has the full-text index (m002 skips it without FTS5).
    """
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    _enable_wal(conn)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    if synchronous == "FULL":
        conn.execute("PRAGMA fullfsync = ON")  # macOS: a plain fsync does not reach the disk
    migrate(conn, where)
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (FTS_TABLE,)).fetchone()
    return found is not None


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL; the first statement that reads the file, so a non-database fails here."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            # Another process switching a new file to WAL at the same moment makes this fail
            # at once, without waiting for the busy timeout; it succeeds once that one is done.
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _storage_error(exc: sqlite3.Error, where: str) -> StorageError:
    """A StorageError for a sqlite3 error, saying which file and what to do."""
    text = str(exc)
    if "not a database" in text or "encrypted" in text:
        return StorageError(
            f"{where} is not a conversa SQLite database (SQLite says: {text}); "
            "pass the path of a conversa database or of a file that does not exist yet"
        )
    if "locked" in text or "busy" in text:
        return StorageError(
            f"{where} stayed locked by another connection for over {BUSY_TIMEOUT:g} s "
            f"({text}); retry, or stop the process that holds it"
        )
    if "malformed" in text:
        return StorageError(
            f"the SQLite database {where} is damaged ({text}); restore it from a backup "
            "or recover it with `sqlite3 FILE .recover`"
        )
    return StorageError(f"SQLite error on {where}: {text}")


# -- transactions (each runs on the connection's thread) -------------------------------------


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction that other processes wait for; rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# What a write needs from the sessions row: message_count, first_user_seq, first_user_text.
_Head = tuple[int, int | None, str | None]
_NEW_HEAD: _Head = (0, None, None)
# id is the key, so max() of each column is the row's value, or NULL when there is no row:
# an aggregate always yields one row, which saves a second statement for the stamp.
_HEAD_SQL = (
    "SELECT (SELECT max(updated_at) FROM sessions), max(message_count), max(first_user_seq), "
    "max(first_user_text) FROM sessions WHERE id = ?"
)


def _head(conn: sqlite3.Connection, sid: str) -> tuple[int, _Head | None]:
    """The stamp for this write and the session's head (None if no row), in one indexed read.

    The stamp is now in microseconds, but later than every stored updated_at, so writes order
    strictly even when they come faster than the clock ticks or the clock steps back.
    """
    latest, count, seq, text = conn.execute(_HEAD_SQL, (sid,)).fetchone()
    now = time.time_ns() // 1000
    stamp = now if latest is None or now > latest else latest + 1
    return stamp, None if count is None else (count, seq, text)


def _put(conn: sqlite3.Connection, sid: str, stamp: int, head: _Head, *, exists: bool) -> None:
    """Write the session's row: updated_at = ``stamp`` and the given head."""
    if exists:
        conn.execute(
            "UPDATE sessions SET updated_at = ?, message_count = ?, first_user_seq = ?, "
            "first_user_text = ? WHERE id = ?",
            (stamp, *head, sid),
        )
    else:
        conn.execute(
            "INSERT INTO sessions (id, created_at, updated_at, message_count, first_user_seq, "
            "first_user_text) VALUES (?, ?, ?, ?, ?, ?)",
            (sid, stamp, stamp, *head),
        )


def _touch(conn: sqlite3.Connection, sid: str) -> None:
    """Create the sessions row if needed and move its updated_at."""
    stamp, head = _head(conn, sid)
    _put(conn, sid, stamp, head or _NEW_HEAD, exists=head is not None)


def _save(
    conn: sqlite3.Connection, sid: str, rows: list[str], first_user: tuple[int, str | None] | None
) -> None:
    seq, text = first_user or (None, None)
    with _write(conn):
        stamp, head = _head(conn, sid)
        if head is not None:
            conn.execute("DELETE FROM messages WHERE session_id = ?", (sid,))
        _insert(conn, sid, 0, rows)
        _put(conn, sid, stamp, (len(rows), seq, text), exists=head is not None)


def _append(
    conn: sqlite3.Connection, sid: str, rows: list[str], first_user: tuple[int, str | None] | None
) -> None:
    with _write(conn):
        stamp, head = _head(conn, sid)
        count, seq, text = head or _NEW_HEAD
        _insert(conn, sid, count, rows)
        if seq is None and first_user is not None:
            seq, text = count + first_user[0], first_user[1]
        _put(conn, sid, stamp, (count + len(rows), seq, text), exists=head is not None)


def _insert(conn: sqlite3.Connection, sid: str, start: int, rows: list[str]) -> None:
    conn.executemany(
        "INSERT INTO messages (session_id, seq, data) VALUES (?, ?, ?)",
        [(sid, start + i, data) for i, data in enumerate(rows)],
    )


def _load(conn: sqlite3.Connection, sid: str) -> list[ChatMessage]:
    cur = conn.execute("SELECT seq, data FROM messages WHERE session_id = ? ORDER BY seq", (sid,))
    return [_parse(sid, seq, data) for seq, data in cur]


def _tail(conn: sqlite3.Connection, sid: str, n: int) -> list[ChatMessage]:
    # newest first through the (session_id, seq) index, stopping after n rows
    cur = conn.execute(
        "SELECT seq, data FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?", (sid, n)
    )
    return [_parse(sid, seq, data) for seq, data in cur][::-1]


def _search(conn: sqlite3.Connection, match: str, limit: int) -> list[SearchHit]:
    _index_new_messages(conn)
    # FTS_TABLE is our own constant; the user's text only ever reaches SQLite as a parameter
    cur = conn.execute(
        f"SELECT m.session_id, m.seq, m.data FROM {FTS_TABLE} AS f "
        "JOIN messages AS m ON m.id = f.rowid "
        "JOIN sessions AS s ON s.id = m.session_id "
        f"WHERE {FTS_TABLE} MATCH ? ORDER BY s.updated_at DESC, m.seq LIMIT ?",
        (match, limit),
    )
    return [SearchHit(sid, seq, _parse(sid, seq, data)) for sid, seq, data in cur]


def _index_new_messages(conn: sqlite3.Connection) -> None:
    """Index the messages above the highest indexed id (see m002), INDEX_BATCH per transaction.

    Reads first, so a search with nothing new to index takes no write lock.
    """
    while _unindexed(conn) is not None:
        with _write(conn):
            # again under the lock: another connection may have indexed them meanwhile
            upto = _unindexed(conn)
            if upto is not None:
                conn.execute(INDEX_AFTER_SQL, (upto, INDEX_BATCH))


def _unindexed(conn: sqlite3.Connection) -> int | None:
    """The highest indexed message id (0 for none) if some message above it is unindexed."""
    row = conn.execute(INDEXED_UPTO_SQL).fetchone()
    upto = int(row[0]) if row else 0
    pending = conn.execute("SELECT 1 FROM messages WHERE id > ? LIMIT 1", (upto,)).fetchone()
    return None if pending is None else upto


def _fts_query(words: Sequence[str]) -> str:
    """An FTS5 query requiring every word, each as a quoted phrase matched as a prefix.

    Inside double quotes FTS5 syntax is plain text (a quote is written twice), so no input can
    raise a syntax error; "foo-bar" becomes the phrase "foo bar", and a word with no token
    characters (say "-") is an empty phrase, which FTS5 drops.
    """
    return " ".join('"' + w.replace('"', '""') + '"*' for w in words)


def _parse(sid: str, seq: int, data: Any) -> ChatMessage:
    try:
        return ChatMessage.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptSessionError(
            f"session {sid!r}: the stored message at seq {seq} is damaged ({exc}); it was "
            "left as it is: fix or remove that row of the messages table"
        ) from exc


def _delete(conn: sqlite3.Connection, sid: str) -> None:
    with _write(conn):
        conn.execute("DELETE FROM messages WHERE session_id = ?", (sid,))
        conn.execute("DELETE FROM state WHERE session_id = ?", (sid,))
        conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))


def _list_sessions(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT id FROM sessions ORDER BY updated_at DESC")]


def _exists(conn: sqlite3.Connection, sid: str) -> bool:
    return conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is not None


def _count(conn: sqlite3.Connection, sid: str) -> int:
    row = conn.execute("SELECT message_count FROM sessions WHERE id = ?", (sid,)).fetchone()
    return int(row[0]) if row else 0


def _truncate(conn: sqlite3.Connection, sid: str, keep: int) -> None:
    with _write(conn):
        _cut(conn, sid, lambda count: keep, fetch=False)


def _pop(conn: sqlite3.Connection, sid: str, n: int) -> list[ChatMessage]:
    with _write(conn):
        return _cut(conn, sid, lambda count: max(0, count - n), fetch=True)


def _cut(
    conn: sqlite3.Connection, sid: str, keeping: Callable[[int], int], *, fetch: bool
) -> list[ChatMessage]:
    """Keep the oldest ``keeping(count)`` messages (in a write); return the rest if ``fetch``."""
    stamp, head = _head(conn, sid)
    if head is None:
        return []
    count, seq, text = head
    keep = keeping(count)
    if keep >= count:
        return []
    removed: list[ChatMessage] = []
    if fetch:
        cur = conn.execute(
            "SELECT seq, data FROM messages WHERE session_id = ? AND seq >= ? ORDER BY seq",
            (sid, keep),
        )
        removed = [_parse(sid, seq, data) for seq, data in cur]
    conn.execute("DELETE FROM messages WHERE session_id = ? AND seq >= ?", (sid, keep))
    if seq is not None and seq >= keep:
        # the first user message went, and no user message comes before it: no default title
        seq, text = None, None
    _put(conn, sid, stamp, (keep, seq, text), exists=True)
    return removed


def _get_info(conn: sqlite3.Connection, sid: str) -> SessionInfo | None:
    row = conn.execute(f"SELECT {_INFO_COLUMNS} FROM sessions WHERE id = ?", (sid,)).fetchone()
    return _info(sid, row) if row else None


def _update_info(conn: sqlite3.Connection, sid: str, fields: dict[str, Any]) -> SessionInfo:
    with _write(conn):
        _touch(conn, sid)
        if fields:
            # keys come from info_fields (title, user_id, status, metadata), never from a caller
            assignments = ", ".join(f"{name} = ?" for name in fields)
            conn.execute(f"UPDATE sessions SET {assignments} WHERE id = ?", (*fields.values(), sid))
        info = _get_info(conn, sid)
    assert info is not None
    return info


def _find_sessions(conn: sqlite3.Connection, sql: str, params: list[Any]) -> list[SessionInfo]:
    return [_info(row[0], row[1:]) for row in conn.execute(sql, params)]


def _info(sid: str, row: Sequence[Any]) -> SessionInfo:
    created, updated, count, title, default_title, user_id, status, metadata = row
    try:
        meta = json.loads(metadata)
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON object was expected, not {metadata!r:.40}")
    except ValueError as exc:
        raise CorruptSessionError(
            f"session {sid!r}: its stored metadata is damaged ({exc}); set it again with "
            "update_info(metadata=...)"
        ) from exc
    return SessionInfo(
        session_id=sid,
        created_at=_EPOCH + created * _MICRO,
        updated_at=_EPOCH + updated * _MICRO,
        message_count=count,
        title=title or default_title,
        user_id=user_id,
        status=status,
        metadata=meta,
    )


def _get_state(conn: sqlite3.Connection, sid: str) -> dict[str, Any]:
    now = time.time()
    cur = conn.execute(
        "SELECT key, value FROM state WHERE session_id = ? "
        "AND (expires_at IS NULL OR expires_at > ?)",
        (sid, now),
    )
    state: dict[str, Any] = {}
    for key, value in cur:
        try:
            state[key] = json.loads(value)
        except ValueError as exc:
            raise CorruptSessionError(
                f"session {sid!r}: the stored value of state key {key!r} is damaged ({exc}); "
                "set or delete that key"
            ) from exc
    return state


def _set_state(
    conn: sqlite3.Connection, sid: str, rows: list[tuple[str, str, float | None]]
) -> None:
    now = time.time()
    with _write(conn):
        _touch(conn, sid)
        # expired keys are dropped here, on a state write, never on the append path
        conn.execute("DELETE FROM state WHERE session_id = ? AND expires_at <= ?", (sid, now))
        conn.executemany(
            "INSERT INTO state (session_id, key, value, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (session_id, key) DO UPDATE "
            "SET value = excluded.value, expires_at = excluded.expires_at",
            [(sid, *row) for row in rows],
        )


def _delete_state(conn: sqlite3.Connection, sid: str, keys: list[str]) -> None:
    with _write(conn):
        cur = conn.executemany(
            "DELETE FROM state WHERE session_id = ? AND key = ?", [(sid, k) for k in keys]
        )
        if cur.rowcount > 0:
            _touch(conn, sid)


def _clear_state(conn: sqlite3.Connection, sid: str) -> None:
    with _write(conn):
        if conn.execute("DELETE FROM state WHERE session_id = ?", (sid,)).rowcount > 0:
            _touch(conn, sid)


# -- small helpers ----------------------------------------------------------------------------


def _first_user(messages: Sequence[ChatMessage]) -> tuple[int, str | None] | None:
    """The index of the first user message among ``messages`` and its default title."""
    for i, m in enumerate(messages):
        if m.role == "user":
            return i, title_from((m,))
    return None


def _micros(dt: datetime) -> int:
    """A datetime as integer microseconds since the epoch (naive means UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MICRO


def _dumps(value: Any) -> str:
    # ASCII escapes keep lone surrogates (valid in a str, not in UTF-8) storable
    return json.dumps(value, separators=(",", ":"))
