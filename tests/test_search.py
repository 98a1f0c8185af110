"""Search indexes: kept current in small batches, migrated from older schemas, bounded by the limit.

The matching rule itself is checked on every backend by the conformance suite
(test_search_matches_words_and_prefixes); these tests look at the indexes behind it.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _services import run_children

from conversa import ChatMessage
from conversa.storage import _sqlite_migrations as migrations
from conversa.storage import sqlite as sqlite_module
from conversa.storage._search import index_text, matches, query_terms, words
from conversa.storage.sqlite import SqliteStorage


def _user(text: str) -> ChatMessage:
    return ChatMessage.user(text)


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _counts(path: Path) -> tuple[int, int]:
    """(messages, indexed rows)."""
    with _raw(path) as conn:
        messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        indexed = conn.execute(f"SELECT count(*) FROM {migrations.FTS_TABLE}").fetchone()[0]
    return int(messages), int(indexed)


async def _trace(store: SqliteStorage, fn: Callable[[str], Any] | None) -> None:
    await store._run(lambda conn: conn.set_trace_callback(fn))


# -- the shared rule ------------------------------------------------------------------------


def test_words_fold_case_and_accents_and_split_on_non_letters() -> None:
    assert words("Crème BRÛLÉE, foo_bar-baz 東京タワー x2") == [
        "creme",
        "brulee",
        "foo",
        "bar",
        "baz",
        "東京タワー",
        "x2",
    ]
    ascii_text = "".join(f"{chr(c)}a{c}" for c in range(128))
    assert words(ascii_text) == re.findall(r"[^\W_]+", ascii_text.lower())  # the fast path
    assert words("한국어") == ["한국어"]  # Hangul is recomposed after the accents go
    assert query_terms("a A a b") == ["a", "b"]
    assert index_text("b a b A") == "b a"
    assert matches(["depl"], "Deployment done") and not matches(["ploy"], "deployment")


def test_index_text_is_bounded() -> None:
    text = " ".join(f"w{i}" for i in range(100_000))
    out = index_text(text)
    assert 0 < len(out) <= 256 * 1024 and text.startswith(out)


# -- SQLite: the index is kept current in small batches ---------------------------------------


def _pending(path: Path) -> int:
    """Message rows above the highest indexed id: what the next search would index."""
    with _raw(path) as conn:
        upto = conn.execute(migrations.INDEXED_UPTO_SQL).fetchone()
        sql = "SELECT count(*) FROM messages WHERE id > ?"
        return int(conn.execute(sql, (upto[0] if upto else 0,)).fetchone()[0])


async def test_sqlite_search_after_any_writes_indexes_less_than_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes index in batches of INDEX_BATCH rows; a search indexes only the remainder."""
    batch = 8
    monkeypatch.setattr(sqlite_module, "INDEX_BATCH", batch)
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        writes: list[Callable[[int], Any]] = [
            lambda i: store.append(f"s{i % 3}", [_user(f"word n{i}")]),
            lambda i: store.append(f"s{i % 3}", [_user(f"word a{i}"), _user(f"b{i} word")]),
            lambda i: store.save(f"t{i % 2}", [_user(f"word t{i}")] * (i % 13)),
            lambda i: store.pop(f"s{i % 3}"),
            lambda i: store.delete("t1"),
        ]
        most = 0
        for i in range(120):
            await writes[i % len(writes) if i % 7 else 0](i)
            pending = _pending(path)
            most = max(most, pending)
            assert pending < batch, (i, pending)
            if i % 10 == 9:  # every hit is found, and the search indexed just the remainder
                messages = _counts(path)[0]
                found = await store.search("word", limit=None)
                assert len(found) == messages and _pending(path) == 0
        assert most > 0  # appends do leave rows for a batch or a search to index
        statements: list[str] = []
        await _trace(store, statements.append)
        await store.search("word")
        await _trace(store, None)
        assert _pending(path) == 0
        assert not any(s.startswith("BEGIN") for s in statements)  # nothing left: no write


