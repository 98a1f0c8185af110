"""SqliteStorage: every session in one SQLite database (WAL, one row per message).

Each operation is one transaction run as one plain function on the connection's own thread
(``_Worker``). That keeps an append to a single thread hop (as cheap as a bare INSERT + commit)
and means a cancelled caller can never leave a transaction half done: the function always
commits or rolls back. Writes start with ``BEGIN IMMEDIATE`` so writers in other processes wait
their turn (up to the busy timeout) instead of failing or interleaving.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from os import PathLike
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import StorageError, UnsupportedStorageURL
from ..messages import ChatMessage
from ._lease import Waiting, file_lease, local_lease
from ._search import fts5_query, matches
from ._sqlite_migrations import (
    FTS_TABLE,
    INDEX_BATCH,
    INDEXED_UPTO_SQL,
    index_pending,
    migrate,
)
from ._stored import (
    FLOW_ROUTE_KEY,
    RESERVED_FIELD,
    SessionFlow,
    decode_flow,
    decode_info,
    decode_messages,
    decode_reserved,
    decode_state,
    first_user,
    from_micros,
    merge_reserved,
    to_micros,
)
from ._urls import Durability, Durable, durability_option, redact_url, url_durability
from .base import ConversationStorage, SearchHit, SessionInfo, SessionQuery, StateEntry, kept

# the current route in the reserved JSON; damaged JSON (edited by hand) matches no route
_ROUTE_SQL = (
    f"CASE WHEN json_valid(reserved) THEN json_extract(reserved, '$.\"{FLOW_ROUTE_KEY}\"') END = ?"
)

BUSY_TIMEOUT = 10.0
"""Seconds a writer waits for another process's transaction before giving up."""
LOW_SPACE = 1 << 20
"""Free bytes below which a SQLite I/O error is reported as a full disk (see _full_disk)."""
SORT_AT_MOST = 5000
"""Index hits a search sorts by session; with more, it reads the sessions newest first."""

_SYNCHRONOUS = {"crash": "NORMAL", "power": "FULL"}
_INFO_COLUMNS = (
    "created_at, updated_at, message_count, title, first_user_text, user_id, status, metadata, "
    "reserved"
)

P = ParamSpec("P")
T = TypeVar("T")


