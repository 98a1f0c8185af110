"""The file backend's index of sessions: so find_sessions reads only the sessions it returns.

Two files beside the sessions, both rebuilt from the session files whenever they are missing,
damaged or from another version (deleting them is always safe)::

    .conversa-index         a snapshot: {"v", "gen", "entries": [[stem, updated ns, id,
                            user_id, status], ...]}
    .conversa-index.log     a header line {"v", "gen"} naming its snapshot, then one JSON line
                            per write since: {"s": stem, "t": ns, "id": ...} for a history
                            write, with "u" and "st" for an info write, {"s", "d": 1} for a
                            delete

Every session write appends its line to the log while it holds the session's lock and a
shared ``flock`` on the log, so the log has each session's writes in order (the last line of a
session is its state). Compaction and rebuilds hold the log's exclusive lock, so no write
runs between reading the state and replacing the files. A storage object keeps the state in
memory and later reads only what the log gained; a new snapshot (another generation) is read
whole. Listings check each session they return against its files: a disagreement that the
log does not explain (a file changed behind conversa's back, a writer killed between its two
writes) rebuilds the index from the files.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import heapq
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

SNAPSHOT_NAME = ".conversa-index"
LOG_NAME = ".conversa-index.log"
VERSION = 1
COMPACT_BYTES = 1 << 20
"""A log longer than this is folded into a new snapshot by the next listing."""
_FEED_MAX = 100_000
"""Stems of changes kept for the search index; more, and its next search compares all."""
_WRITER_COMPACT_BYTES = 8 * COMPACT_BYTES
"""A writer folds the log only when no listing has for this long (a store nobody lists)."""


class Entry(NamedTuple):
    """What the index knows of one session."""

    stamp: int
    """updated_at, in nanoseconds since the epoch."""
    session_id: str
    user_id: str | None
    status: str | None
    """None: unknown (its meta file could not be read when the index was built)."""


Row = tuple[str, Entry]
Key = tuple[int, str]
"""(-stamp, stem): the order of a listing, newest first, ties by file name."""


def _key(stem: str, entry: Entry) -> Key:
    return (-entry.stamp, stem)


def _remove(keys: list[Key], key: Key) -> None:
    i = bisect.bisect_left(keys, key)
    if i < len(keys) and keys[i] == key:
        del keys[i]


class SessionIndex:
    """The index of one session directory, as one storage object sees it (thread-safe)."""

    def __init__(
        self,
        directory: str,
        rebuild_rows: Callable[[], Iterable[Row]],
        id_of_stem: Callable[[str], str | None],
    ) -> None:
        self._dir = directory
        self._log = os.path.join(directory, LOG_NAME)
        self._snapshot = os.path.join(directory, SNAPSHOT_NAME)
        self._rebuild_rows = rebuild_rows
        self._id_of_stem = id_of_stem
        self._mutex = threading.Lock()
        self._held = threading.local()
        self._gen: str | None = None
        self._offset = 0
        self._entries: dict[str, Entry] = {}
        self._order: list[Key] = []
        self._by_user: dict[str | None, list[Key]] = {}
        self._unknown: list[Key] = []
        # The stems the log changed, in order, since the state was last loaded whole (the
        # search index catches up from it); ``_loads`` counts those loads.
        self._feed: list[str] = []
        self._loads = 0

    # -- the writers' side ----------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the log's shared lock for one session write (the session's lock is held)."""
        fd = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            outer, self._held.fd = getattr(self._held, "fd", None), fd
            try:
                yield
            finally:
                self._held.fd = outer
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if size > _WRITER_COMPACT_BYTES:
            self._fold(blocking=False)

    def note(
        self,
        stem: str,
        stamp: int,
        session_id: str | None = None,
        info: tuple[str | None, str] | None = None,
    ) -> None:
        """Log a write of session ``stem`` at ``stamp`` (with its user and status if ``info``)."""
        record: dict[str, Any] = {"s": stem, "t": stamp}
        if session_id is not None:
            record["id"] = session_id
        if info is not None:
            record["u"], record["st"] = info
        self._write(record)

    def note_deleted(self, stem: str) -> None:
        """Log that session ``stem`` is gone."""
        self._write({"s": stem, "d": 1})

    def _write(self, record: dict[str, Any]) -> None:
        fd = getattr(self._held, "fd", None)
        assert fd is not None, "index records are written inside writing()"
        os.write(fd, (json.dumps(record) + "\n").encode())  # ASCII: non-ASCII is escaped

    # -- the readers' side ----------------------------------------------------------------

    def rows(self, user_id: str | None = None, *, any_user: bool = True) -> Iterator[Row]:
        """(stem, entry) of the indexed sessions, newest first, as of this call: all of them
        (``any_user``) or those of ``user_id`` and those whose user is unknown. Lazy, so a
        listing pays for the rows it takes.
        """
        self._refresh()
        with self._mutex:  # copies of lists of keys are cheap (no new objects)
            entries = self._entries
            if any_user:
                keys: Iterable[Key] = self._order[:]
            else:
                keys = heapq.merge(self._by_user.get(user_id, [])[:], self._unknown[:])
        for _, stem in keys:
            entry = entries.get(stem)
            if entry is not None:  # None: deleted since
                yield stem, entry

    def changed_since(
        self, cursor: tuple[int, int] | None
    ) -> tuple[tuple[int, int], list[str] | None]:
        """What changed since ``cursor`` (from an earlier call; None: the first): the new
        cursor and the stems written or deleted, or None if that is not known (read all)."""
        self._refresh()
        with self._mutex:
            now = (self._loads, len(self._feed))
            if cursor is None or cursor[0] != self._loads or cursor[1] > len(self._feed):
                return now, None
            return now, self._feed[cursor[1] :]

    def entry(self, stem: str) -> Entry | None:
        """The entry of ``stem`` as last read (no read of the log)."""
        with self._mutex:
            return self._entries.get(stem)

    def current(self, stem: str) -> Entry | None:
        """The entry of ``stem`` after reading what the log gained."""
        self._refresh()
        with self._mutex:
            return self._entries.get(stem)

    def rebuild(self) -> None:
        """Build the index again from the session files."""
        with self._locked(fcntl.LOCK_EX) as fd:
            self._rebuild(fd)

    def _refresh(self) -> None:
        with self._locked(fcntl.LOCK_SH) as fd:
            fresh = self._catch_up(fd)
            size = os.fstat(fd).st_size
        if not fresh:
            with self._locked(fcntl.LOCK_EX) as fd:
                if not self._catch_up(fd):  # nobody rebuilt it meanwhile
                    self._rebuild(fd)
        elif size > COMPACT_BYTES:
            self._fold(blocking=False)

    def _fold(self, *, blocking: bool) -> None:
        """Write the state as a new snapshot and empty the log, unless someone holds it."""
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            with self._locked(flags) as fd:
                if self._catch_up(fd):
                    self._publish(fd)
                else:
                    self._rebuild(fd)
        except BlockingIOError:
            return

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[int]:
        fd = os.open(self._log, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, how)
            yield fd
        finally:
            os.close(fd)

    def _catch_up(self, fd: int) -> bool:
        """Bring the state up to the log (the log's lock is held); False if it must be rebuilt."""
        with self._mutex:
            size = os.fstat(fd).st_size
            header = os.pread(fd, 256, 0).split(b"\n", 1)[0]
            try:
                head = json.loads(header)
                gen = head["gen"] if head.get("v") == VERSION else None
            except (ValueError, TypeError, KeyError, AttributeError):
                gen = None
            if not isinstance(gen, str):
                return False
            if gen != self._gen or size < self._offset:
                if not self._read_snapshot(gen):
                    return False
                self._offset = len(header) + 1
            data = os.pread(fd, size - self._offset, self._offset)
            end = data.rfind(b"\n") + 1  # a line being written is read next time
            for line in data[:end].splitlines():
                try:
                    self._apply(json.loads(line))
                except (ValueError, TypeError, KeyError, AttributeError):
                    return False  # a torn line (a killed writer): a write may be missing
            self._offset += end
            return True

    def _read_snapshot(self, gen: str) -> bool:
        try:
            with open(self._snapshot, "rb") as f:
                snap = json.loads(f.read())
            if snap.get("v") != VERSION or snap.get("gen") != gen:
                return False
            rows = [(s, Entry(t, i, u, st)) for s, t, i, u, st in snap["entries"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return False
        self._load(rows, gen)
        return True

    def _load(self, rows: Iterable[Row], gen: str) -> None:
        self._entries = dict(rows)
        self._order = sorted(_key(s, e) for s, e in self._entries.items())
        self._by_user, self._unknown = {}, []
        for key in self._order:
            entry = self._entries[key[1]]
            if entry.status is None:
                self._unknown.append(key)
            else:
                self._by_user.setdefault(entry.user_id, []).append(key)
        self._gen = gen
        self._loads += 1
        self._feed = []

    def _apply(self, record: dict[str, Any]) -> None:
        stem = record["s"]
        if not isinstance(stem, str):
            raise TypeError("the stem must be a string")
        if len(self._feed) >= _FEED_MAX:  # nobody asked for a long time: start again
            self._feed, self._loads = [], self._loads + 1
        self._feed.append(stem)
        old = self._entries.pop(stem, None)
        if old is not None:
            key = _key(stem, old)
            _remove(self._order, key)
            _remove(self._unknown if old.status is None else self._by_user[old.user_id], key)
        if record.get("d"):
            return
        session_id = record.get("id") or (old.session_id if old else self._id_of_stem(stem))
        if session_id is None:
            raise ValueError(f"no session id for {stem!r}")
        if "st" in record:
            user_id, status = record["u"], record["st"]
        elif old is not None:
            user_id, status = old.user_id, old.status
        else:
            user_id, status = None, "active"
        entry = Entry(int(record["t"]), session_id, user_id, status)
        self._entries[stem] = entry
        key = _key(stem, entry)
        bisect.insort(self._order, key)
        group = self._unknown if status is None else self._by_user.setdefault(user_id, [])
        bisect.insort(group, key)

    def _rebuild(self, fd: int) -> None:
        rows = list(self._rebuild_rows())
        with self._mutex:
            self._load(rows, uuid.uuid4().hex)
        self._publish(fd)

    def _publish(self, fd: int) -> None:
        """Replace the snapshot with the state and start an empty log (exclusive lock held)."""
        with self._mutex:
            assert self._gen is not None
            gen = uuid.uuid4().hex
            entries = [[s, *e] for s, e in self._entries.items()]
            data = json.dumps({"v": VERSION, "gen": gen, "entries": entries}, ensure_ascii=False)
            tmp_fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=SNAPSHOT_NAME + ".", suffix=".tmp")
            try:
                with open(tmp_fd, "wb") as f:
                    f.write(data.encode("utf-8", "surrogatepass"))
                os.replace(tmp, self._snapshot)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            header = json.dumps({"v": VERSION, "gen": gen}).encode() + b"\n"
            os.ftruncate(fd, 0)
            os.write(fd, header)
            self._gen, self._offset = gen, len(header)