async def test_sqlite_append_mostly_leaves_the_index_alone(tmp_path: Path) -> None:
    """Only an append whose row id reaches a multiple of INDEX_BATCH writes to the index."""
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        statements: list[str] = []
        await _trace(store, statements.append)
        for i in range(1, sqlite_module.INDEX_BATCH):
            await store.append("s", [_user(f"word {i}")])
        await _trace(store, None)
        assert not any(migrations.FTS_TABLE in s or s.startswith("-- ") for s in statements)
        assert _pending(path) == sqlite_module.INDEX_BATCH - 1
        await store.append("s", [_user("the batch")])  # row id INDEX_BATCH: the batch
        assert _counts(path) == (sqlite_module.INDEX_BATCH, sqlite_module.INDEX_BATCH)
        assert [h.position for h in await store.search("batch")] == [sqlite_module.INDEX_BATCH - 1]


async def test_sqlite_version_2_database_is_indexed_on_upgrade(tmp_path: Path) -> None:
    """A database of the lazy index (schema 2), with unindexed rows, is indexed by m003."""
    path = tmp_path / "v2.db"
    with _raw(path) as conn:
        migrations.m001_initial(conn)
        conn.execute(
            "INSERT INTO sessions (id, created_at, updated_at, message_count) "
            "VALUES ('a', 1, 1, 3), ('b', 2, 2, 1)"
        )
        insert = "INSERT INTO messages (session_id, seq, data) VALUES (?, ?, ?)"
        conn.execute(insert, ("a", 0, _user("Café indexed by m002").to_json()))
        migrations.m002_full_text_search(conn)
        # appended after m002 by the old code: not indexed until a search caught up
        conn.execute(insert, ("a", 1, _user("lazy CAFÉ row").to_json()))
        conn.execute(insert, ("a", 2, "{damaged"))
        conn.execute(insert, ("b", 0, _user("other café").to_json()))
        conn.execute("PRAGMA user_version = 2")
    async with SqliteStorage(path) as store:
        assert await store.count("a") == 3  # opens it: m003 runs
        assert _counts(path) == (4, 4)
        statements: list[str] = []
        await _trace(store, statements.append)
        hits = await store.search("cafe")
        await _trace(store, None)
        assert [(h.session_id, h.position) for h in hits] == [("b", 0), ("a", 0), ("a", 1)]
        assert not any(s.startswith(("BEGIN", "INSERT")) for s in statements)
        await store.append("a", [_user("new café")])
        assert [h.position for h in await store.search("café") if h.session_id == "a"] == [
            0,
            1,
            3,
        ]
    with _raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION


async def test_sqlite_hand_edited_row_is_reindexed(tmp_path: Path) -> None:
    """Edited by hand before or after it is indexed, a row is found by its new words."""
    path = tmp_path / "s.db"
    async with SqliteStorage(path) as store:
        await store.append("s", [_user("original words"), _user("second")])
        assert len(await store.search("original")) == 1  # indexes both rows
        with _raw(path) as conn:
            conn.execute("UPDATE messages SET data = ? WHERE seq = 1", (_user("Edited").to_json(),))
        assert [h.position for h in await store.search("edited")] == [1]
        await store.append("s", [_user("original words")])  # not indexed yet
        with _raw(path) as conn:
            sql = "UPDATE messages SET data = ? WHERE seq != 1"
            conn.execute(sql, (_user("Repaired words").to_json(),))
        assert [h.position for h in await store.search("repaired")] == [0, 2]
        assert await store.search("original") == []


