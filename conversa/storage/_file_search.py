"""The file backend's search index: SQLite FTS5 beside the session files, caught up lazily.

One file beside the sessions, ``.conversa-search.db`` (with its ``-wal`` / ``-shm``), derived
from the session files and rebuilt whenever it is missing, damaged or from another version
(deleting it is always safe)::

    files(stem, num, stamp, dev, ino, offset, lines, fingerprint)
        what is indexed of each session file: its lines before ``offset`` (``lines`` of them),
        of the file (dev, ino) whose bytes at the start and before ``offset`` are
        ``fingerprint``, as of the session index's ``stamp`` for it
    words(text, off, len)   FTS5, rowid ``num << 32 | line``: the folded words of each line
                            (``_search.index_text``) and where the line sits in its file

Appends do not touch it: the append stays as cheap as it was. A search first catches up:
the sessions whose stamp in the session index (see ``_file_index``) differs from the one
recorded here are read from where their indexing stopped (only what was appended since, or
the whole file if it was replaced), in SQLite transactions, so several processes searching at
once index each line once. Then the index gives the candidates, newest session first (a rare
word: all of its hits, sorted; a common one: session by session, stopping at the limit); each
is read back from its file, which must still be the one indexed (else that session is indexed
again), and checked with the shared rule (``_search.matches``) before it is returned.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from ._search import fts5_query, index_text, matches, stored_text

DB_NAME = ".conversa-search.db"
VERSION = 1
SORT_AT_MOST = 5000
"""Index hits a search sorts by session; with more, it asks the sessions newest first."""
BATCH = 256
"""Sessions indexed per transaction (so other searchers wait for one batch at most)."""
_LINE_BITS = 32
_LINE_MASK = (1 << _LINE_BITS) - 1
_HITS = (
    "SELECT w.rowid, w.off, w.len, f.stem, f.dev, f.ino, f.offset, f.lines, f.fingerprint "
    f"FROM words AS w JOIN files AS f ON f.num = w.rowid >> {_LINE_BITS} WHERE words MATCH ?"
)
_FILE_BY_STEM = "SELECT num, dev, ino, offset, lines, fingerprint FROM files WHERE stem = ?"
_BUSY_TIMEOUT = 30.0


class Mark(NamedTuple):
    """How far one session file is indexed."""

    dev: int
    ino: int
    offset: int
    lines: int
    fingerprint: bytes


class Scan(NamedTuple):
    """The lines of a session file after a mark: what indexing it needs."""

    dev: int
    ino: int
    resumed: bool
    """Whether the lines follow the mark given (False: the whole file, replaced or new)."""
    first: int
    """The number (from 0) of the first line."""
    stop: int
    """The offset after the last line (an unended last line waits: it may still grow)."""
    fingerprint: bytes
    """The file's first bytes and those before ``stop`` (as ``Mark.fingerprint``)."""
    lines: Iterable[tuple[int, bytes]]
    """(offset, raw bytes without the "\\n") of each line from ``first``, read lazily."""


Reader = Callable[[str, Mark | None], contextlib.AbstractContextManager[Scan | None]]
"""Opens a session file by stem (None if it is gone) and reads its lines after the mark."""


def _schema(conn: sqlite3.Connection) -> None:
    conn.executescript(
        """
        BEGIN IMMEDIATE;
        CREATE TABLE IF NOT EXISTS files (
            stem TEXT PRIMARY KEY, num INTEGER NOT NULL UNIQUE, stamp INTEGER NOT NULL,
            dev INTEGER NOT NULL, ino INTEGER NOT NULL, offset INTEGER NOT NULL,
            lines INTEGER NOT NULL, fingerprint BLOB NOT NULL);
        CREATE VIRTUAL TABLE IF NOT EXISTS words USING fts5(
            text, off UNINDEXED, len UNINDEXED,
            tokenize = 'ascii', detail = none, columnsize = 0);
        PRAGMA user_version = 1;
        COMMIT;
        """
    )


def _span(num: int) -> tuple[int, int]:
    """The rowids of session ``num``'s lines."""
    return num << _LINE_BITS, ((num + 1) << _LINE_BITS) - 1