class SqliteStorage(Durable, ConversationStorage):
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
        self._worker: _Worker | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._fts = False  # set on opening: whether the database has the FTS5 index (m003)

    @classmethod
    def from_url(cls, url: str) -> SqliteStorage:
        """Open ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db[?durability=power]``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite" or parts.netloc or len(parts.path) < 2:
            raise UnsupportedStorageURL(
                f"bad SQLite URL {redact_url(url)!r}: use sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (three slashes, then the path)"
            )
        return cls(unquote(parts.path[1:]), durability=url_durability(url))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._path)!r}, durability={self._durability!r})"

    @property
    def path(self) -> Path:
        """The database file (absolute), or ``:memory:``."""
        return self._path

    # -- connection -----------------------------------------------------------------------

    async def _connection(self) -> _Worker:
        worker = self._worker
        if worker is not None:
            return worker
        async with self._open_lock:
            if self._closed:
                # reopening would leave a connection (and its thread) nobody closes
                raise StorageError(f"{self!r} is closed; create a new storage to use it again")
            if self._worker is None:
                self._worker = await self._open()
            return self._worker

    async def _open(self) -> _Worker:
        if not self._memory:
            _create_private_file(self._path)
        worker = _Worker(f"{self!r} is closed; create a new storage to use it again")
        try:
            self._fts = await worker.call(
                partial(_connect, worker, str(self._path), _SYNCHRONOUS[self._durability])
            )
        except BaseException as exc:
            worker.stop_soon()
            if isinstance(exc, sqlite3.Error):
                raise _storage_error(exc, str(self._path)) from exc
            raise
        # a storage dropped without close() still closes its connection and ends its thread
        weakref.finalize(self, worker.stop_soon).atexit = False
        return worker

    async def _run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(conn, ...)`` on the connection's thread; sqlite3 errors become StorageError."""
        worker = await self._connection()
        try:
            return await worker.run(fn, *args, **kwargs)
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
            worker, self._worker = self._worker, None
        if worker is not None:
            try:
                await worker.stop()
            except sqlite3.Error as exc:
                raise _storage_error(exc, str(self._path)) from exc

    # -- history --------------------------------------------------------------------------

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Replace the whole history in one transaction."""
        rows = [m.to_json() for m in history]
        await self._run(
            _store, session_id, rows, first_user(history), await self._indexed(), replace=True
        )

    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history, in order."""
        return await self._run(_load, session_id)

    async def delete(self, session_id: str) -> None:
        """Remove history, info and state of the session."""
        await self._run(_delete, session_id)

    async def list_sessions(self) -> list[str]:
        """Session ids, most recently updated first."""
        return await self._run(_list_sessions)

    async def exists(self, session_id: str) -> bool:
        """Whether anything was written for the session."""
        return await self._run(_exists, session_id)

    async def _append(
        self, session_id: str, messages: Sequence[ChatMessage], add: dict[str, int]
    ) -> None:
        # one transaction; its cost is independent of the history
        rows = [m.to_json() for m in messages]
        indexed = await self._indexed()
        await self._run(
            _store, session_id, rows, first_user(messages), indexed, replace=False, add=add
        )

    async def _count(self, session_id: str) -> int:
        return await self._run(_count, session_id)

    async def _tail(self, session_id: str, n: int) -> list[ChatMessage]:
        return await self._run(_tail, session_id, n)

    async def _read(self, session_id: str, offset: int, limit: int | None) -> list[ChatMessage]:
        return await self._run(_read, session_id, offset, -1 if limit is None else limit)

    async def _cut(self, session_id: str, n: int, *, pop: bool) -> list[ChatMessage]:
        return await self._run(_cut, session_id, n, pop)

    # -- session info ---------------------------------------------------------------------

    async def _get_info(self, session_id: str) -> SessionInfo | None:
        return await self._run(_get_info, session_id)

    async def _update_info(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        if "metadata" in fields:
            fields = {**fields, "metadata": _dumps(fields["metadata"])}
        return await self._run(_update_info, session_id, fields)

    async def _change_reserved(
        self, session_id: str, add: dict[str, int], put: dict[str, Any]
    ) -> None:
        await self._run(_change_reserved, session_id, add, put)

    async def _find(self, query: SessionQuery) -> list[SessionInfo]:
        where: list[str] = []
        params: list[Any] = []
        if query.user_id is not None:
            where.append("user_id = ?")
            params.append(query.user_id)
        if query.status is not None:
            where.append("status = ?")
            params.append(query.status)
        if query.updated_before is not None:
            where.append("updated_at < ?")
            params.append(to_micros(query.updated_before))
        if query.route is not None:
            # unindexed, like status: read on the walk by updated_at, which stops at the limit
            where.append(_ROUTE_SQL)
            params.append(query.route)
        sql = f"SELECT id, {_INFO_COLUMNS} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC LIMIT ?"
        params.append(-1 if query.limit is None else query.limit)
        return await self._run(_find_sessions, sql, params)

    async def _search(self, terms: list[str], limit: int | None) -> list[SearchHit]:
        """Matches through the FTS5 index, after indexing what writes left (see m003).

        Hits come in the order of the default search (sessions most recently updated first,
        then by position), not by bm25. A word with few hits (up to SORT_AT_MOST) is looked up
        and its hits sorted; a more common one reads the sessions newest first and stops at
        the limit. Every hit is checked with the shared rule.
        Without FTS5 in this SQLite, the scanning default search is used.
        """
        if not await self._indexed():
            return await super()._search(terms, limit)
        return await self._run(_search, terms, limit)

    async def _indexed(self) -> bool:
        """Whether the database has the FTS5 index (opening it tells)."""
        await self._connection()
        return self._fts

    # -- session state --------------------------------------------------------------------

    async def _state_entries(self, session_id: str) -> dict[str, StateEntry]:
        return (await self._run(_state_and_flow, session_id))[0]

    async def _state_and_flow(self, session_id: str) -> tuple[dict[str, StateEntry], SessionFlow]:
        return await self._run(_state_and_flow, session_id)

    async def _set_state(self, session_id: str, entries: dict[str, dict[str, Any]]) -> None:
        rows = [(k, _dumps(e["value"]), e["expires_at"]) for k, e in entries.items()]
        await self._run(_set_state, session_id, rows)

    async def _drop_state(self, session_id: str, keys: Collection[str] | None) -> None:
        await self._run(_drop_state, session_id, None if keys is None else list(keys))

    async def _set_times(self, session_id: str, created_at: datetime, updated_at: datetime) -> None:
        await self._run(_set_times, session_id, to_micros(created_at), to_micros(updated_at))

    # -- the session lease ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease(self, waiting: Waiting, ttl: float | None) -> AsyncIterator[None]:
        # An OS file lock on DB.leases/HASH.lock, released by the kernel when the holder
        # dies (a lock row would outlive it). A :memory: database lives in this process only.
        async with local_lease(self, waiting):
            if self._memory:
                yield
                return
            digest = hashlib.sha256(waiting.session_id.encode("utf-8")).hexdigest()[:40]
            path = f"{self._path}.leases{os.sep}{digest}.lock"
            async with file_lease(path, waiting):
                yield


# -- the connection's thread -----------------------------------------------------------------

# (loop to answer on, future to settle, the job); no loop and no future for a job nobody awaits
_Job = tuple[asyncio.AbstractEventLoop | None, "asyncio.Future[Any] | None", Callable[[], Any]]
_WORKERS: set[_Worker] = set()
"""The workers whose thread is running, closed at exit by _close_at_exit."""


class _Worker:
    """The thread that owns one sqlite3 connection and runs its jobs one after another.

    conversa runs its own thread rather than aiosqlite's, whose thread is not a daemon (a program
    that never closed its storage could not exit) and dies with "Event loop is closed" when a
    result comes back after its event loop closed. This one is a daemon, drops a result nobody
    can receive any more, and at exit finishes the jobs already queued and closes the connection
    (``_close_at_exit``), so every committed write is kept and the WAL is checkpointed.
    """

    def __init__(self, closed_message: str) -> None:
        self.conn: sqlite3.Connection | None = None  # touched on the worker thread only
        self._closed_message = closed_message
        self._jobs: SimpleQueue[_Job] = SimpleQueue()
        self._lock = threading.Lock()  # orders the last job (the close) after every other one
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="conversa-sqlite", daemon=True)
        _WORKERS.add(self)
        self._thread.start()

    async def run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(conn, ...)`` on the thread, after every job queued before it."""
        return await self.call(partial(self._with_conn, fn, args, kwargs))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the thread, after every job queued before it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._stopping:
                raise StorageError(self._closed_message)
            self._jobs.put((loop, future, fn))
        return await future

    async def stop(self) -> None:
        """Close the connection once the jobs already queued are done; the thread then ends."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._queue_close((loop, future, self._close)):
            await future

    def stop_soon(self) -> None:
        """stop() without waiting for it; from any thread (a finalizer, the exit)."""
        self._queue_close((None, None, self._close))

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the thread to end."""
        self._thread.join(timeout)

    def _queue_close(self, job: _Job) -> bool:
        with self._lock:
            if self._stopping:
                return False
            self._stopping = True
            self._jobs.put(job)
            return True

    def _with_conn(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if self.conn is None:
            raise StorageError(self._closed_message)
        return fn(self.conn, *args, **kwargs)

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _serve(self) -> None:
        try:
            while True:
                loop, future, fn = self._jobs.get()
                error: BaseException | None = None
                result: Any = None
                try:
                    result = fn()
                except BaseException as exc:
                    error = exc
                if loop is not None:
                    # a closed loop has nobody left to take the result (its caller is gone)
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(_settle, future, result, error)
                if fn == self._close:
                    return
        finally:
            _WORKERS.discard(self)


def _settle(future: asyncio.Future[Any] | None, result: Any, error: BaseException | None) -> None:
    if future is None or future.done():  # done: its caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@atexit.register
def _close_at_exit() -> None:
    """Let every open connection finish its queued jobs and close, waiting BUSY_TIMEOUT at most.

    Runs after the main code ended (the worker threads are daemons, so nothing waited for them
    before); a job still waiting for another process's lock after that is given up.
    """
    workers = list(_WORKERS)
    for worker in workers:
        worker.stop_soon()
    deadline = time.monotonic() + BUSY_TIMEOUT
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))


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


def _connect(worker: _Worker, path: str, synchronous: str) -> bool:
    """Open the worker's connection (on its thread) and set it up; see _setup."""
    worker.conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT)
    return _setup(worker.conn, synchronous, path)


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
    full = _full_disk(exc, where)
    if full:
        return StorageError(
            f"cannot use the SQLite database {where}: {full} (SQLite says: {text}); "
            "free some space there and retry"
        )
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