async def _vm_steps(store: SqliteStorage, query: str, limit: int) -> tuple[int, int]:
    """(SQLite VM steps / 100, hits) of one search: work done, not time."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    await store._run(lambda conn: conn.set_progress_handler(count, 100))
    try:
        hits = await store.search(query, limit=limit)
    finally:
        await store._run(lambda conn: conn.set_progress_handler(None, 0))
    return steps[0], len(hits)


async def test_sqlite_common_word_stops_at_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A word in every session costs the same with 4x the sessions: no sort of every match."""
    monkeypatch.setattr(sqlite_module, "SORT_AT_MOST", 20, raising=False)
    async with SqliteStorage(tmp_path / "s.db") as store:

        async def grow(upto: int) -> None:
            have = len(await store.list_sessions())
            for i in range(have, upto):
                await store.save(f"s{i:04}", [_user(f"common thing n{i}x"), _user("filler")])

        await grow(100)
        small, hits = await _vm_steps(store, "common", 5)
        assert hits == 5
        await grow(400)
        large, hits = await _vm_steps(store, "common", 5)
        assert hits == 5
        assert large <= small * 1.5 + 5, (small, large)
        # a rare word still comes straight from the index
        assert [h.session_id for h in await store.search("thing n17x")] == ["s0017"]


# -- the file backend: SQLite FTS5 beside the files, caught up at search time ----------------


def _count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The session history files opened from now on."""
    import os

    opened: list[str] = []
    real = os.open

    def counting(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".jsonl"):
            opened.append(os.path.basename(str(path)))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    return opened


async def _file_store(tmp_path: Path, sessions: int) -> Any:
    from conversa.storage.filesystem import FileSystemStorage

    store = FileSystemStorage(tmp_path / "files")
    for i in range(sessions):
        word = "rareword" if i == sessions // 2 else f"filler{i}"
        await store.save(f"s{i:04}", [_user(f"common {word}"), _user("common again")])
    return store


async def test_file_search_reads_only_new_writes_and_the_hits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first search, a search opens the sessions written since and its hits only."""
    store = await _file_store(tmp_path, 200)
    assert [(h.session_id, h.position) for h in await store.search("rarew")] == [("s0100", 0)]
    opened = _count_opens(monkeypatch)
    assert [h.session_id for h in await store.search("RAREWORD")] == ["s0100"]
    assert opened == ["s0100.jsonl"]
    opened.clear()
    for i in (3, 4, 5):
        await store.append(f"s{i:04}", [_user(f"later rareword {i}")])
    opened.clear()
    hits = await store.search("rareword")
    assert [(h.session_id, h.position) for h in hits] == [
        ("s0005", 2),
        ("s0004", 2),
        ("s0003", 2),
        ("s0100", 0),
    ]
    # indexing the three sessions written (from where it stopped), then reading the hits
    assert sorted(opened) == sorted(
        ["s0003.jsonl", "s0004.jsonl", "s0005.jsonl"] * 2 + ["s0100.jsonl"]
    )
    await store.close()


async def test_file_search_common_word_stops_at_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A word in every session reads the newest sessions' hits until the limit, no more."""
    from conversa.storage import _file_search

    store = await _file_store(tmp_path, 100)
    await store.search("common")  # builds the index
    monkeypatch.setattr(_file_search, "SORT_AT_MOST", 20)
    opened = _count_opens(monkeypatch)
    hits = await store.search("common", limit=5)
    assert [(h.session_id, h.position) for h in hits] == [
        ("s0099", 0),
        ("s0099", 1),
        ("s0098", 0),
        ("s0098", 1),
        ("s0097", 0),
    ]
    assert opened == ["s0099.jsonl", "s0098.jsonl", "s0097.jsonl"]
    assert len(await store.search("common", limit=None)) == 200
    await store.close()


