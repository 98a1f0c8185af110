"""FileSystemStorage: one human-readable JSON Lines file per session, safe across processes.

Layout of the directory (created on the first write, mode 0700)::

    user-123.jsonl              the history: one ChatMessage.to_json() per line, append-only
    user-123.meta.json          created_at, app-set info (title, user_id, status, metadata),
                                state entries and the real session id
    user-123.usage.log          what appends added to the usage totals: running totals, one
                                JSON line per append that carried usage (the last line counts)
    .user-123.jsonl.*.tmp       a rewrite in progress (save, truncate, pop, meta updates)
    .conversa-index(.log)       the index of sessions find_sessions reads (see _file_index):
                                derived from the files, rebuilt whenever missing or stale

Every write holds ``flock(LOCK_EX)`` on the session's ``.jsonl`` file; reads hold ``LOCK_SH`` only
while they read the bytes. Rewrites replace the file with ``os.replace``, so a writer that waited
for the lock re-checks that its descriptor still is the file at the path.

One append is one ``write()``. When it holds several messages, every line but the last ends with
``" } \\n"`` (JSON allows the spaces): a crash in the middle of a multi-line write leaves either
a last line that is not whole JSON, or one that ends with ``" }"``, ``"} "`` or ``"} \\n"``. Each
marks an append that never returned; it is ignored on load (with a warning) and cut off by the
next write, so an append is all or nothing. A last line that is whole JSON without those marks
but lacks its ``"\\n"`` (a hand edit) is a message like any other; the next append ends it.

Damage (a line that is not a stored message) is reported with CorruptSessionError naming the
file and line by every read (load, tail, count, get_info) and write (append, pop, truncate) of
the session; save (which replaces the whole history), delete and info/state writes go ahead.
Each line is checked once and later only what was appended since (so an append stays O(1)):
each storage object remembers how far it checked, and every write keeps that mark on the file
too (an extended attribute, ``user.conversa.checked``: offset, line count, the file's mtime
and a fingerprint), so a new process counts and appends to a long history without parsing
it. A mark is trusted only while the file's mtime is the one it records, so a hand edit
(which moves the mtime) is checked again; where the file system keeps no user attributes,
each storage object checks the lines itself. A file edited in place since, keeping its size,
ends and mtime, is caught by the next load.
Listings (list_sessions, find_sessions) leave a damaged session out with a warning.
find_sessions reads only the sessions it returns (and those its filters drop), in the order of
the index; list_sessions scans the directory. A session changed behind conversa's back shows
in find_sessions once the index notices (a session it returns disagrees with its files), or
after the index files are deleted.

The usage an append carries (``append(usage=...)``, a model reply's) goes to the usage log under
the same lock: one short write, where a change of the meta file is a rewrite. Each line holds
the totals so far, so a read takes the last whole line (a torn one, from a crash, is skipped and
overwritten) and adds it to the numbers in the meta file (where ``add_usage`` adds). The line is
written just before the messages: a process killed between the two has counted a model call
whose reply it lost (the call did happen), and an append that fails takes its line back. A log
past 64 KiB is replaced by its last line; totals set whole (a copy) remove it.

A rewrite killed mid-way leaves its temp file behind; the first write of each storage object
removes those of every session whose lock no writer holds.

``updated_at`` is the newest mtime of the two files. Each write sets the mtime itself from the
nanosecond clock, because the kernel's file clock is too coarse to order quick writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import (
    CorruptSessionError,
    InvalidMessage,
    InvalidSessionId,
    StorageError,
    UnsupportedStorageURL,
)
from ..messages import ChatMessage
from ._file_index import Entry, SessionIndex
from ._lease import Waiting, file_lease, local_lease
from ._search import matches
from ._stored import (
    RESERVED_FIELD,
    USAGE_KEYS,
    SessionFlow,
    corrupt,
    decode_flow,
    decode_info,
    decode_message,
    decode_messages,
    first_user,
    from_micros,
    merge_reserved,
    to_micros,
)
from ._urls import Durable, durability_option, redact_url, url_durability
from .base import (
    ConversationStorage,
    SearchHit,
    SessionInfo,
    SessionQuery,
    StateEntry,
    drop_state,
    kept,
    live_entries,
    put_info,
    put_reserved,
    put_state,
    validate_session_id,
)

if TYPE_CHECKING:  # imported on the first search: sqlite3 is not needed before
    from ._file_search import Mark, Scan, SearchIndex

__all__ = ["FileSystemStorage", "session_file_stem", "session_id_from_stem"]


HISTORY_SUFFIX = ".jsonl"
META_SUFFIX = ".meta.json"
USAGE_SUFFIX = ".usage.log"
_USAGE_LOG_LIMIT = 1 << 16
"""A usage log longer than this (bytes) is replaced by its last line."""
_USAGE_TAIL = 4096
"""The bytes at the end of a usage log read to find its last line (a line is ~100 bytes)."""
TEMP_SUFFIX = ".tmp"
LEASE_DIR = ".leases"
"""Holds one empty lock file per session ever leased (``STEM.lock``), never removed."""
LEASE_SUFFIX = ".lock"
MAX_STEM_BYTES = 200
"""Longer encoded ids get a shortened, hashed file name (file names stop at 255 bytes)."""
_HASHED_PREFIX_BYTES = 120
_HASH_MARK = "~"  # never left unencoded, so it marks the hashed form unambiguously
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789@+_.-")
_CHUNK = 1 << 20
_TAIL_BLOCK = 1 << 16
"""tail() reads the file backwards in blocks of this many bytes."""

_READ_ONLY = frozenset((errno.EACCES, errno.EPERM, errno.EROFS))
"""Why an index cannot be written in a directory that can still be listed."""

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")


# -- session ids <-> file names -----------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def session_file_stem(session_id: str) -> str:
    """The file name (without suffix) of a session: its id, percent-encoded where unsafe.

    Characters outside ``[A-Za-z0-9@+_.-]`` and a leading ``.`` become ``%XX`` (UTF-8), so no id
    can name a path outside the directory. An encoding longer than 200 bytes is cut and
    suffixed with ``~`` and a hash of the id; the meta file then keeps the real id.
    """
    parts: list[str] = []
    for i, ch in enumerate(session_id):
        if ch in _SAFE and not (i == 0 and ch == "."):
            parts.append(ch)
        else:
            parts.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    stem = "".join(parts)
    if len(stem) <= MAX_STEM_BYTES:
        return stem
    prefix = stem[:_HASHED_PREFIX_BYTES]
    escape = prefix.rfind("%", len(prefix) - 2)
    if escape != -1:  # do not cut a %XX escape in half
        prefix = prefix[:escape]
    digest = hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:40]
    return f"{prefix}{_HASH_MARK}{digest}"


def session_id_from_stem(stem: str) -> str | None:
    """The id a non-hashed file name stands for; None if no valid id maps to exactly it."""
    if _HASH_MARK in stem:
        return None
    try:
        session_id = unquote(stem, errors="strict")
        validate_session_id(session_id)
    except (UnicodeDecodeError, InvalidSessionId):
        return None
    # Only the canonical spelling counts: "a%2db.jsonl" dropped in by hand is not session "a-b".
    return session_id if session_file_stem(session_id) == stem else None


def _temp_file_stem(name: str) -> str | None:
    """The session file stem of a rewrite's temp file ``.STEM.jsonl.XXXX.tmp`` (or of its meta
    or usage log)."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    target, dot, _ = name[1 : -len(TEMP_SUFFIX)].rpartition(".")  # the random part has no "."
    for suffix in (HISTORY_SUFFIX, META_SUFFIX, USAGE_SUFFIX):
        if dot and target.endswith(suffix) and len(target) > len(suffix):
            return target[: -len(suffix)]
    return None


# -- the clock ----------------------------------------------------------------------------

_clock_lock = threading.Lock()
_last_stamp = 0