def _full_disk(exc: sqlite3.Error, where: str) -> str | None:
    """Say that the disk holding ``where`` is full if that is what ``exc`` comes from.

    SQLite reports a full disk as SQLITE_FULL during a write, but as a bare "disk I/O error"
    when it cannot size the WAL's shared-memory file on opening (even to read): so an I/O error
    counts as one when the file system has less than LOW_SPACE left.
    """
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
    if code not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR) or where == ":memory:":
        return None
    directory = Path(where).parent
    try:
        fs = os.statvfs(directory)
    except OSError:
        return None
    free = fs.f_bavail * fs.f_frsize
    if code == sqlite3.SQLITE_IOERR and free >= LOW_SPACE:
        return None
    return f"the disk holding {directory} is full ({free} bytes free)"


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


def _store(
    conn: sqlite3.Connection,
    sid: str,
    rows: list[str],
    first: tuple[int, str | None] | None,
    indexed: bool,
    *,
    replace: bool,
    add: dict[str, int] | None = None,
) -> None:
    """Write ``rows`` after the session's messages, or instead of them, and add ``add`` to
    the reserved numbers, in one transaction."""
    with _write(conn):
        stamp, head = _head(conn, sid)
        if replace and head is not None:
            conn.execute("DELETE FROM messages WHERE session_id = ?", (sid,))
        count, seq, text = _NEW_HEAD if replace else head or _NEW_HEAD
        _insert(conn, sid, count, rows, indexed)
        if seq is None and first is not None:
            seq, text = count + first[0], first[1]
        _put(conn, sid, stamp, (count + len(rows), seq, text), exists=head is not None)
        if add:
            _merge_reserved(conn, sid, add, {})