class SearchIndex:
    """The search index of one session directory, as one storage object uses it."""

    def __init__(self, directory: str, reader: Reader) -> None:
        self._path = os.path.join(directory, DB_NAME)
        self._read = reader
        self._conn: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None
        self._mutex = threading.Lock()
        self._opened = 0

    @staticmethod
    def available() -> bool:
        """Whether this SQLite has FTS5."""
        try:
            with contextlib.closing(sqlite3.connect(":memory:")) as conn:
                conn.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        except sqlite3.OperationalError:
            return False
        return True

    def close(self) -> None:
        """Close the database connection."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- the connection -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """The open database, (re)created if missing, replaced or not ours (mutex held)."""
        try:
            st = os.stat(self._path)
            inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            inode = None
        if self._conn is not None and inode == self._inode:
            return self._conn
        if self._conn is not None:  # deleted or replaced by someone: use the file there now
            self._conn.close()
            self._conn = None
        for attempt in range(2):
            conn = sqlite3.connect(
                self._path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")  # a cache: a lost tail is re-read
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, VERSION):
                    raise sqlite3.DatabaseError(f"search index version {version}")
                if version == 0:
                    _schema(conn)
                conn.execute("SELECT count(*) FROM files LIMIT 1").fetchone()
            except sqlite3.DatabaseError:
                conn.close()
                if attempt:
                    raise
                self._remove()  # damaged or another version: derived data, built again
                continue
            st = os.stat(self._path)
            self._conn, self._inode = conn, (st.st_dev, st.st_ino)
            self._opened += 1
            return conn
        raise AssertionError("unreachable")  # pragma: no cover

    def opened(self) -> int:
        """How many times the database was opened: another number means another database
        (deleted, rebuilt), which a caller catching up from a list of changes must read all
        sessions into."""
        with self._mutex:
            self._connection()
            return self._opened

    def _remove(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path + suffix)

    # -- catching up ----------------------------------------------------------------------

    def catch_up(self, changed: Iterable[tuple[str, int | None]]) -> None:
        """Index the sessions of ``changed`` ((stem, stamp); None: the session is gone)
        whose stamp is not the one recorded."""
        with self._mutex:
            conn = self._connection()
            dirty = []
            for stem, stamp in changed:
                row = conn.execute("SELECT stamp FROM files WHERE stem = ?", (stem,)).fetchone()
                if (None if row is None else row[0]) != stamp:
                    dirty.append((stem, stamp))
            self._catch_up(conn, dirty)

    def catch_up_all(self, sessions: Iterable[tuple[str, int]]) -> None:
        """Index what changed in ``sessions`` ((stem, stamp), all there are); drop the rest."""
        with self._mutex:
            conn = self._connection()
            known = dict(conn.execute("SELECT stem, stamp FROM files"))
            dirty: list[tuple[str, int | None]] = []
            for stem, stamp in sessions:
                if known.pop(stem, None) != stamp:
                    dirty.append((stem, stamp))
            dirty.extend((stem, None) for stem in known)  # gone
            self._catch_up(conn, dirty)

    def _catch_up(self, conn: sqlite3.Connection, dirty: list[tuple[str, int | None]]) -> None:
        for i in range(0, len(dirty), BATCH):
            with self._transaction(conn):
                for stem, stamp in dirty[i : i + BATCH]:
                    if stamp is None:
                        self._drop(conn, stem)
                    else:
                        self._index(conn, stem, stamp, force=False)

    @staticmethod
    @contextlib.contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _index(
        self, conn: sqlite3.Connection, stem: str, stamp: int | None, *, force: bool
    ) -> None:
        """Index session ``stem`` up to its file's end (in a write transaction).

        ``stamp`` None keeps the recorded one; ``force`` reads even if another process
        recorded ``stamp`` meanwhile.
        """
        row = conn.execute(
            "SELECT num, stamp, dev, ino, offset, lines, fingerprint FROM files WHERE stem = ?",
            (stem,),
        ).fetchone()
        if row is not None and row[1] == stamp and not force:
            return  # another process indexed it meanwhile
        mark = None if row is None else Mark(*row[2:])
        with self._read(stem, mark) as scan:
            if scan is None:
                self._drop(conn, stem)
                return
            if row is None:
                num = conn.execute("SELECT coalesce(max(num), 0) + 1 FROM files").fetchone()[0]
            else:
                num = row[0]
                low, high = _span(num)
                # nothing at or after the first line read stays (a replaced file's lines go)
                conn.execute(
                    "DELETE FROM words WHERE rowid BETWEEN ? AND ?", (low + scan.first, high)
                )
            rowid = (num << _LINE_BITS) + scan.first
            count = 0

            def rows() -> Iterator[tuple[int, str, int, int]]:
                nonlocal count
                for off, raw in scan.lines:
                    yield rowid + count, index_text(stored_text(raw)), off, len(raw)
                    count += 1

            conn.executemany(
                "INSERT INTO words (rowid, text, off, len) VALUES (?, ?, ?, ?)", rows()
            )
            new = Mark(scan.dev, scan.ino, scan.stop, scan.first + count, scan.fingerprint)
        conn.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (stem) DO UPDATE SET "
            "stamp = excluded.stamp, dev = excluded.dev, ino = excluded.ino, "
            "offset = excluded.offset, lines = excluded.lines, fingerprint = excluded.fingerprint",
            (stem, num, stamp if stamp is not None else row[1], *new),
        )

    @staticmethod
    def _drop(conn: sqlite3.Connection, stem: str) -> None:
        row = conn.execute("SELECT num FROM files WHERE stem = ?", (stem,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM words WHERE rowid BETWEEN ? AND ?", _span(row[0]))
            conn.execute("DELETE FROM files WHERE stem = ?", (stem,))

    def reindex(self, stem: str) -> None:
        """Index session ``stem`` again from where it stopped (its file changed under us)."""
        with self._mutex:
            conn = self._connection()
            with self._transaction(conn):
                self._index(conn, stem, None, force=True)

    # -- asking ---------------------------------------------------------------------------

    def candidates(
        self,
        terms: list[str],
        order: Callable[[str], tuple[int, str] | None],
        walk: Iterable[str],
    ) -> Iterator[tuple[str, Mark, list[tuple[int, int, int]]]]:
        """(stem, mark, [(line, offset, length), ...]) of the lines that may match, newest
        session first, lazily. ``order(stem)`` is a session's sort key in that order (None:
        not listed); ``walk`` its stems in that order (a common word reads them one by one).
        """
        match = fts5_query(terms)
        with self._mutex:
            conn = self._connection()
            few = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM words WHERE words MATCH ? LIMIT ?)",
                (match, SORT_AT_MOST + 1),
            ).fetchone()[0]
            if few <= SORT_AT_MOST:
                grouped: dict[str, tuple[Mark, list[tuple[int, int, int]]]] = {}
                for rowid, off, length, stem, *mark in conn.execute(_HITS, (match,)):
                    if stem not in grouped:
                        grouped[stem] = (Mark(*mark), [])
                    grouped[stem][1].append((rowid & _LINE_MASK, off, length))
                found = []
                for stem, (mark, lines) in grouped.items():
                    key = order(stem)
                    if key is not None:
                        found.append((key, stem, mark, sorted(lines)))
        if few <= SORT_AT_MOST:
            found.sort(key=lambda f: f[0])
            for _, stem, mark, lines in found:
                yield stem, mark, lines
            return
        for stem in walk:  # a common word: each session's hits, through its rowid range
            with self._mutex:
                row = self._connection().execute(_FILE_BY_STEM, (stem,)).fetchone()
            if row is not None:
                lines = self.session_candidates(terms, row[0])
                if lines:
                    yield stem, Mark(*row[1:]), lines

    def session_candidates(self, terms: list[str], num: int) -> list[tuple[int, int, int]]:
        """(line, offset, length) of the lines of session ``num`` that may match ``terms``.

        Read through the rowid range, each line's indexed words checked here: asking the
        full-text index per session would read the word's whole list of hits each time.
        """
        with self._mutex:
            rows = (
                self._connection()
                .execute(
                    "SELECT rowid, off, len, text FROM words WHERE rowid BETWEEN ? AND ? "
                    "ORDER BY rowid",
                    _span(num),
                )
                .fetchall()
            )
        return [(r & _LINE_MASK, off, n) for r, off, n, text in rows if matches(terms, text)]

    def current(self, stem: str) -> tuple[int, Mark] | None:
        """(num, mark) of session ``stem`` as indexed now."""
        with self._mutex:
            row = self._connection().execute(_FILE_BY_STEM, (stem,)).fetchone()
        return None if row is None else (row[0], Mark(*row[1:]))