def _stamp() -> int:
    """Now in nanoseconds, strictly increasing within this process."""
    global _last_stamp
    with _clock_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


def _from_ns(ns: int) -> datetime:
    return from_micros(ns // 1000)


# -- bytes on disk ------------------------------------------------------------------------


def _usage_path(path: str) -> str:
    """The usage log beside the history file ``path``."""
    return path[: -len(HISTORY_SUFFIX)] + USAGE_SUFFIX


def _last_totals(fd: int, size: int, log_path: str) -> tuple[int, dict[str, int]]:
    """Where the last whole line of a usage log ends, and the running totals it holds."""
    start = max(0, size - _USAGE_TAIL)
    data = os.pread(fd, size - start, start)
    end = data.rfind(b"\n") + 1
    begin = data.rfind(b"\n", 0, max(0, end - 1)) + 1
    if end == 0 or (begin == 0 and start > 0):
        if start == 0:
            return 0, {}  # only a first write, torn by a crash
        raise corrupt(f"usage log {log_path}", "its last line is not whole", _FIX_USAGE)
    try:
        totals = json.loads(data[begin:end])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise corrupt(f"usage log {log_path}", f"not valid JSON ({exc})", _FIX_USAGE) from exc
    if not isinstance(totals, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in totals.values()
    ):
        raise corrupt(f"usage log {log_path}", "its last line is not counts", _FIX_USAGE)
    return start + end, totals


_USAGE_KEY_SET = frozenset(USAGE_KEYS)
_FIX_USAGE = "delete the file (the usage totals then count from the session info file)"


class _UsageLog:
    """A session's usage log, open for one write under the session's lock: its running
    totals and where they end. Opening it reads (and so checks) them, so a damaged log
    refuses an append before anything is written."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.line = b""  # the line written, once it is

    def __enter__(self) -> _UsageLog:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self.size = os.fstat(self.fd).st_size
            self.end, self.totals = _last_totals(self.fd, self.size, self.path)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _serialize(messages: Sequence[ChatMessage], *, one_append: bool) -> bytes:
    """The lines of ``messages``; for one append, every line but the last ends " } \\n"."""
    lines = [m.to_json() for m in messages]
    if one_append and len(lines) > 1:
        lines[:-1] = [line[:-1] + " }" for line in lines[:-1]]
    sep = " \n" if one_append else "\n"
    text = sep.join(lines) + "\n" if lines else ""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessage(
            f"a message holds text that is not valid Unicode ({exc.reason}: "
            f"{exc.object[exc.start : exc.end]!r}); decode the text properly before storing it"
        ) from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int, end: int | None = None) -> bytes:
    with open(fd, "rb", closefd=False) as f:
        return f.read() if end is None else f.read(end)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _in_one_append(end: int, byte_at: Callable[[int], int]) -> bool:
    """Whether the line ending at ``end`` ends with "} \\n": a line of an unfinished append."""
    return end >= 3 and byte_at(end - 2) == ord(" ") and byte_at(end - 3) == ord("}")


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


def _complete_end(
    size: int,
    byte_at: Callable[[int], int],
    newline_before: Callable[[int], int],
    read: Callable[[int, int], bytes],
) -> int:
    """The offset just past the last append that was written completely.

    Drops a torn last line and the lines of an unfinished multi-line append before it (see
    the module's docstring). A last line that is whole JSON but lacks its "\\n" (a hand
    edit) is kept: a killed single-message append leaves that only with every byte but the
    "\\n" written, as no proper prefix of a JSON object is whole JSON.
    ``newline_before(end)`` is the offset of the last "\\n" before ``end``, or -1;
    ``read(start, end)`` returns those bytes.
    """
    end = size
    if end and byte_at(end - 1) != ord("\n"):
        start = newline_before(end) + 1
        raw = read(start, end)
        # " }" or "} " without "\\n" is a line inside one append, cut before the rest of it.
        inside = _in_one_append(start, byte_at) or raw.endswith((b" ", b" }"))
        if not inside and _is_json(raw):
            return end
        end = start
    # A line of a multi-line append ends with "} \n"; one like it last means the rest is missing.
    while _in_one_append(end, byte_at):
        end = newline_before(end - 1) + 1
    return end


_MARK_BYTES = 64


def _before(fd: int, offset: int) -> bytes:
    """Up to _MARK_BYTES bytes that end at ``offset``."""
    start = max(0, offset - _MARK_BYTES)
    return os.pread(fd, offset - start, start)


# -- the checked mark kept on the file ------------------------------------------------------

_MARK_XATTR = "user.conversa.checked"
_MARK_FORMAT = struct.Struct("<BQQQ")  # version, mtime ns, offset, lines; then the fingerprint
_MARK_VERSION = 1
_MARK_MAX = _MARK_FORMAT.size + 2 * _MARK_BYTES


def _bytes_mark(data: bytes, lines: int) -> tuple[int, bytes, int]:
    """(offset, fingerprint, lines) of a whole history ``data`` holding ``lines`` messages.

    The offset is the start of an unended last line (it may still grow), else the end.
    """
    offset = len(data)
    if data and not data.endswith(b"\n"):
        offset = data.rfind(b"\n") + 1
        lines -= 1
    return offset, data[:_MARK_BYTES] + data[max(0, offset - _MARK_BYTES) : offset], lines


def _save_mark(fd: int, mtime_ns: int, offset: int, fingerprint: bytes, lines: int) -> None:
    """Keep on the file (an extended attribute) that its lines before ``offset`` are checked.

    A cache: where the file system has no user attributes (or the file is not ours to
    change), nothing is kept and the next storage object checks the lines itself.
    """
    value = _MARK_FORMAT.pack(_MARK_VERSION, mtime_ns, offset, lines) + fingerprint
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no xattrs on this OS
        os.setxattr(fd, _MARK_XATTR, value)


def _drop_mark(fd: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.removexattr(fd, _MARK_XATTR)


def _read_mark(fd: int, st: os.stat_result) -> tuple[int, bytes, int] | None:
    """(offset, fingerprint, lines) kept by ``_save_mark``, if the file has not changed since.

    Valid only while the file's mtime is the one recorded: every conversa write records the
    mark after setting the mtime; any other writer moves the mtime (and a copy that keeps both
    keeps the bytes too). The caller checks the fingerprint as for its own marks.
    """
    try:
        value = os.getxattr(fd, _MARK_XATTR)
    except (OSError, AttributeError):
        return None
    if not _MARK_FORMAT.size <= len(value) <= _MARK_MAX:
        return None
    version, mtime_ns, offset, lines = _MARK_FORMAT.unpack_from(value)
    if version != _MARK_VERSION or mtime_ns != st.st_mtime_ns or offset > st.st_size:
        return None
    return offset, value[_MARK_FORMAT.size :], lines


def _complete_end_of_bytes(data: bytes) -> int:
    return _complete_end(
        len(data),
        data.__getitem__,
        lambda end: data.rfind(b"\n", 0, end),
        lambda start, end: data[start:end],
    )


def _complete_end_of_fd(fd: int, size: int) -> int:
    def byte_at(offset: int) -> int:
        return os.pread(fd, 1, offset)[0]

    def newline_before(end: int) -> int:
        while end > 0:
            start = max(0, end - _CHUNK)
            found = os.pread(fd, end - start, start).rfind(b"\n")
            if found != -1:
                return start + found
            end = start
        return -1

    def read(start: int, end: int) -> bytes:
        return os.pread(fd, end - start, start)

    return _complete_end(size, byte_at, newline_before, read)


_FIX_LINE = "fix or remove that line (or restore the file from a backup) and try again"
_FIX_META = "fix it, or delete it to drop the session's info and state"


def _line_place(path: str, line_no: int | Callable[[], int]) -> Callable[[], str]:
    """Where a damaged line is; its number is counted only when it is needed."""
    return lambda: (
        f"line {line_no if isinstance(line_no, int) else line_no()} of session file {path}"
    )


def _split_lines(data: bytes, path: str) -> tuple[list[str], int]:
    """The complete lines of a history file and the number of bytes of an unfinished append."""
    end = _complete_end_of_bytes(data)
    try:
        text = data[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise corrupt(_line_place(path, line), "not valid UTF-8", _FIX_LINE) from exc
    lines = text.split("\n")  # not splitlines(): U+2028 and friends may sit inside the JSON
    if lines[-1] == "":  # after the final "\n"; not there if a hand edit left that out
        lines.pop()
    return lines, len(data) - end


def _parse_line(line: str | bytes, path: str, line_no: int | Callable[[], int]) -> ChatMessage:
    """One stored message; ``line_no`` (or a function computing it) names the line if damaged."""
    return decode_message(line, _line_place(path, line_no), _FIX_LINE)


def _parse_lines(lines: Sequence[str], path: str) -> list[ChatMessage]:
    return decode_messages(enumerate(lines, 1), lambda n: _line_place(path, n)(), _FIX_LINE)


def _check_lines(fd: int, path: str, start: int, end: int, before: int) -> tuple[int, int]:
    """Parse each line from ``start`` (a line's start) to ``end``; raise for a damaged one.

    ``before`` lines precede ``start``. Returns the number of lines and the offset where the
    last one ends, or where it starts if it lacks its "\\n" (it may still grow).
    """
    lines, offset, resume = 0, start, start
    if start >= end:  # nothing new: the usual case of an append
        return lines, resume
    with open(fd, "rb", closefd=False) as f:
        f.seek(start)
        while offset < end:
            raw = f.readline(end - offset)
            if not raw:  # cannot happen under our lock; do not loop forever if it does
                raise OSError(f"short read at offset {offset}")
            lines += 1
            offset += len(raw)
            if raw.endswith(b"\n"):
                raw = raw[:-1]  # so a JSON error's column is on this line
                resume = offset
            _parse_line(raw, path, before + lines)
    return lines, resume


def _last_lines(fd: int, end: int, n: int) -> list[tuple[int, bytes]]:
    """The last ``n`` lines before ``end`` (which ends a line) with their offsets, read backwards.

    Reads blocks of ``_TAIL_BLOCK`` bytes from ``end`` towards the start of the file, stopping as
    soon as the newline before the ``n``-th last line is among them.
    """
    if n <= 0 or end <= 0:
        return []
    blocks: list[bytes] = []
    start = end
    # A last line without its "\n" (a hand edit) counts as if it had one.
    unended = int(os.pread(fd, 1, end - 1) != b"\n")
    newlines = unended
    # The last byte is the "\n" of the last line; n lines are complete once the newline before
    # the first of them (the (n + 1)-th newline from the end) has been read, or the file began.
    while start > 0 and newlines <= n:
        size = min(_TAIL_BLOCK, start)
        block = os.pread(fd, size, start - size)
        if len(block) != size:  # cannot happen under our lock; do not loop forever if it does
            raise OSError(f"short read at offset {start - size}")
        blocks.append(block)
        newlines += block.count(b"\n")
        start -= size
    data = b"".join(reversed(blocks))
    lines = data[: len(data) - 1 + unended].split(b"\n")
    if start > 0 or len(lines) > n:
        lines = lines[-n:]  # the first one may be cut, or older than wanted
    out: list[tuple[int, bytes]] = []
    offset = end + unended
    for line in reversed(lines):
        offset -= len(line) + 1
        out.append((offset, line))
    out.reverse()
    return out


def _start_of_line(fd: int, end: int, k: int, newlines: int) -> int:
    """The offset where line ``k`` (from 0) starts, in the first ``end`` bytes, which hold
    ``newlines`` newlines (k <= newlines): counted in blocks from the nearer end of the
    file, without splitting the lines it passes."""
    if k <= newlines - k:  # from the start: the offset after the k-th newline
        offset = 0
        while k:
            block = os.pread(fd, min(_TAIL_BLOCK, end - offset), offset)
            if not block:  # cannot happen under our lock; do not loop forever if it does
                raise OSError(f"short read at offset {offset}")
            found = block.count(b"\n")
            if found >= k:
                at = -1
                for _ in range(k):
                    at = block.index(b"\n", at + 1)
                return offset + at + 1
            k -= found
            offset += len(block)
        return 0
    back, stop = newlines - k + 1, end  # from the end: after the back-th newline from there
    while True:
        size = min(_TAIL_BLOCK, stop)
        block = os.pread(fd, size, stop - size)
        if len(block) != size or not size:
            raise OSError(f"short read at offset {stop - size}")
        found = block.count(b"\n")
        if found >= back:
            at = size
            for _ in range(back):
                at = block.rindex(b"\n", 0, at)
            return stop - size + at + 1
        back -= found
        stop -= size


def _line_end_before(fd: int, start: int, end: int) -> int:
    """The offset after the last "\\n" between ``start`` (a line's start) and ``end``."""
    stop = end
    while stop > start:
        size = min(_TAIL_BLOCK, stop - start)
        found = os.pread(fd, size, stop - size).rfind(b"\n")
        if found != -1:
            return stop - size + found + 1
        stop -= size
    return start


def _lines(
    fd: int, start: int, stop: int, chunk_size: int = _CHUNK, *, unended: bool = False
) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes without the "\\n") of each line between ``start`` and ``stop``, which
    start and end lines (with ``unended``, the last may lack its "\\n"); read in chunks of
    ``chunk_size`` bytes, in time linear in the bytes however long a line."""
    offset, line_at, pieces = start, start, list[bytes]()
    while offset < stop:
        chunk = os.pread(fd, min(chunk_size, stop - offset), offset)
        if not chunk:  # cannot happen: these bytes never change; do not loop forever
            raise OSError(f"short read at offset {offset}")
        chunk_at, at = offset, 0
        offset += len(chunk)
        while (nl := chunk.find(b"\n", at)) != -1:
            if pieces:
                pieces.append(chunk[at:nl])
                line, pieces = b"".join(pieces), []
            else:
                line = chunk[at:nl]
            yield line_at, line
            at = nl + 1
            line_at = chunk_at + at
        if at < len(chunk):
            pieces.append(chunk[at:])
    if unended and pieces:
        yield line_at, b"".join(pieces)


def _torn_warning(path: str, size: int) -> str:
    return (
        f"{path}: ignoring the last {size} bytes, an append that was interrupted before it "
        "finished (it never returned); the next write to this session cuts them off"
    )


class _StreamedLines:
    """The lines (numbered from 1) of a history file's first ``end`` bytes, read in chunks.

    Afterwards ``ended`` tells whether the last line ends with "\\n", and if not, ``last`` is
    the offset where it starts.
    """

    def __init__(self, fd: int, end: int) -> None:
        self._fd, self._end = fd, end
        self.last, self.ended = 0, True

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        fd, end = self._fd, self._end
        offset, number, rest = 0, 0, b""
        while offset < end:
            chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
            if not chunk:  # cannot happen: these bytes never change; do not loop forever
                raise OSError(f"short read at offset {offset}")
            offset += len(chunk)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                number += 1
                yield number, line
        if rest:
            self.last, self.ended = end - len(rest), False
            yield number + 1, rest


def _stem_of(path: str) -> str:
    """The file stem of a session's history file."""
    return os.path.basename(path)[: -len(HISTORY_SUFFIX)]


def _agrees(entry: Entry, info: SessionInfo | None) -> bool:
    """Whether a session's files say what its index entry says."""
    return (
        info is not None
        and (info.user_id, info.status) == (entry.user_id, entry.status)
        and to_micros(info.updated_at) == max(entry.stamp // 1000, to_micros(info.created_at))
    )


def _warn_skipped(damaged: Iterable[str]) -> None:
    for error in damaged:
        warnings.warn(f"left out a damaged session: {error}", stacklevel=3)


# -- the backend --------------------------------------------------------------------------


class FileSystemStorage(Durable, ConversationStorage):
    """Sessions as JSON Lines files in a directory. URL: ``file://DIR`` (or a plain path).

    ``durability="crash"`` (default): an append that returned survives the process being killed.
    ``durability="power"``: every write is fsynced too, so it survives a power cut.
    """

    def __init__(
        self, directory: str | os.PathLike[str] = "sessions", *, durability: str = "crash"
    ) -> None:
        self._durability = durability_option(durability)
        self._dir = os.path.abspath(os.path.expanduser(os.fspath(directory)))
        self._fsync = self._durability == "power"
        # path -> ((dev, inode), offset, fingerprint, lines): the lines before `offset`, each
        # checked to be a stored message, so a read or append checks only what is newer.
        self._checked: dict[str, tuple[tuple[int, int], int, bytes, int]] = {}
        self._swept = False
        self._index = SessionIndex(self._dir, self._index_rows, session_id_from_stem)
        self._rebuilds = threading.local()  # .damaged: the listing a rebuild reports to
        self._search_index: SearchIndex | None = None  # opened by the first search
        # (the database opened, the session index's cursor) the last search caught up with
        self._search_cursor: tuple[int, tuple[int, int] | None] = (0, None)

    @classmethod
    def from_url(cls, url: str) -> FileSystemStorage:
        """Open ``file:///abs/dir`` or ``file://relative/dir``; option ``?durability=power``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "file":
            raise UnsupportedStorageURL(
                f"not a file:// URL: {redact_url(url)!r}; use file:///abs/dir or file://rel/dir"
            )
        directory = unquote(parts.netloc + parts.path) or "sessions"
        return cls(directory, durability=url_durability(url))

    @property
    def directory(self) -> str:
        """The absolute path of the session directory."""
        return self._dir

    def __repr__(self) -> str:
        return f"FileSystemStorage({self._dir!r}, durability={self._durability!r})"

    async def close(self) -> None:
        """Close the search index's database, if a search opened it."""
        if self._search_index is not None:
            await asyncio.to_thread(self._search_index.close)

    # -- plumbing -----------------------------------------------------------------------

    def _paths(self, session_id: str) -> tuple[str, str]:
        stem = session_file_stem(session_id)
        return (
            os.path.join(self._dir, stem + HISTORY_SUFFIX),
            os.path.join(self._dir, stem + META_SUFFIX),
        )

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run blocking file work in a thread; OS errors say what to check."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except OSError as exc:
            where = exc.filename or self._dir
            raise StorageError(
                f"file storage could not use {where}: {exc.strerror or exc}. Check that the "
                f"directory {self._dir} is writable by this user and the disk is not full"
            ) from exc

    def _make_dir(self) -> None:
        if os.path.isdir(self._dir):
            return
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        if self._fsync:
            _fsync_dir(os.path.dirname(self._dir))

    @contextlib.contextmanager
    def _locked(self, path: str, *, write: bool, create: bool = False) -> Iterator[int | None]:
        """Hold the session's lock; yields the open file, or None if it does not exist."""
        if write and not self._swept:
            self._swept = True
            self._sweep_temp_files()
        flags = (os.O_RDWR | os.O_APPEND if write else os.O_RDONLY) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        while True:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:
                if not create:
                    yield None
                    return
                self._make_dir()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
                held = os.fstat(fd)
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                # A save or delete may have replaced the file while we waited for its lock.
                if current is not None and (current.st_ino, current.st_dev) == (
                    held.st_ino,
                    held.st_dev,
                ):
                    with self._index.writing() if write else contextlib.nullcontext():
                        yield fd
                    return
            finally:
                os.close(fd)

    def _replace(
        self, path: str, data: bytes, stamp: int, mark: tuple[int, bytes, int] | None = None
    ) -> os.stat_result:
        """Write ``data`` to a temp file beside ``path``, move it over ``path``; its stat.

        ``mark`` (offset, fingerprint, lines) is kept on the new file (see ``_save_mark``).
        Only a holder of the session's lock makes temp files (see _sweep_temp_files).
        """
        fd, tmp = tempfile.mkstemp(
            dir=self._dir, prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX
        )
        try:
            try:
                _write_all(fd, data)
                os.utime(fd, ns=(stamp, stamp))
                if mark is not None:
                    _save_mark(fd, stamp, *mark)
                if self._fsync:
                    os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self._fsync:
            _fsync_dir(self._dir)
        return st

    def _sweep_temp_files(self) -> None:
        """Remove the temp files of rewrites that were killed before they finished.

        A rewrite makes its temp file only while it holds the session's lock, and renames or
        removes it before letting go. So the temp files of a session whose lock is free (or
        whose history file is gone) belong to no live writer; a busy session is left alone.
        """
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return
        stale: dict[str, list[str]] = {}
        for name in names:
            stem = _temp_file_stem(name)
            if stem is not None:
                stale.setdefault(stem + HISTORY_SUFFIX, []).append(name)
        removed = 0
        for history, temps in stale.items():
            with self._if_unlocked(os.path.join(self._dir, history)) as free:
                if free:
                    for name in temps:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self._dir, name))
                            removed += 1
        if removed:
            log.info("%s: removed %d temp files of interrupted rewrites", self._dir, removed)

    @staticmethod
    @contextlib.contextmanager
    def _if_unlocked(path: str) -> Iterator[bool]:
        """Hold this history file's lock if no one does; yields whether no writer can be busy."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield True  # no history file: no lock to hold, so no writer
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = held
            # Replaced meanwhile: the new file's lock is the one that counts; look next time.
            yield (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev)
        finally:
            os.close(fd)

    def _read_meta(self, meta_path: str) -> dict[str, Any] | None:
        try:
            with open(meta_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        place = f"session info file {meta_path}"
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise corrupt(place, f"not valid JSON ({exc})", _FIX_META) from exc
        if not isinstance(meta, dict):
            raise corrupt(place, "it does not hold a JSON object", _FIX_META)
        return meta

    def _write_meta(self, meta_path: str, meta: dict[str, Any], stamp: int) -> None:
        text = json.dumps(meta, ensure_ascii=False, indent=2) + "\n"
        self._replace(meta_path, text.encode("utf-8"), stamp)

    def _ensure_meta(self, session_id: str, meta_path: str, stamp: int) -> None:
        """Give a new session its meta file: created_at, and the id a hashed name hides."""
        if not os.path.exists(meta_path):
            self._write_meta(meta_path, self._new_meta(session_id, stamp), stamp)

    @staticmethod
    def _new_meta(session_id: str, stamp: int) -> dict[str, Any]:
        return {"session_id": session_id, "created_at": _from_ns(stamp).isoformat()}

    # -- history --------------------------------------------------------------------------

    async def _append(
        self, session_id: str, messages: Sequence[ChatMessage], add: dict[str, int]
    ) -> None:
        # One write; the file is never rewritten. A damaged history is refused
        # (CorruptSessionError), like every read but save's. Numbers to ``add`` (the usage
        # totals) go to the usage log under the same lock, just before the messages.
        path, meta_path = self._paths(session_id)
        data = _serialize(messages, one_append=True)
        cut = await self._run(self._append_sync, session_id, path, meta_path, data, add)
        if cut:
            log.warning(
                "%s: cut off the last %d bytes, an append that was interrupted before it "
                "finished (it never returned)",
                path,
                cut,
            )

    def _append_sync(
        self, session_id: str, path: str, meta_path: str, data: bytes, add: Mapping[str, int]
    ) -> int:
        usage = _UsageLog(_usage_path(path)) if add else contextlib.nullcontext()
        with self._locked(path, write=True, create=True) as fd, usage as log:
            assert fd is not None
            st = os.fstat(fd)
            size = st.st_size
            # One read of the last bytes tells whether the file ends cleanly, as it usually does.
            last = _before(fd, size)
            clean = last.endswith(b"\n") and not last.endswith(b"} \n")
            end = size if clean or not size else _complete_end_of_fd(fd, size)
            head = os.pread(fd, _MARK_BYTES, 0)
            lines = self._check(path, fd, st, end, head, last if end == size else None)
            cut = size - end
            if cut:
                os.ftruncate(fd, end)
                last = _before(fd, end)
            # A hand-written last line may lack its "\n": end it first.
            ending = b"\n" if end and not last.endswith(b"\n") else b""
            data = ending + data
            stamp = _stamp()
            self._index.note(_stem_of(path), stamp, session_id)
            if size == 0:
                self._ensure_meta(session_id, meta_path, stamp)
            try:
                if log is not None:  # first: if the process dies before the history is written,
                    self._add_usage(log, add)  # the model call it counts still happened
                if data:
                    _write_all(fd, data)
            except BaseException:
                if log is not None:  # a failed append adds nothing
                    os.ftruncate(log.fd, log.end)
                    if self._fsync:
                        os.fsync(log.fd)
                raise
            os.utime(fd, ns=(stamp, stamp))
            new_end = end + len(data)
            if not head or len(head) < _MARK_BYTES:
                head = os.pread(fd, _MARK_BYTES, 0)
            fingerprint = head + (last + data)[-_MARK_BYTES:]
            lines += data.count(b"\n") - len(ending)
            # on the file too, so the next storage object (a new process) checks nothing old
            _save_mark(fd, stamp, new_end, fingerprint, lines)
            if self._fsync:
                os.fsync(fd)
                if size == 0:
                    _fsync_dir(self._dir)
            self._checked[path] = ((st.st_dev, st.st_ino), new_end, fingerprint, lines)
            if log is not None and log.end + len(log.line) > _USAGE_LOG_LIMIT:
                self._replace(log.path, log.line, stamp)  # the totals so far, alone
            return cut

    def _add_usage(self, log: _UsageLog, add: Mapping[str, int]) -> None:
        """Write the usage log's new running totals (``add`` added) after its last whole line;
        the caller holds the session's lock."""
        log.line = (json.dumps(merge_reserved(log.totals, add, {})) + "\n").encode()
        os.pwrite(log.fd, log.line, log.end)  # over a torn last line, if a crash left one
        if log.size > log.end + len(log.line):
            os.ftruncate(log.fd, log.end + len(log.line))
        if self._fsync:
            os.fsync(log.fd)
            if log.size == 0:
                _fsync_dir(self._dir)

    @staticmethod
    def _read_usage_log(log_path: str) -> dict[str, int]:
        """The running totals of a usage log ({} if there is none); the caller holds a lock."""
        try:
            fd = os.open(log_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        try:
            return _last_totals(fd, os.fstat(fd).st_size, log_path)[1]
        finally:
            os.close(fd)

    def _check(
        self,
        path: str,
        fd: int,
        st: os.stat_result,
        end: int,
        head: bytes | None = None,
        last: bytes | None = None,
    ) -> int:
        """The number of messages before ``end``, each line checked once.

        Raises CorruptSessionError for a damaged line (as load does), so a damaged session
        answers no read and takes no append. Files are only appended to or replaced whole,
        so the check resumes where this object last checked the same file, or else where the
        mark kept on the file says the last conversa write left it checked (``_read_mark``:
        so a new process does not parse a long history to count it). A replaced or
        recreated file has another inode (without the mark), or (if the inode is reused)
        other bytes at its start or before the remembered offset, since every message has a
        unique id; any mismatch means a check from the start. ``head`` and ``last`` are the
        first bytes and the bytes before ``end`` when the caller has read them already.
        """
        if head is None:
            head = os.pread(fd, _MARK_BYTES, 0)
        start, before = 0, 0
        mark = self._checked.get(path)
        kept = None
        if mark is None or mark[0] != (st.st_dev, st.st_ino) or mark[1] > end:
            kept = _read_mark(fd, st)
            mark = None if kept is None else ((st.st_dev, st.st_ino), *kept)
        if mark is not None and mark[1] <= end:
            known = last if mark[1] == end and last is not None else _before(fd, mark[1])
            if head + known[-_MARK_BYTES:] == mark[2]:
                start, before = mark[1], mark[3]
                if kept is not None:
                    self._checked[path] = mark
        lines, resume = _check_lines(fd, path, start, end, before)
        if resume != start:
            known = last if resume == end and last is not None else _before(fd, resume)
            # A last line without its "\\n" is checked again next time: it may still grow.
            ended = before + lines - (resume < end)
            self._remember(path, st, resume, head + known[-_MARK_BYTES:], ended, fd)
        return before + lines

    def _remember(
        self,
        path: str,
        st: os.stat_result,
        offset: int,
        fingerprint: bytes,
        lines: int,
        fd: int | None = None,
    ) -> None:
        """Remember the lines checked; on the file too if ``fd`` is given (the lock is held)."""
        self._checked[path] = ((st.st_dev, st.st_ino), offset, fingerprint, lines)
        if fd is not None:
            _save_mark(fd, st.st_mtime_ns, offset, fingerprint, lines)

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Replace the whole history atomically (temp file + rename), damaged or not."""
        path, meta_path = self._paths(session_id)
        data = _serialize(history, one_append=False)
        await self._run(self._save_sync, session_id, path, meta_path, data, len(history))

    def _save_sync(
        self, session_id: str, path: str, meta_path: str, data: bytes, lines: int
    ) -> None:
        with self._locked(path, write=True, create=True):
            stamp = _stamp()
            self._index.note(_stem_of(path), stamp, session_id)
            self._ensure_meta(session_id, meta_path, stamp)
            # Last: once replaced, other writers lock the new file, not the one we hold.
            mark = _bytes_mark(data, lines)
            st = self._replace(path, data, stamp, mark)
            self._remember(path, st, *mark)

    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history; an unfinished last append is ignored with a warning."""
        path, _ = self._paths(session_id)
        messages, torn = await self._run(self._load_sync, path)
        if torn:
            warnings.warn(_torn_warning(path, torn), stacklevel=2)
        return messages

    def _load_sync(self, path: str) -> tuple[list[ChatMessage], int]:
        with self._locked(path, write=False) as fd:
            if fd is None:
                return [], 0
            st = os.fstat(fd)
            end = _complete_end_of_fd(fd, st.st_size)
            # The bytes before `end` never change: files are appended to or replaced whole.
            # So they are parsed after the lock is let go, read in chunks: a load holds
            # the messages and one chunk, never the whole file beside them.
            own = os.dup(fd)
        try:
            lines = _StreamedLines(own, end)
            try:
                messages = decode_messages(lines, lambda n: _line_place(path, n)(), _FIX_LINE)
            except CorruptSessionError:
                self._checked.pop(path, None)  # damaged in place: every read must find it
                _drop_mark(own)
                raise
            # An unended last line (a hand edit) is checked again next time: it may grow.
            resume, checked = end, len(messages)
            if not lines.ended:
                resume, checked = lines.last, checked - 1
            fingerprint = os.pread(own, _MARK_BYTES, 0) + _before(own, resume)
            # ``own`` shares the open file, and so the shared lock, of ``fd``: still held
            self._remember(path, st, resume, fingerprint, checked, own)
        finally:
            os.close(own)
        return messages, st.st_size - end

    def _parse_all(
        self, data: bytes, path: str, fd: int
    ) -> tuple[list[ChatMessage], list[str], int]:
        """The messages and lines of a whole history file, and the bytes of a torn end."""
        try:
            lines, torn = _split_lines(data, path)
            return _parse_lines(lines, path), lines, torn
        except CorruptSessionError:
            # Damaged in place after it was checked: every read must find it again.
            self._checked.pop(path, None)
            _drop_mark(fd)
            raise

    async def delete(self, session_id: str) -> None:
        """Remove the history and meta files; a no-op for an unknown session."""
        path, meta_path = self._paths(session_id)
        await self._run(self._delete_sync, path, meta_path)

    def _delete_sync(self, path: str, meta_path: str) -> None:
        with self._locked(path, write=True) as fd:
            # Meta first: an interrupted delete leaves history without info, never the reverse.
            for gone in (meta_path, _usage_path(path)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(gone)
            if fd is not None:
                os.unlink(path)
                self._index.note_deleted(_stem_of(path))
        if self._fsync and os.path.isdir(self._dir):
            _fsync_dir(self._dir)

    async def exists(self, session_id: str) -> bool:
        """Whether the session's history file exists (every write creates it)."""
        path, _ = self._paths(session_id)
        return await self._run(os.path.exists, path)

    async def _count(self, session_id: str) -> int:
        # A damaged history raises, as load does. Each line is parsed once by this object;
        # later counts read only what was appended.
        path, _ = self._paths(session_id)
        return await self._run(self._count_sync, path)

    def _count_sync(self, path: str) -> int:
        with self._locked(path, write=False) as fd:
            if fd is None:
                return 0
            st = os.fstat(fd)
            return self._check(path, fd, st, _complete_end_of_fd(fd, st.st_size))

    @staticmethod
    def _count_lines(fd: int, end: int) -> int:
        """The number of lines before ``end``."""
        lines, offset = 0, 0
        while offset < end:
            chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
            if not chunk:
                break
            lines += chunk.count(b"\n")
            offset += len(chunk)
        return lines

    async def _tail(self, session_id: str, n: int) -> list[ChatMessage]:
        return await self._span(session_id, lambda count: (max(0, count - n), count))

    async def _read(self, session_id: str, offset: int, limit: int | None) -> list[ChatMessage]:
        def span(count: int) -> tuple[int, int]:
            return offset, count if limit is None else min(count, offset + limit)

        return await self._span(session_id, span)

    async def _span(
        self, session_id: str, span: Callable[[int], tuple[int, int]]
    ) -> list[ChatMessage]:
        """The messages at the positions ``span(count)`` names (start, stop), reading only the
        part of the file between them and its nearer end once the file has been checked (see
        _count); a damaged history raises and an unfinished last append is ignored with a
        warning, as load does."""
        path, _ = self._paths(session_id)
        messages, torn = await self._run(self._span_sync, path, span)
        if torn:
            warnings.warn(_torn_warning(path, torn), stacklevel=3)
        return messages

    def _span_sync(
        self, path: str, span: Callable[[int], tuple[int, int]]
    ) -> tuple[list[ChatMessage], int]:
        with self._locked(path, write=False) as fd:
            if fd is None:
                return [], 0
            st = os.fstat(fd)
            end = _complete_end_of_fd(fd, st.st_size)
            count = self._check(path, fd, st, end)
            start, stop = span(count)
            if start >= stop:
                lines: Iterable[tuple[int, bytes]] = ()
            elif stop == count and count - start <= start:  # the newest: read backwards
                lines = _last_lines(fd, end, count - start)
            else:  # from the page's first line on, found from the nearer end
                newlines = count - (os.pread(fd, 1, end - 1) != b"\n")
                first = _start_of_line(fd, end, start, newlines)
                page = _lines(fd, first, end, _TAIL_BLOCK, unended=True)
                lines = itertools.islice(page, stop - start)
            messages: list[ChatMessage] = []
            for offset, raw in lines:
                # Line numbers are counted only for a damaged line: it costs a read of the file.
                line_no = functools.partial(self._line_no, fd, offset)
                messages.append(_parse_line(raw, path, line_no))
            return messages, st.st_size - end

    @classmethod
    def _line_no(cls, fd: int, offset: int) -> int:
        """The number (from 1) of the line that starts at ``offset``."""
        return cls._count_lines(fd, offset) + 1

    async def _cut(self, session_id: str, n: int, *, pop: bool) -> list[ChatMessage]:
        # an atomic rewrite
        path, _ = self._paths(session_id)
        return await self._run(self._cut_sync, path, n, pop)

    def _cut_sync(self, path: str, n: int, pop: bool) -> list[ChatMessage]:
        """Rewrite the history without its newest lines, as ``_cut`` says; the popped ones."""
        with self._locked(path, write=True) as fd:
            if fd is None:
                return []
            data = _read_all(fd)
            # a damaged file is never rewritten
            messages, lines, _ = self._parse_all(data, path, fd)
            keep = kept(len(lines), n, pop=pop)
            if keep >= len(lines):
                return []
            # Trailing spaces mark lines inside one append; a kept last line must not have one.
            rest = "".join(line.rstrip(" ") + "\n" for line in lines[:keep]).encode("utf-8")
            stamp = _stamp()
            self._index.note(_stem_of(path), stamp)
            mark = _bytes_mark(rest, keep)
            st = self._replace(path, rest, stamp, mark)
            self._remember(path, st, *mark)
            return messages[keep:] if pop else []

    # -- listing --------------------------------------------------------------------------

    def _scan(self, damaged: list[str]) -> list[tuple[int, str, str]]:
        """(updated ns, session id, stem) of every session, newest first.

        A session whose id cannot be read is left out and its error added to ``damaged``.
        """
        try:
            with os.scandir(self._dir) as it:
                entries = list(it)
        except FileNotFoundError:
            return []
        names = {e.name for e in entries}
        rows: list[tuple[int, str, str]] = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.endswith(HISTORY_SUFFIX):
                continue
            stem = name[: -len(HISTORY_SUFFIX)]
            try:
                updated = entry.stat().st_mtime_ns
                meta_name = stem + META_SUFFIX
                if meta_name in names:
                    meta_path = os.path.join(self._dir, meta_name)
                    updated = max(updated, os.stat(meta_path).st_mtime_ns)
                session_id = self._id_of(stem, entry.path)
            except FileNotFoundError:  # deleted while we looked
                continue
            except CorruptSessionError as exc:
                damaged.append(str(exc))
                continue
            if session_id is not None:
                rows.append((updated, session_id, stem))
        rows.sort(key=lambda r: (-r[0], r[2]))
        return rows

    def _id_of(self, stem: str, path: str) -> str | None:
        session_id = session_id_from_stem(stem)
        if session_id is not None or _HASH_MARK not in stem:
            return session_id
        meta = self._read_meta(os.path.join(self._dir, stem + META_SUFFIX)) or {}
        session_id = meta.get("session_id")
        if isinstance(session_id, str) and session_file_stem(session_id) == stem:
            return session_id
        if os.path.getsize(path):
            log.warning(
                "%s: skipped; its meta file %s%s, which holds the session id this shortened "
                "name stands for, is missing or wrong",
                path,
                stem,
                META_SUFFIX,
            )
        return None

    async def list_sessions(self) -> list[str]:
        """Session ids, most recently updated first (ties by file name).

        A session whose id is unreadable (a damaged meta file of a shortened name) is left
        out with a warning naming the file.
        """
        damaged: list[str] = []
        rows = await self._run(self._scan, damaged)
        _warn_skipped(damaged)
        return [sid for _, sid, _ in rows]

    # -- session info ---------------------------------------------------------------------

    async def _get_info(self, session_id: str) -> SessionInfo | None:
        # from the meta file and a line count
        path, meta_path = self._paths(session_id)
        return await self._run(self._info_sync, session_id, path, meta_path, None)

    def _info_sync(
        self, session_id: str, path: str, meta_path: str, query: SessionQuery | None
    ) -> SessionInfo | None:
        with self._locked(path, write=False) as fd:
            if fd is None:
                return None
            meta = self._read_meta(meta_path) or {}
            st = os.fstat(fd)
            end = _complete_end_of_fd(fd, st.st_size)
            updated_ns = st.st_mtime_ns
            with contextlib.suppress(FileNotFoundError):
                updated_ns = max(updated_ns, os.stat(meta_path).st_mtime_ns)
            if query is not None and not query.matches_fields(
                meta.get("user_id"), meta.get("status") or "active"
            ):
                return None
            logged = self._read_usage_log(_usage_path(path))
            reserved = meta.get(RESERVED_FIELD)
            if logged and (reserved is None or isinstance(reserved, dict)):
                meta[RESERVED_FIELD] = merge_reserved(reserved or {}, logged, {})
            title = meta.get("title")
            created = self._created_at(meta, meta_path)
            first_created, first_title = (None, None)
            if created is None or not title:
                first_created, first_title = self._head(fd, path, end, want_title=not title)
            created = created or first_created or _from_ns(updated_ns)
            info = decode_info(
                session_id,
                meta,
                created_at=created,
                updated_at=max(_from_ns(updated_ns), created),
                message_count=self._check(path, fd, st, end),
                default_title=first_title,
                where=f"session info file {meta_path}",
            )
        return None if query is not None and not query.matches(info) else info

    @staticmethod
    def _created_at(meta: Mapping[str, Any], meta_path: str) -> datetime | None:
        raw = meta.get("created_at")
        if raw is None:
            return None
        try:
            created = datetime.fromisoformat(raw) if isinstance(raw, str) else None
        except ValueError:
            created = None
        if created is None:
            raise corrupt(
                f"created_at in session info file {meta_path}",
                f"{raw!r} is not an ISO 8601 time",
                "fix it or remove the key",
            )
        return created if created.tzinfo else created.replace(tzinfo=UTC)

    @staticmethod
    def _head(
        fd: int, path: str, end: int, *, want_title: bool
    ) -> tuple[datetime | None, str | None]:
        """The first message's time and the default title, reading lines only until found."""
        first: datetime | None = None
        offset = 0
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            for line_no, line in enumerate(f, 1):
                offset += len(line)
                if offset > end:
                    break  # an unfinished append
                message = _parse_line(line, path, line_no)
                if first is None:
                    first = message.created_at
                    if not want_title:
                        break
                if message.role == "user":
                    found = first_user([message])
                    return first, found[1] if found else None
        return first, None

    async def _update_info(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        path, meta_path = self._paths(session_id)
        change = functools.partial(put_info, fields=fields)
        await self._run(self._change_meta_sync, session_id, path, meta_path, change, True)
        info = await self._run(self._info_sync, session_id, path, meta_path, None)
        assert info is not None
        return info

    async def _change_reserved(
        self, session_id: str, add: dict[str, int], put: dict[str, Any]
    ) -> None:
        # the reserved info lives in the meta file, beside the app-set info (and the usage
        # log, which totals set whole replace)
        path, meta_path = self._paths(session_id)
        change = functools.partial(put_reserved, add=add, put=put)
        drop_log = not _USAGE_KEY_SET.isdisjoint(put)
        await self._run(self._change_meta_sync, session_id, path, meta_path, change, True, drop_log)

    def _change_meta_sync(
        self,
        session_id: str,
        path: str,
        meta_path: str,
        change: Callable[[dict[str, Any]], bool],
        create: bool,
        drop_usage_log: bool = False,
    ) -> None:
        """Read-modify-write the meta file under the session's lock (then removing the usage
        log if ``drop_usage_log``: usage totals set whole replace what it holds)."""
        with self._locked(path, write=True, create=create) as fd:
            if fd is None:
                return
            stamp = _stamp()
            meta = self._read_meta(meta_path)
            if meta is None:
                meta = self._new_meta(session_id, stamp)
                size = os.fstat(fd).st_size
                if size:  # a history written without us (by hand): it began with its first line
                    first, _ = self._head(fd, path, _complete_end_of_fd(fd, size), want_title=False)
                    if first is not None:
                        meta["created_at"] = first.isoformat()
            if change(meta):
                meta["session_id"] = session_id
                info = (meta.get("user_id"), meta.get("status") or "active")
                self._index.note(_stem_of(path), stamp, session_id, info)
                self._write_meta(meta_path, meta, stamp)
            if drop_usage_log:  # after: a meta write that fails leaves both as they were
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_usage_path(path))

    async def _find(self, query: SessionQuery) -> list[SessionInfo]:
        # A damaged session (its meta file or a history line) is left out with a warning
        # naming the file, so one cannot hide the others; get_info and load raise for it.
        damaged: list[str] = []
        found = await self._run(self._find_sync, query, damaged)
        _warn_skipped(damaged)
        return found

    def _find_sync(self, query: SessionQuery, damaged: list[str]) -> list[SessionInfo]:
        # From the index, newest first: only the sessions returned (and those the filters
        # drop) are read. A session whose files disagree with the index, with no write since
        # to explain it, means the index is stale: rebuilt from the files, then asked again.
        if not os.path.isdir(self._dir):
            return []
        self._rebuilds.damaged = damaged
        try:
            for check in (True, True, False):
                found = self._find_indexed(query, damaged, check=check)
                if found is not None:
                    return found
                self._index.rebuild()
            raise AssertionError("unreachable")  # pragma: no cover
        except OSError as exc:
            if exc.errno not in _READ_ONLY:
                raise
            return self._find_scanned(query, damaged)  # a directory we may only read: no index
        finally:
            self._rebuilds.damaged = None

    def _find_scanned(self, query: SessionQuery, damaged: list[str]) -> list[SessionInfo]:
        """The infos ``query`` matches, reading every session's files."""
        found: list[SessionInfo] = []
        for _, session_id, stem in self._scan(damaged):
            if len(found) == query.limit:
                break
            path = os.path.join(self._dir, stem + HISTORY_SUFFIX)
            meta_path = os.path.join(self._dir, stem + META_SUFFIX)
            try:
                info = self._info_sync(session_id, path, meta_path, query)
            except CorruptSessionError as exc:
                damaged.append(str(exc))
                continue
            if info is not None:
                found.append(info)
        return found

    def _find_indexed(
        self, query: SessionQuery, damaged: list[str], *, check: bool
    ) -> list[SessionInfo] | None:
        """The infos ``query`` matches, from the index; None if the index is stale."""
        # updated_before is checked on each session read: a damaged one is reported whatever
        # its time, as every listing does
        rows = self._index.rows(query.user_id, any_user=query.user_id is None)
        found: list[SessionInfo] = []
        for stem, entry in rows:
            if len(found) == query.limit:
                break
            if None not in (entry.status, query.status) and entry.status != query.status:
                continue
            path = os.path.join(self._dir, stem + HISTORY_SUFFIX)
            meta_path = os.path.join(self._dir, stem + META_SUFFIX)
            try:
                info = self._info_sync(entry.session_id, path, meta_path, None)
            except CorruptSessionError as exc:
                damaged.append(str(exc))
                continue
            if check and not _agrees(entry, info) and self._index.current(stem) == entry:
                return None
            if info is not None and query.matches(info):
                found.append(info)
        return found

    def _index_rows(self) -> list[tuple[str, Entry]]:
        """What the index holds, read from the session files (to build it)."""
        damaged: list[str] = []
        rows: list[tuple[str, Entry]] = []
        for updated, session_id, stem in self._scan(damaged):
            try:
                meta = self._read_meta(os.path.join(self._dir, stem + META_SUFFIX)) or {}
                user_id, status = meta.get("user_id"), meta.get("status") or "active"
            except CorruptSessionError:  # reported by the listing that reads it
                user_id, status = None, None
            rows.append((stem, Entry(updated, session_id, user_id, status)))
        listing = getattr(self._rebuilds, "damaged", None)
        if listing is not None:
            listing.extend(d for d in damaged if d not in listing)
        return rows

    # -- search -------------------------------------------------------------------------

    async def _search(self, terms: list[str], limit: int | None) -> list[SearchHit]:
        """Matches through the search index beside the files (see _file_search).

        Only the sessions written since the last search are read to index them (and of
        those, only what was appended), and only the matching lines are read back. Hits come
        newest session first (the session index's order), then in order; a damaged line that
        the index points at raises CorruptSessionError, as load does. A directory this user
        may only read, or an SQLite without FTS5, gets the scanning search of
        ConversationStorage.
        """
        hits = await self._run(self._search_sync, terms, limit)
        return await super()._search(terms, limit) if hits is None else hits

    def _search_sync(self, terms: list[str], limit: int | None) -> list[SearchHit] | None:
        if not os.path.isdir(self._dir):
            return []
        try:
            index = self._search_index or self._open_search_index()
            if index is None:
                return None
            # the sessions the session index saw written since the last search (or all)
            opened, cursor = self._search_cursor
            self._search_cursor = (index.opened(), None)
            cursor, changed = self._index.changed_since(cursor)
            if opened != self._search_cursor[0]:
                changed = None  # a new database (the first search, or it was deleted)
            if changed is None:
                index.catch_up_all((stem, entry.stamp) for stem, entry in self._index.rows())
            else:
                stamps = ((stem, self._index.entry(stem)) for stem in dict.fromkeys(changed))
                index.catch_up((stem, None if e is None else e.stamp) for stem, e in stamps)
            self._search_cursor = (self._search_cursor[0], cursor)  # caught up: remember
        except OSError as exc:
            if exc.errno not in _READ_ONLY:
                raise
            return None

        def order(stem: str) -> tuple[int, str] | None:
            entry = self._index.entry(stem)
            return None if entry is None else (-entry.stamp, stem)

        walk = (stem for stem, _ in self._index.rows())
        hits: list[SearchHit] = []
        for stem, mark, lines in index.candidates(terms, order, walk):
            entry = self._index.entry(stem)
            if entry is None:
                continue  # deleted since
            for position, message in self._indexed_hits(index, terms, stem, mark, lines):
                hits.append(SearchHit(entry.session_id, position, message))
                if len(hits) == limit:
                    return hits
        return hits

    def _open_search_index(self) -> SearchIndex | None:
        """The search index, or None where it cannot be kept (read-only, no FTS5)."""
        from ._file_search import SearchIndex

        if not os.access(self._dir, os.W_OK) or not SearchIndex.available():
            return None
        self._search_index = SearchIndex(self._dir, self._index_scan)
        return self._search_index

    def _indexed_hits(
        self,
        index: SearchIndex,
        terms: list[str],
        stem: str,
        mark: Mark,
        lines: list[tuple[int, int, int]],
    ) -> list[tuple[int, ChatMessage]]:
        """(position, message) of the candidate ``lines`` of one session that match.

        A file that is no longer the one indexed (a write since the catch-up) is indexed
        again and asked again; after three tries the session is loaded and scanned.
        """
        path = os.path.join(self._dir, stem + HISTORY_SUFFIX)
        for _ in range(3):
            found = self._read_lines(path, mark, lines)
            if found is not None:
                return [(n, m) for n, m in found if matches(terms, m.text)]
            index.reindex(stem)
            current = index.current(stem)
            if current is None:
                return []
            num, mark = current
            lines = index.session_candidates(terms, num)
        messages, _ = self._load_sync(path)
        return [(n, m) for n, m in enumerate(messages) if matches(terms, m.text)]

    def _read_lines(
        self, path: str, mark: Mark, lines: list[tuple[int, int, int]]
    ) -> list[tuple[int, ChatMessage]] | None:
        """The messages at ``lines`` (number, offset, length); None if the file changed."""
        with self._locked(path, write=False) as fd:
            if fd is None:
                return None
            if not self._is_marked(fd, os.fstat(fd), mark):
                return None
            out: list[tuple[int, ChatMessage]] = []
            for number, offset, length in lines:
                if offset + length >= mark.offset:  # not what was indexed: cannot happen
                    return None
                raw = os.pread(fd, length, offset)
                out.append((number, _parse_line(raw, path, number + 1)))
            return out

    @staticmethod
    def _is_marked(fd: int, st: os.stat_result, mark: Mark) -> bool:
        """Whether the file open at ``fd`` still holds the lines ``mark`` was taken of."""
        if (st.st_dev, st.st_ino) != (mark.dev, mark.ino) or mark.offset > st.st_size:
            return False
        known = os.pread(fd, _MARK_BYTES, 0) + _before(fd, mark.offset)
        return known == mark.fingerprint

    @contextlib.contextmanager
    def _index_scan(self, stem: str, mark: Mark | None) -> Iterator[Scan | None]:
        """The lines of session ``stem`` after ``mark`` (all if it no longer applies), read
        under the session's shared lock; None if the session is gone."""
        from ._file_search import Scan  # loaded by the search that calls this

        path = os.path.join(self._dir, stem + HISTORY_SUFFIX)
        with self._locked(path, write=False) as fd:
            if fd is None:
                yield None
                return
            st = os.fstat(fd)
            end = _complete_end_of_fd(fd, st.st_size)
            start, first = 0, 0
            if mark is not None and mark.offset <= end and self._is_marked(fd, st, mark):
                start, first = mark.offset, mark.lines
            stop = _line_end_before(fd, start, end)
            fingerprint = os.pread(fd, _MARK_BYTES, 0) + _before(fd, stop)
            yield Scan(
                st.st_dev, st.st_ino, start > 0, first, stop, fingerprint, _lines(fd, start, stop)
            )

    # -- session state --------------------------------------------------------------------

    async def _state_entries(self, session_id: str) -> dict[str, StateEntry]:
        _, meta_path = self._paths(session_id)
        meta = await self._run(self._read_meta, meta_path) or {}
        return live_entries(meta.get("state") or {})

    async def _state_and_flow(self, session_id: str) -> tuple[dict[str, StateEntry], SessionFlow]:
        # both live in the meta file: one read
        _, meta_path = self._paths(session_id)
        meta = await self._run(self._read_meta, meta_path) or {}
        flow = decode_flow(session_id, meta.get(RESERVED_FIELD), f"session info file {meta_path}")
        return live_entries(meta.get("state") or {}), flow

    async def _set_state(self, session_id: str, entries: dict[str, dict[str, Any]]) -> None:
        path, meta_path = self._paths(session_id)
        change = functools.partial(put_state, entries=entries)
        await self._run(self._change_meta_sync, session_id, path, meta_path, change, True)

    async def _drop_state(self, session_id: str, keys: Collection[str] | None) -> None:
        path, meta_path = self._paths(session_id)
        change = functools.partial(drop_state, keys=keys)
        await self._run(self._change_meta_sync, session_id, path, meta_path, change, False)

    async def _set_times(self, session_id: str, created_at: datetime, updated_at: datetime) -> None:
        # created_at in the meta file, updated_at as the mtime of both files
        path, meta_path = self._paths(session_id)
        stamp = to_micros(updated_at) * 1000
        await self._run(self._set_times_sync, session_id, path, meta_path, created_at, stamp)

    def _set_times_sync(
        self, session_id: str, path: str, meta_path: str, created: datetime, stamp: int
    ) -> None:
        with self._locked(path, write=True) as fd:
            if fd is None:
                return
            meta = self._read_meta(meta_path) or self._new_meta(session_id, stamp)
            meta["created_at"] = created.astimezone(UTC).isoformat()
            self._index.note(_stem_of(path), stamp, session_id)
            self._write_meta(meta_path, meta, stamp)
            os.utime(fd, ns=(stamp, stamp))

    # -- the session lease ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease(self, waiting: Waiting, ttl: float | None) -> AsyncIterator[None]:
        # an OS file lock on .leases/STEM.lock: the kernel releases it when the holder dies
        stem = session_file_stem(waiting.session_id)
        path = os.path.join(self._dir, LEASE_DIR, stem + LEASE_SUFFIX)
        async with local_lease(self, waiting), file_lease(path, waiting):
            yield