def _insert(conn: sqlite3.Connection, sid: str, start: int, rows: list[str], indexed: bool) -> None:
    conn.executemany(
        "INSERT INTO messages (session_id, seq, data) VALUES (?, ?, ?)",
        [(sid, start + i, data) for i, data in enumerate(rows)],
    )
    if indexed and rows:
        # the new ids are consecutive (each max(id) + 1 under this write lock); one divisible
        # by INDEX_BATCH indexes the batch (see m003): an append mostly leaves the index alone
        last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        if last // INDEX_BATCH > (last - len(rows)) // INDEX_BATCH:
            index_pending(conn)


def _load(conn: sqlite3.Connection, sid: str) -> list[ChatMessage]:
    cur = conn.execute("SELECT seq, data FROM messages WHERE session_id = ? ORDER BY seq", (sid,))
    return _parse_rows(conn, sid, cur)


def _tail(conn: sqlite3.Connection, sid: str, n: int) -> list[ChatMessage]:
    # newest first through the (session_id, seq) index, stopping after n rows
    cur = conn.execute(
        "SELECT seq, data FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?", (sid, n)
    )
    return _parse_rows(conn, sid, cur)[::-1]


def _read(conn: sqlite3.Connection, sid: str, offset: int, limit: int) -> list[ChatMessage]:
    # seq is the position: a range of the (session_id, seq) index (a limit of -1: no limit)
    cur = conn.execute(
        "SELECT seq, data FROM messages WHERE session_id = ? AND seq >= ? ORDER BY seq LIMIT ?",
        (sid, offset, limit),
    )
    return _parse_rows(conn, sid, cur)


