"""Appending one message costs the same at 10 and at 10,000 stored messages.

Shown without timing: by counting the work an append does, which must not depend on the
history's length (bytes of file I/O for the file backend, SQLite VM instructions for SQLite).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conversa import ChatMessage
from conversa.storage.filesystem import FileSystemStorage
from conversa.storage.sqlite import SqliteStorage


def _history(n: int) -> list[ChatMessage]:
    return [ChatMessage.user(f"message {i} " + "x" * 200) for i in range(n)]


def _io_bytes() -> int:
    """Bytes this process has read and written through system calls so far (Linux)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


async def test_file_append_does_the_same_io_at_any_length(tmp_path: Path) -> None:
    store = FileSystemStorage(tmp_path)
    costs = []
    for sid, n in (("short", 10), ("long", 10_000)):
        await store.save(sid, _history(n))
        await store.append(sid, [ChatMessage.user("warm-up")])
        message = ChatMessage.user("the same message", id=f"id-{sid}-0000")
        before = _io_bytes()
        await store.append(sid, [message])
        costs.append(_io_bytes() - before)
    short, long = costs
    assert long <= short + 64, f"append read/wrote {long} bytes at 10,000 vs {short} at 10"
    assert long < 10_000  # a few hundred bytes: the line itself, not the 2 MB file


async def test_sqlite_append_runs_the_same_instructions_at_any_length(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "s.db")
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    costs = []
    for sid, n in (("short", 10), ("long", 10_000)):
        await store.save(sid, _history(n))
        await store.append(sid, [ChatMessage.user("warm-up")])
        message = ChatMessage.user("the same message", id=f"id-{sid}-0000")

        def watch(conn: sqlite3.Connection) -> None:
            conn.set_progress_handler(count, 1)

        def unwatch(conn: sqlite3.Connection) -> None:
            conn.set_progress_handler(None, 1)

        await store._run(watch)
        steps[0] = 0
        await store.append(sid, [message])
        await store._run(unwatch)
        costs.append(steps[0])
    await store.close()
    short, long = costs
    assert short > 0 and long <= short * 1.1 + 10, f"{long} VM steps at 10,000 vs {short} at 10"