async def test_file_search_follows_every_kind_of_write(tmp_path: Path) -> None:
    """Saves, pops, deletes, other storage objects and files changed behind its back."""
    from conversa.storage.filesystem import FileSystemStorage

    store = await _file_store(tmp_path, 5)
    other = FileSystemStorage(store.directory)

    async def found(query: str) -> list[tuple[str, int]]:
        return [(h.session_id, h.position) for h in await store.search(query, limit=None)]

    assert await found("filler1") == [("s0001", 0)]
    await other.save("s0001", [_user("replaced"), _user("Crème brûlée")])
    assert await found("filler1") == []
    assert await found("creme") == [("s0001", 1)]
    await other.pop("s0001")
    assert await found("brulee") == []
    await other.append("s0001", [_user("x"), _user("brûlée again")])
    assert await found("brulee") == [("s0001", 2)]
    await other.delete("s0001")
    assert await found("brulee") == []
    # replaced by another program, without a word to the session index: the hit read back
    # from the file shows it is not the file indexed, so the session is indexed again
    path = Path(store.directory) / "s0003.jsonl"
    tmp = path.with_name("elsewhere")
    tmp.write_text(_user("rewritten filler3x").to_json() + "\n")
    tmp.replace(path)
    assert await found("filler3") == [("s0003", 0)]
    assert (await store.search("filler3"))[0].message.text == "rewritten filler3x"
    await store.close()
    await other.close()


async def test_file_search_index_is_rebuilt_when_missing_or_damaged(tmp_path: Path) -> None:
    from conversa.storage import _file_search
    from conversa.storage.filesystem import FileSystemStorage

    store = await _file_store(tmp_path, 4)
    assert len(await store.search("common", limit=None)) == 8
    db = Path(store.directory) / _file_search.DB_NAME
    assert db.exists()
    await store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    assert len(await store.search("common", limit=None)) == 8  # built again
    await store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"not a database" * 100)
    fresh = FileSystemStorage(store.directory)
    assert [h.session_id for h in await fresh.search("rareword")] == ["s0002"]
    await fresh.close()


async def test_file_search_in_a_directory_it_may_not_write_scans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No index can be kept there: the scanning search answers, and nothing is created."""
    import os

    from conversa.storage import _file_search
    from conversa.storage.filesystem import FileSystemStorage

    store = await _file_store(tmp_path, 3)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and real(path, mode))
    fresh = FileSystemStorage(store.directory)
    assert [h.session_id for h in await fresh.search("rareword")] == ["s0001"]
    assert not (Path(store.directory) / _file_search.DB_NAME).exists()


_SEARCHER = """
import asyncio, sys
from conversa import ChatMessage
from conversa.storage import _file_search
from conversa.storage.filesystem import FileSystemStorage

_file_search.BATCH = 3  # many small transactions, so searchers interleave

async def main(directory, me, rounds):
    store = FileSystemStorage(directory)
    for n in range(rounds):
        await store.append(f"{me}-{n % 4}", [ChatMessage.user(f"word{me} n{n}")])
        await store.append("shared", [ChatMessage.user(f"shared {me} n{n}")])
        if n % 5 == 4:
            await store.save(f"{me}-{n % 4}", [ChatMessage.user(f"word{me} saved{n}")])
        hits = await store.search(f"word{me}", limit=None)
        assert all(h.session_id.startswith(me) for h in hits), hits
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_file_search_index_stays_exact_under_concurrent_processes(tmp_path: Path) -> None:
    """Processes writing and searching at once: afterwards the index agrees with a scan."""

    from conversa.storage.base import ConversationStorage
    from conversa.storage.filesystem import FileSystemStorage

    store = await _file_store(tmp_path, 10)
    await store.search("common")
    run_children(_SEARCHER, [[store.directory, f"p{i}", "30"] for i in range(3)])
    for query in ("shared", "wordp0", "wordp1 saved", "common", "n2"):
        indexed = await store.search(query, limit=None)
        fresh = FileSystemStorage(store.directory)
        scanned = await ConversationStorage._search(fresh, query_terms(query), None)
        key = sorted((h.session_id, h.position, h.message.id) for h in indexed)
        assert key == sorted((h.session_id, h.position, h.message.id) for h in scanned), query
        assert len(await fresh.search(query, limit=None)) == len(indexed)
        await fresh.close()
    assert len(await store.search("shared", limit=None)) == 90
    await store.close()