def _search(conn: sqlite3.Connection, terms: list[str], limit: int | None) -> list[SearchHit]:
    _index_remainder(conn)
    match = fts5_query(terms)
    # FTS_TABLE is our own constant; the user's text only ever reaches SQLite as a parameter
    few = f"SELECT count(*) FROM (SELECT 1 FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? LIMIT ?)"
    if conn.execute(few, (match, SORT_AT_MOST + 1)).fetchone()[0] <= SORT_AT_MOST:
        sql = (
            f"SELECT m.session_id, m.seq, m.data FROM {FTS_TABLE} AS f "
            "JOIN messages AS m ON m.id = f.rowid JOIN sessions AS s ON s.id = m.session_id "
            f"WHERE {FTS_TABLE} MATCH ? ORDER BY s.updated_at DESC, m.seq"
        )
        cur = conn.execute(sql, (match,))
    else:  # so common that the newest sessions hold enough: read them in order, stop early
        # (probing the index per message would read the word's whole doclist each time)
        cur = conn.execute(
            "SELECT m.session_id, m.seq, m.data FROM sessions AS s "
            "CROSS JOIN messages AS m ON m.session_id = s.id ORDER BY s.updated_at DESC, m.seq"
        )
    hits: list[SearchHit] = []
    for sid, seq, data in cur:
        message = _parse(conn, sid, seq, data)
        if matches(terms, message.text):
            hits.append(SearchHit(sid, seq, message))
            if len(hits) == limit:
                break
    return hits


def _index_remainder(conn: sqlite3.Connection) -> None:
    """Index the rows writes left unindexed (fewer than INDEX_BATCH, see m003).

    Reads first, so a search with nothing to index takes no write lock.
    """
    upto = conn.execute(INDEXED_UPTO_SQL).fetchone()
    pending = "SELECT 1 FROM messages WHERE id > ? LIMIT 1"
    if conn.execute(pending, (upto[0] if upto else 0,)).fetchone() is not None:
        with _write(conn):
            index_pending(conn)  # it reads the highest indexed id again, under the lock


def _parse(conn: sqlite3.Connection, sid: str, seq: int, data: Any) -> ChatMessage:
    return _parse_rows(conn, sid, [(seq, data)])[0]


def _parse_rows(
    conn: sqlite3.Connection, sid: str, rows: Iterable[tuple[int, Any]]
) -> list[ChatMessage]:
    def place(seq: int) -> str:
        return f"the message at seq {seq} of session {sid!r} in {_where(conn, 'messages')}"

    return decode_messages(rows, place, "fix or remove that row")


def _where(conn: sqlite3.Connection, table: str) -> str:
    """The table and database file, for an error message (the file is looked up: rare)."""
    path = conn.execute("PRAGMA database_list").fetchone()[2] or ":memory:"
    return f"table {table} of the SQLite database {path}"


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


def _cut(conn: sqlite3.Connection, sid: str, n: int, pop: bool) -> list[ChatMessage]:
    """The ``_cut`` hook in one write transaction."""
    with _write(conn):
        stamp, head = _head(conn, sid)
        if head is None:
            return []
        count, seq, text = head
        keep = kept(count, n, pop=pop)
        if keep >= count:
            return []
        removed: list[ChatMessage] = []
        if pop:
            cur = conn.execute(
                "SELECT seq, data FROM messages WHERE session_id = ? AND seq >= ? ORDER BY seq",
                (sid, keep),
            )
            removed = _parse_rows(conn, sid, cur)
        conn.execute("DELETE FROM messages WHERE session_id = ? AND seq >= ?", (sid, keep))
        if seq is not None and seq >= keep:
            # the first user message went, and no user message comes before it: no default title
            seq, text = None, None
        _put(conn, sid, stamp, (keep, seq, text), exists=True)
        return removed


def _get_info(conn: sqlite3.Connection, sid: str) -> SessionInfo | None:
    row = conn.execute(f"SELECT {_INFO_COLUMNS} FROM sessions WHERE id = ?", (sid,)).fetchone()
    return _info(conn, sid, row) if row else None


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


def _change_reserved(
    conn: sqlite3.Connection, sid: str, add: dict[str, int], put: dict[str, Any]
) -> None:
    with _write(conn):
        _touch(conn, sid)
        _merge_reserved(conn, sid, add, put)


def _merge_reserved(
    conn: sqlite3.Connection, sid: str, add: dict[str, int], put: dict[str, Any]
) -> None:
    """Change the reserved info of the session's (existing) row; the caller holds the write."""
    (raw,) = conn.execute("SELECT reserved FROM sessions WHERE id = ?", (sid,)).fetchone()
    where = functools.partial(_where, conn, "sessions")
    old = decode_reserved(raw, lambda: f"the reserved info of session {sid!r} in {where()}")
    merged = _dumps(merge_reserved(old, add, put))
    conn.execute("UPDATE sessions SET reserved = ? WHERE id = ?", (merged, sid))


def _find_sessions(conn: sqlite3.Connection, sql: str, params: list[Any]) -> list[SessionInfo]:
    return [_info(conn, row[0], row[1:]) for row in conn.execute(sql, params)]


def _info(conn: sqlite3.Connection, sid: str, row: Sequence[Any]) -> SessionInfo:
    created, updated, count, title, default_title, user_id, status, metadata, reserved = row
    return decode_info(
        sid,
        {
            "title": title,
            "user_id": user_id,
            "status": status,
            "metadata": metadata,
            RESERVED_FIELD: reserved,
        },
        created_at=from_micros(created),
        updated_at=from_micros(updated),
        message_count=count,
        default_title=default_title,
        where=lambda: _where(conn, "sessions"),
    )


def _state_and_flow(
    conn: sqlite3.Connection, sid: str
) -> tuple[dict[str, StateEntry], SessionFlow]:
    # one statement, so one snapshot: the session's row beside each live key (an unknown
    # session: one row of NULLs, which reads as no state and no flow)
    rows = conn.execute(
        "SELECT s.reserved, st.key, st.value, st.expires_at FROM (SELECT ? AS sid) AS q "
        "LEFT JOIN sessions AS s ON s.id = q.sid LEFT JOIN state AS st ON st.session_id = q.sid "
        "AND (st.expires_at IS NULL OR st.expires_at > ?)",
        (sid, time.time()),
    ).fetchall()
    where = functools.partial(_where, conn, "state")
    entries = {
        key: decode_state(sid, key, value, exp, where)
        for _, key, value, exp in rows
        if key is not None
    }
    return entries, decode_flow(sid, rows[0][0], functools.partial(_where, conn, "sessions"))


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


def _drop_state(conn: sqlite3.Connection, sid: str, keys: list[str] | None) -> None:
    with _write(conn):
        if keys is None:
            cur = conn.execute("DELETE FROM state WHERE session_id = ?", (sid,))
        else:
            cur = conn.executemany(
                "DELETE FROM state WHERE session_id = ? AND key = ?", [(sid, k) for k in keys]
            )
        if cur.rowcount > 0:
            _touch(conn, sid)


def _set_times(conn: sqlite3.Connection, sid: str, created: int, updated: int) -> None:
    with _write(conn):
        conn.execute(
            "UPDATE sessions SET created_at = ?, updated_at = ? WHERE id = ?",
            (created, updated, sid),
        )


# -- small helpers ----------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    # ASCII escapes keep lone surrogates (valid in a str, not in UTF-8) storable
    return json.dumps(value, separators=(",", ":"))
