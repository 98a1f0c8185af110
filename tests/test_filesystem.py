"""FileSystemStorage: conformance, file names and containment, damage, modes, URLs, append-only."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from _services import run_children
from _wait import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversa import (
    ChatMessage,
    CorruptSessionError,
    InvalidSessionId,
    StorageError,
    UnsupportedStorageURL,
    UsageTotals,
    open_storage,
)
from conversa.storage.base import SessionQuery
from conversa.storage.filesystem import (
    FileSystemStorage,
    session_file_stem,
    session_id_from_stem,
)
from conversa.testing.conformance import StorageConformance


class TestFileConformance(StorageConformance):
    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[FileSystemStorage]:
        async with FileSystemStorage(tmp_path / "sessions") as store:
            yield store


class TestFilePowerConformance(StorageConformance):
    """The same contract with an fsync on every write."""

    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[FileSystemStorage]:
        async with FileSystemStorage(tmp_path / "sessions", durability="power") as store:
            yield store


@pytest.fixture
def store(tmp_path: Path) -> FileSystemStorage:
    return FileSystemStorage(tmp_path / "sessions")


def _files(root: Path) -> set[str]:
    """Every path under ``root``, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _sessions_files(directory: str | Path) -> list[str]:
    """The names in a session directory but the index of sessions (``.conversa-index*``)."""
    return [n for n in os.listdir(directory) if not n.startswith(".conversa-index")]


def _user(text: str) -> ChatMessage:
    return ChatMessage.user(text)


# -- ids, file names and containment ------------------------------------------------------


@pytest.mark.parametrize(
    ("session_id", "name"),
    [
        ("user-123", "user-123.jsonl"),
        ("alice@example.com", "alice@example.com.jsonl"),
        ("a+b_c.d", "a+b_c.d.jsonl"),
        ("a b", "a%20b.jsonl"),
        ("100%", "100%25.jsonl"),
        ("ü", "%C3%BC.jsonl"),
        ("~x", "%7Ex.jsonl"),
        (".hidden", "%2Ehidden.jsonl"),
    ],
)
async def test_readable_file_names(store: FileSystemStorage, session_id: str, name: str) -> None:
    await store.append(session_id, [_user("hi")])
    assert sorted(_sessions_files(store.directory)) == sorted([name, name[:-6] + ".meta.json"])
    line = (Path(store.directory) / name).read_text(encoding="utf-8")
    assert json.loads(line)["content"] == "hi"
    assert await store.list_sessions() == [session_id]


EVIL_IDS = [
    "..",
    ".",
    "../../etc/passwd",
    "../escape",
    "/abs/path",
    "/etc/passwd",
    "a/b",
    "a/../../b",
    "\\windows\\path",
    "nul\x00byte",
    "",
    "x" * 257,
    "..\u2215slash",
]


@pytest.mark.parametrize("evil", EVIL_IDS)
async def test_evil_ids_stay_inside_the_directory(tmp_path: Path, evil: str) -> None:
    root = tmp_path / "outer"
    store = FileSystemStorage(root / "sessions")
    before = _files(tmp_path)
    try:
        await store.append(evil, [_user("x")])
        await store.set_state(evil, {"k": 1})
        await store.update_info(evil, title="t")
        await store.save(evil, [_user("y")])
    except InvalidSessionId:
        assert evil in ("", "nul\x00byte", "x" * 257)
        assert _files(tmp_path) == before
        return
    created = _files(tmp_path) - before
    assert created, "nothing was written"
    assert all(p == "outer" or p.startswith(("outer/sessions/", "outer/sessions")) for p in created)
    assert all(os.sep not in p for p in os.listdir(root / "sessions"))
    assert set(_sessions_files(root / "sessions")) <= {
        f"{session_file_stem(evil)}.jsonl",
        f"{session_file_stem(evil)}.meta.json",
    }
    assert await store.list_sessions() == [evil]
    assert [m.text for m in await store.load(evil)] == ["y"]
    await store.delete(evil)
    assert _sessions_files(root / "sessions") == []


@pytest.mark.parametrize(
    "bad", ["", "nul\x00", "x" * 257, "bell\x07"], ids=["empty", "nul", "long", "ctrl"]
)
async def test_every_method_validates_the_id(store: FileSystemStorage, bad: str) -> None:
    calls = [
        store.save(bad, []),
        store.load(bad),
        store.delete(bad),
        store.exists(bad),
        store.append(bad, [_user("x")]),
        store.count(bad),
        store.tail(bad),
        store.tail(bad, 0),
        store.truncate(bad, 0),
        store.pop(bad),
        store.pop(bad, 0),
        store.get_info(bad),
        store.update_info(bad, title="t"),
        store.get_state(bad),
        store.set_state(bad, {"k": 1}),
        store.delete_state(bad, ["k"]),
        store.clear_state(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidSessionId):
            await call
    assert not os.path.exists(store.directory)


_ids = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=256)


@settings(max_examples=300, deadline=None)
@given(session_id=_ids)
def test_names_are_safe_and_reversible(session_id: str) -> None:
    stem = session_file_stem(session_id)
    name = stem + ".meta.json"
    assert "/" not in name and "\x00" not in name
    assert not stem.startswith(".")
    assert len(("." + name + ".abcdefgh.tmp").encode()) <= 255
    if "~" in stem:
        assert len(stem) <= 200
        assert session_id_from_stem(stem) is None  # recovered from the meta file instead
    else:
        assert session_id_from_stem(stem) == session_id


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(session_id=_ids)
async def test_any_valid_id_roundtrips_through_the_directory(
    tmp_path: Path, session_id: str
) -> None:
    store = FileSystemStorage(tmp_path / os.urandom(6).hex())
    await store.append(session_id, [_user("hello")])
    assert await store.list_sessions() == [session_id]
    assert await store.count(session_id) == 1
    assert len(_sessions_files(store.directory)) == 2


def test_long_ids_get_distinct_hashed_names() -> None:
    a, b = "x" * 250 + "a", "x" * 250 + "b"
    assert session_file_stem(a) != session_file_stem(b)
    assert "~" in session_file_stem(a)
    assert session_file_stem("é" * 40) != session_file_stem("é" * 41)


def test_foreign_file_names_are_not_sessions() -> None:
    assert session_id_from_stem("a%2db") is None  # not the canonical spelling of "a-b"
    assert session_id_from_stem("a~b") is None
    assert session_id_from_stem("%FF") is None  # not UTF-8
    assert session_id_from_stem("%00") is None  # decodes to a control character
    assert session_id_from_stem("a-b") == "a-b"


async def test_listing_ignores_foreign_and_temp_files(store: FileSystemStorage) -> None:
    await store.append("real", [_user("x")])
    d = Path(store.directory)
    for junk in (".real.jsonl.abc.tmp", "notes.txt", "a%2db.jsonl", "x~y.jsonl"):
        (d / junk).write_text("junk\n")
    assert await store.list_sessions() == ["real"]


async def test_first_write_removes_only_stale_temp_files(tmp_path: Path) -> None:
    """Temp files as killed rewrites leave them: removed unless their session is locked."""
    d = tmp_path / "sessions"
    writer = FileSystemStorage(d)
    for sid in ("a", "a.jsonl", "busy"):
        await writer.append(sid, [_user(sid)])
    stale = [".a.jsonl.k1l2m3n4.tmp", ".a.meta.json.x_9y8z7w.tmp", ".gone.jsonl.abcdefgh.tmp"]
    kept = [
        ".a.jsonl.jsonl.q1w2e3r4.tmp",  # session "a.jsonl", whose lock is held below
        ".busy.meta.json.zzzzzzzz.tmp",
        ".notes.txt.abcdefgh.tmp",  # not a session file's
        "a.jsonl.abcdefgh.tmp",
    ]
    for name in stale + kept:
        (d / name).write_bytes(b"x" * 1000)
    held = []
    for sid in ("a.jsonl", "busy"):  # a live writer in another process holds these locks
        fd = os.open(d / f"{sid}.jsonl", os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    try:
        store = FileSystemStorage(d)
        assert [m.text for m in await store.load("a")] == ["a"]  # reads do not sweep
        assert await store.count("a") == 1
        assert all((d / n).exists() for n in stale)
        await store.update_info("a", title="t")
    finally:
        for fd in held:
            os.close(fd)
    assert sorted(n for n in os.listdir(d) if n.endswith(".tmp")) == sorted(kept)
    await store.append("busy", [_user("more")])  # no second sweep within one object
    assert (d / ".busy.meta.json.zzzzzzzz.tmp").exists()
    await FileSystemStorage(d).append("busy", [_user("more")])
    assert sorted(n for n in os.listdir(d) if n.endswith(".tmp")) == sorted(kept[2:])


async def test_hashed_id_listed_from_meta(store: FileSystemStorage) -> None:
    long_id = "conversation/" + "é" * 200
    await store.append(long_id, [_user("x")])
    names = os.listdir(store.directory)
    assert all(len(n.encode()) < 255 for n in names)
    meta = json.loads(next(Path(store.directory).glob("*.meta.json")).read_text())
    assert meta["session_id"] == long_id
    assert await store.list_sessions() == [long_id]


# -- modes --------------------------------------------------------------------------------


async def test_directory_created_lazily_with_private_modes(tmp_path: Path) -> None:
    store = FileSystemStorage(tmp_path / "a" / "sessions")
    assert await store.load("s") == []
    assert await store.list_sessions() == []
    assert await store.get_state("s") == {}
    await store.delete("s")
    assert not (tmp_path / "a").exists()
    await store.append("s", [_user("x")])
    await store.save("t", [_user("y")])
    await store.set_state("u", {"k": 1})
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    files = os.listdir(store.directory)
    assert len(files) == 7  # three sessions' history and meta, and the index's log
    for name in files:
        mode = stat.S_IMODE(os.stat(os.path.join(store.directory, name)).st_mode)
        assert mode == 0o600, (name, oct(mode))


async def test_existing_directory_mode_is_left_alone(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    await FileSystemStorage(d).append("s", [_user("x")])
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755


async def test_unwritable_directory_says_what_to_check(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    store = FileSystemStorage(blocker / "sessions")
    with pytest.raises(StorageError, match="writable"):
        await store.append("s", [_user("x")])


# -- URLs ---------------------------------------------------------------------------------


def test_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = open_storage(f"file://{tmp_path}/abs")
    assert isinstance(absolute, FileSystemStorage)
    assert absolute.directory == str(tmp_path / "abs")
    assert absolute.durability == "crash"
    relative = open_storage("file://rel/dir")
    assert isinstance(relative, FileSystemStorage)
    assert relative.directory == str(tmp_path / "rel" / "dir")
    power = FileSystemStorage.from_url(f"file://{tmp_path}/p?durability=power")
    assert (power.directory, power.durability) == (str(tmp_path / "p"), "power")
    assert FileSystemStorage.from_url("file://my%20dir").directory == str(tmp_path / "my dir")
    assert FileSystemStorage.from_url("file://").directory == str(tmp_path / "sessions")
    assert FileSystemStorage().directory == str(tmp_path / "sessions")
    plain = open_storage("some/dir")
    assert isinstance(plain, FileSystemStorage)
    assert plain.directory == str(tmp_path / "some" / "dir")
    with pytest.raises(UnsupportedStorageURL, match="crash"):
        FileSystemStorage.from_url("file:///x?durability=sometimes")
    with pytest.raises(UnsupportedStorageURL, match="durability"):
        FileSystemStorage.from_url("file:///x?fsync=1")
    with pytest.raises(UnsupportedStorageURL, match="file://"):
        FileSystemStorage.from_url("sqlite:///x.db")
    with pytest.raises(ValueError, match="power"):
        FileSystemStorage(tmp_path, durability="never")
    assert "rel/dir" in repr(relative)


async def test_directory_is_fixed_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = FileSystemStorage("here")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    await store.append("s", [_user("x")])
    assert (tmp_path / "here" / "s.jsonl").exists()
    assert not (other / "here").exists()


# -- append only --------------------------------------------------------------------------


async def test_append_never_rewrites(store: FileSystemStorage) -> None:
    await store.append("s", [_user("one"), _user("two")])
    path = Path(store.directory) / "s.jsonl"
    before = path.read_bytes()
    inode = os.stat(path).st_ino
    for i in range(5):
        await store.append("s", [_user(f"more {i}")])
        assert os.stat(path).st_ino == inode
        assert path.read_bytes().startswith(before)
    assert await store.count("s") == 7


async def test_rewrites_replace_the_file_atomically(store: FileSystemStorage) -> None:
    msgs = [_user(str(i)) for i in range(4)]
    await store.append("s", msgs)
    path = Path(store.directory) / "s.jsonl"
    inode = os.stat(path).st_ino
    await store.pop("s")
    assert os.stat(path).st_ino != inode
    assert await store.load("s") == msgs[:3]
    assert not [n for n in os.listdir(store.directory) if n.endswith(".tmp")]


async def test_file_is_human_readable_json_lines(store: FileSystemStorage) -> None:
    one, two, three = _user("a"), ChatMessage.assistant("b"), _user("c")
    await store.append("s", [one])
    await store.append("s", [two, three])
    lines = (Path(store.directory) / "s.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    assert [json.loads(line) for line in lines[:-1]] == [m.to_dict() for m in (one, two, three)]
    assert lines[0] == one.to_json()
    await store.save("s", [one, two, three])
    lines = (Path(store.directory) / "s.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == [m.to_json() for m in (one, two, three)]


async def test_newlines_and_separators_inside_messages(store: FileSystemStorage) -> None:
    msgs = [_user("a\nb\r\nc\u2028d\u2029e\x85f\x0bg\x0ch"), _user("next")]
    await store.append("s", msgs)
    assert await store.load("s") == msgs
    assert await store.count("s") == 2


# -- damage -------------------------------------------------------------------------------


async def _damaged(store: FileSystemStorage, middle: bytes) -> tuple[Path, bytes]:
    await store.append("s", [_user("first")])
    path = Path(store.directory) / "s.jsonl"
    with open(path, "ab") as f:
        f.write(middle + _user("last").to_json().encode() + b"\n")
    return path, path.read_bytes()


@pytest.mark.parametrize(
    ("middle", "why"),
    [
        (b'{"role": "user", "content": \n', "invalid JSON"),
        (b"not json at all\n", "invalid JSON"),
        (b"\n", "invalid JSON"),
        (b"[1, 2]\n", "not a stored message"),
        (b'{"content": "no role"}\n', "not a stored message"),
        (b'{"role": "robot", "content": "x"}\n', "not a stored message"),
        (b'{"role": "tool", "content": "no call id"}\n', "not a stored message"),
        (b'{"role": "user", "content": "x", "created_at": "yesterday"}\n', "not a stored"),
        (b'{"role": "user", "content": "\xff\xfe"}\n', "UTF-8"),
    ],
)
async def test_damaged_middle_line_is_reported_and_left_alone(
    store: FileSystemStorage, middle: bytes, why: str
) -> None:
    path, data = await _damaged(store, middle)
    # Every read and write but a whole save says so, even those that need only newer lines;
    # a fresh object (another process) too.
    for target in (store, FileSystemStorage(store.directory), FileSystemStorage(store.directory)):
        for action in (
            target.tail("s"),  # the damage is older than the last line
            target.count("s"),
            target.append("s", [_user("after")]),
            target.load("s"),
            target.tail("s", 2),
            target.get_info("s"),
            target.pop("s"),
            target.truncate("s", 1),
            target.append("s", []),
        ):
            with pytest.raises(CorruptSessionError) as err:
                await action
            assert str(path) in str(err.value)
            assert "line 2" in str(err.value)
            assert why in str(err.value)
            assert path.read_bytes() == data


async def test_damage_appended_after_a_check_is_found_by_the_next_call(
    store: FileSystemStorage,
) -> None:
    """What one object checked is not read again, but what was added since is."""
    await store.append("s", [_user("a")])
    assert await store.count("s") == 1
    path = Path(store.directory) / "s.jsonl"
    with open(path, "ab") as f:  # a bad line from another writer (or a hand edit)
        f.write(b'{"role": "user"}\n')
    for action in (store.count("s"), store.tail("s"), store.append("s", [_user("b")])):
        with pytest.raises(CorruptSessionError, match=r"line 2 of .*s\.jsonl is damaged"):
            await action
    assert path.read_bytes().endswith(b'{"role": "user"}\n')
    # Fixed by hand: the session works again.
    path.write_bytes(path.read_bytes().replace(b'{"role": "user"}\n', b""))
    await store.append("s", [_user("b")])
    assert [m.text for m in await store.load("s")] == ["a", "b"]


async def test_damage_in_place_found_by_load_stops_every_other_call(
    store: FileSystemStorage,
) -> None:
    """An edit that keeps the file's size and ends escapes the resumed check until a load."""
    await store.append("s", [_user(f"m{i}" + "x" * 100) for i in range(5)])
    assert await store.count("s") == 5
    path = Path(store.directory) / "s.jsonl"
    data = path.read_bytes()
    second = data.split(b"\n")[1]
    path.write_bytes(data.replace(second, b"\xff" * len(second)))
    with pytest.raises(CorruptSessionError, match=r"line 2 of .* is damaged: not valid UTF-8"):
        await store.load("s")
    for action in (store.count("s"), store.tail("s"), store.append("s", [_user("b")])):
        with pytest.raises(CorruptSessionError, match=r"line 2 of .* is damaged: not valid UTF-8"):
            await action


async def test_save_replaces_a_damaged_history(store: FileSystemStorage) -> None:
    """The way out short of an editor: a save (clear_history) writes a whole new history."""
    await _damaged(store, b"garbage\n")
    await store.save("s", [_user("new")])
    await store.append("s", [_user("more")])
    assert [m.text for m in await store.load("s")] == ["new", "more"]


async def test_damaged_line_before_first_user_message_fails_get_info(
    store: FileSystemStorage,
) -> None:
    await store.append("s", [ChatMessage.system("sys")])
    path = Path(store.directory) / "s.jsonl"
    with open(path, "ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(CorruptSessionError, match="line 2"):
        await store.get_info("s")


async def test_damaged_meta_file_is_reported(store: FileSystemStorage) -> None:
    await store.set_state("s", {"k": 1})
    meta = Path(store.directory) / "s.meta.json"
    meta.write_text("{broken")
    with pytest.raises(CorruptSessionError, match=str(meta)):
        await store.get_state("s")
    with pytest.raises(CorruptSessionError, match=r"s\.meta\.json"):
        await store.set_state("s", {"k": 2})
    assert meta.read_text() == "{broken"


@pytest.mark.parametrize(
    "tail",
    [
        b'{"id":"x","role":"us',
        b"{",
        b'{"id":"x","content":"a}',  # cut after a "}" inside a string
        b"\xe2\x82",  # half a UTF-8 character
        b'{"role":"user","content":"the first of one append"} ',
        b'{"role":"user","content":"the first of one append" }',
    ],
)
async def test_torn_last_line_is_ignored_then_cut(
    store: FileSystemStorage, tail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    msgs = [_user("a"), _user("b")]
    await store.append("s", msgs)
    path = Path(store.directory) / "s.jsonl"
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(tail)
    with pytest.warns(UserWarning, match=rf"{path}.*interrupted"):
        assert await store.load("s") == msgs
    with pytest.warns(UserWarning, match=rf"{path}.*interrupted"):
        assert await store.tail("s") == msgs[1:]
    with pytest.warns(UserWarning, match=rf"{path}.*interrupted"):
        assert await store.tail("s", 5) == msgs
    assert await store.count("s") == 2
    info = await store.get_info("s")
    assert info is not None and info.message_count == 2
    assert path.read_bytes() == good + tail  # reading never writes
    extra = _user("c")
    with caplog.at_level(logging.WARNING, logger="conversa.storage.filesystem"):
        await store.append("s", [extra])
    assert "cut off" in caplog.text
    assert path.read_bytes() == good + extra.to_json().encode() + b"\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert await store.load("s") == [*msgs, extra]


async def test_unfinished_multi_message_append_is_dropped_whole(
    store: FileSystemStorage,
) -> None:
    """A crash between the lines of one append must not leave half of it."""
    first = [_user("a")]
    await store.append("s", first)
    path = Path(store.directory) / "s.jsonl"
    good = path.read_bytes()
    batch = [_user("b1"), _user("b2"), _user("b3")]
    await store.append("s", batch)
    full = path.read_bytes()
    # Every prefix of the batch's bytes (as a killed write() could leave) reads as no batch.
    appended = full[len(good) :]
    # Also every cut just before a line's " " or "\\n", where its JSON is already complete.
    cuts = sorted(
        {
            *range(0, len(appended), 37),
            *(i + 1 for i, b in enumerate(appended) if b == 10),
            *(i for i, b in enumerate(appended) if b in b" \n"),
        }
    )
    for cut in cuts[:-1]:
        path.write_bytes(good + appended[:cut])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert await store.load("s") == first, cut
            assert await store.tail("s", 3) == first, cut
        assert await store.count("s") == 1
    path.write_bytes(full)
    assert await store.load("s") == [*first, *batch]
    assert await store.tail("s", 2) == batch[1:]
    path.write_bytes(good + appended[: appended.index(b"\n") + 1])
    await store.append("s", [_user("c")])
    assert [m.text for m in await store.load("s")] == ["a", "c"]


async def test_pop_after_multi_message_append_leaves_a_clean_end(
    store: FileSystemStorage,
) -> None:
    batch = [_user("1"), _user("2"), _user("3")]
    await store.append("s", batch)
    assert await store.pop("s") == batch[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert await store.load("s") == batch[:2]
    await store.truncate("s", 1)
    assert await store.load("s") == batch[:1]


async def test_hand_edited_file_without_final_newline_keeps_that_line(
    store: FileSystemStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """A complete last line without its "\\n" is no torn write: it is a message, kept."""
    path = Path(store.directory)
    path.mkdir()
    a, b, c = _user("a"), _user("b"), _user("c")
    (path / "s.jsonl").write_text(a.to_json() + "\n" + b.to_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert await store.load("s") == [a, b]
        assert await store.tail("s") == [b]
        assert await store.tail("s", 5) == [a, b]
        assert await store.count("s") == 2
        assert await FileSystemStorage(store.directory).count("s") == 2
    info = await store.get_info("s")
    assert info is not None
    assert info.created_at == a.created_at  # no meta file: the first message's time
    assert (info.title, info.message_count) == ("a", 2)
    with caplog.at_level(logging.WARNING, logger="conversa.storage.filesystem"):
        await store.append("s", [c])
    assert "cut off" not in caplog.text
    assert (path / "s.jsonl").read_text() == "".join(m.to_json() + "\n" for m in (a, b, c))
    assert await store.load("s") == [a, b, c]
    assert await store.count("s") == 3
    assert await store.tail("s", 2) == [b, c]
    await store.update_info("s", user_id="u")  # creates the meta file
    again = await store.get_info("s")
    assert again is not None
    assert (again.created_at, again.user_id) == (a.created_at, "u")


# -- tail: the newest lines, read from the end ---------------------------------------------


async def _big_history(store: FileSystemStorage) -> list[ChatMessage]:
    """1,000 messages of about 1.5 KB in session "s", stored in ten appends."""
    msgs = [_user(f"{i}:" + "x" * 1500) for i in range(1000)]
    for i in range(0, 1000, 100):
        await store.append("s", msgs[i : i + 100])
    return msgs


def _counted_preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the os.pread calls made from now on (the list grows as they come)."""
    read: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        read.append(size)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    return read


async def test_tail_reads_only_the_end(
    store: FileSystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tail(1) of a checked 1.5 MB history reads about one block, never the first lines."""
    msgs = await _big_history(store)
    path = Path(store.directory) / "s.jsonl"
    data = path.read_bytes()
    first_nl = data.index(b"\n")
    second = data[first_nl + 1 : data.index(b"\n", first_nl + 1)]
    # Damage line 2 in place, keeping the file's size: the already checked part is not read.
    path.write_bytes(data.replace(second, b"\xff" * len(second), 1))
    read = _counted_preads(monkeypatch)
    assert await store.tail("s") == msgs[-1:]
    assert sum(read) <= 70_000 < len(data) // 20
    read.clear()
    assert await store.tail("s", 500) == msgs[500:]
    assert sum(read) < len(data) * 0.6
    assert await store.tail("s", 998) == msgs[2:]
    with pytest.raises(
        CorruptSessionError, match=rf"line 2 of session file {path} is damaged: not valid UTF-8"
    ):
        await store.tail("s", 999)
    assert await store.count("s") == 1000
    with pytest.raises(CorruptSessionError, match="line 2"):
        await store.load("s")
    with pytest.raises(CorruptSessionError, match="line 2"):  # found: now reported every time
        await store.tail("s")


@pytest.mark.parametrize("block", [1, 2, 5, 64, 1 << 16])
async def test_tail_across_blocks(
    store: FileSystemStorage, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr("conversa.storage.filesystem._TAIL_BLOCK", block)
    msgs = [_user(t) for t in ["a", "ü" * 40, "line\nbreak", "sep\u2028x", "", "z" * 300]]
    await store.append("s", msgs[:1])
    await store.append("s", msgs[1:4])  # lines ending in "} \n" inside one append
    await store.append("s", msgs[4:])
    for n in range(len(msgs) + 2):
        assert await store.tail("s", n) == (msgs[max(0, len(msgs) - n) :] if n else []), n
    assert await store.tail("unknown", 3) == []
    with pytest.raises(ValueError):
        await store.tail("s", -1)
    # Damage: the line number counts from the start of the file, whatever the block size.
    path = Path(store.directory) / "s.jsonl"
    with open(path, "ab") as f:
        f.write(b"[1]\n")
    with pytest.raises(CorruptSessionError, match=r"line 7 of .* is damaged: not a stored message"):
        await store.tail("s", 1)


async def test_tail_after_save_without_final_newline(store: FileSystemStorage) -> None:
    await store.save("s", [])
    assert await store.tail("s") == []
    path = Path(store.directory) / "s.jsonl"
    a, b = _user("a"), _user("b")
    path.write_text(a.to_json() + "\n" + b.to_json()[:-1])
    with pytest.warns(UserWarning, match="interrupted"):
        assert await store.tail("s", 2) == [a]
    path.write_text(b.to_json()[:-1])
    with pytest.warns(UserWarning, match="interrupted"):
        assert await store.tail("s") == []
    path.write_text(b.to_json())
    assert await store.tail("s") == [b]


# -- read: a page of positions, from the nearer end -----------------------------------------


async def test_read_reads_only_up_to_the_page_from_the_nearer_end(
    store: FileSystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of a checked 1.5 MB history reads the file from its nearer end up to the page."""
    msgs = await _big_history(store)
    size = (Path(store.directory) / "s.jsonl").stat().st_size
    assert await store.count("s") == 1000  # checked once, as any first access does
    read = _counted_preads(monkeypatch)
    pages = [(0, 20), (10, 20), (970, 20), (990, 10), (400, 100), (600, 100), (499, 2), (500, 2)]
    for offset, limit in pages:
        read.clear()
        assert await store.read("s", offset, limit) == msgs[offset : offset + limit]
        # the lines from the nearer end to the page's start, the page, and a block or two
        nearer = min(offset, 1000 - offset) + limit
        assert 0 < sum(read) <= size * nearer / 1000 + 3 * 65536, (offset, limit)
    read.clear()
    assert await store.read("s", 1000, 5) == []
    assert await store.read("s", 999) == msgs[999:]
    assert sum(read) <= 70_000


@pytest.mark.parametrize("block", [1, 7, 1 << 16])
async def test_read_keeps_an_unended_last_line_and_skips_a_torn_one(
    store: FileSystemStorage, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr("conversa.storage.filesystem._TAIL_BLOCK", block)
    msgs = [_user(t) for t in ["a", "ü" * 40, "line\nbreak", "", "z" * 300]]
    path = Path(store.directory)
    path.mkdir()
    (path / "s.jsonl").write_text(
        "".join(m.to_json() + "\n" for m in msgs[:-1]) + msgs[-1].to_json()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hand edit, not a torn write
        for offset in range(len(msgs) + 1):
            for limit in (1, 2, None):
                stop = None if limit is None else offset + limit
                assert await store.read("s", offset, limit) == msgs[offset:stop], (offset, limit)
    with open(path / "s.jsonl", "ab") as f:
        f.write(b'\n{"role":"us')
    for offset in (0, 4):
        with pytest.warns(UserWarning, match="interrupted"):
            assert await store.read("s", offset, 1) == msgs[offset : offset + 1]


# -- info and listing ---------------------------------------------------------------------


async def test_meta_file_holds_info_and_state(store: FileSystemStorage) -> None:
    await store.append("s", [_user("hi")])
    await store.update_info("s", title="T", user_id="u", status="completed", metadata={"a": 1})
    await store.set_state("s", {"k": [1, 2]}, ttl=60)
    meta = json.loads((Path(store.directory) / "s.meta.json").read_text(encoding="utf-8"))
    assert meta["session_id"] == "s"
    assert (meta["title"], meta["user_id"], meta["status"], meta["metadata"]) == (
        "T",
        "u",
        "completed",
        {"a": 1},
    )
    assert meta["state"]["k"]["value"] == [1, 2]
    assert meta["state"]["k"]["expires_at"] > 0
    info = await store.get_info("s")
    assert info is not None
    assert info.created_at.isoformat() == meta["created_at"]


async def test_expired_state_is_pruned_on_write(store: FileSystemStorage) -> None:
    await store.set_state("s", {"old": 1}, expires_at=datetime(2000, 1, 1, tzinfo=UTC))
    meta_path = Path(store.directory) / "s.meta.json"
    assert set(json.loads(meta_path.read_text())["state"]) == {"old"}  # stored, reads as absent
    await store.set_state("s", {"new": 2})
    meta = json.loads(meta_path.read_text())
    assert set(meta["state"]) == {"new"}


async def test_state_ops_on_unknown_session_create_nothing(store: FileSystemStorage) -> None:
    await store.delete_state("s", ["k"])
    await store.clear_state("s")
    await store.truncate("s", 0)
    assert await store.pop("s", 3) == []
    assert not os.path.exists(store.directory)


async def test_list_and_info_follow_file_mtimes(store: FileSystemStorage) -> None:
    for sid in ("a", "b", "c"):
        await store.append(sid, [_user(sid)])
    assert await store.list_sessions() == ["c", "b", "a"]
    await store.set_state("a", {"k": 1})
    assert await store.list_sessions() == ["a", "c", "b"]
    d = Path(store.directory)
    same = (time.time_ns() // 10**9 + 3600) * 10**9
    for name in os.listdir(d):
        os.utime(d / name, ns=(same, same))
    assert await store.list_sessions() == ["a", "b", "c"]  # ties: by file name
    info = await store.get_info("b")
    assert info is not None
    assert int(info.updated_at.timestamp()) == same // 10**9


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("s.meta.json", b"{broken"),
        ("s.meta.json", b"[]"),
        ("s.meta.json", b'{"created_at": "yesterday"}'),
        ("s.jsonl", b"not json\n"),  # the first line, read for the title
        ("s.jsonl", b'{"role": "user", "content": "x"}\n[1]\n'),  # a later one
    ],
)
async def test_listings_leave_out_a_damaged_session_with_a_warning(
    store: FileSystemStorage, name: str, damage: bytes
) -> None:
    """One damaged session must not hide the others: it is left out, and named."""
    for sid in ("a", "s", "z"):
        await store.append(sid, [_user(sid)])
    path = Path(store.directory) / name
    path.write_bytes(damage if name.endswith(".meta.json") else damage + path.read_bytes())
    with pytest.warns(UserWarning, match=rf"left out a damaged session: .*{path}") as caught:
        found = await store.find_sessions()
    assert len(caught) == 1
    assert [i.session_id for i in found] == ["z", "a"]
    with pytest.warns(UserWarning, match=str(path)):  # the others fill the limit
        assert [i.session_id for i in await store.find_sessions(limit=2)] == ["z", "a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert await store.list_sessions() == ["s", "z", "a"]  # its id is in its name
    with pytest.raises(CorruptSessionError, match=str(path)):
        await store.get_info("s")


async def test_list_sessions_leaves_out_a_hashed_name_with_a_damaged_meta_file(
    store: FileSystemStorage,
) -> None:
    long_id = "conversation/" + "é" * 200
    await store.append(long_id, [_user("x")])
    await store.append("short", [_user("y")])
    meta = next(p for p in Path(store.directory).glob("*~*.meta.json"))
    meta.write_text("{broken")
    for listing in (store.list_sessions(), store.find_sessions()):
        with pytest.warns(UserWarning, match=rf"left out a damaged session: .*{meta}"):
            result = await listing
        assert [getattr(r, "session_id", r) for r in result] == ["short"]


async def test_many_sessions_find_sessions(store: FileSystemStorage) -> None:
    for i in range(30):
        await store.append(f"s{i}", [_user(f"q{i}")])
        await store.update_info(f"s{i}", user_id="even" if i % 2 == 0 else "odd")
    found = await store.find_sessions(user_id="odd", limit=3)
    assert [i.session_id for i in found] == ["s29", "s27", "s25"]
    assert [i.title for i in found] == ["q29", "q27", "q25"]
    assert await store.find_sessions(limit=0) == []
    assert len(await store.find_sessions()) == 30


# -- a writer that waited for the lock while the file was swapped --------------------------


async def _append_blocked_on_old_file(
    store: FileSystemStorage, swap: str
) -> tuple[Path, ChatMessage]:
    """Hold the session's lock, let an append open the file and wait, ``swap`` it, release."""
    await store.append("s", [_user("old")])
    path = Path(store.directory) / "s.jsonl"
    held = os.open(path, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    late = _user("late")
    task = asyncio.create_task(store.append("s", [late]))
    # Wait until the append has the old file open (it is then blocked on our lock).
    await wait_for(
        lambda: sum(1 for fd in os.listdir("/proc/self/fd") if _points_at(fd, path)) >= 2,
        "the append to open the file",
    )
    if swap == "save":  # what a save in another process does: a new file over the path
        tmp = path.with_name(".swap.tmp")
        tmp.write_text(_user("new").to_json() + "\n")
        os.replace(tmp, path)
    else:
        os.unlink(path)
    fcntl.flock(held, fcntl.LOCK_UN)
    os.close(held)
    await task
    return path, late


def _points_at(fd: str, path: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except OSError:
        return False


async def test_append_waiting_for_a_save_lands_in_the_new_file(store: FileSystemStorage) -> None:
    path, late = await _append_blocked_on_old_file(store, "save")
    assert [m.text for m in await store.load("s")] == ["new", "late"]
    assert path.read_text().endswith(late.to_json() + "\n")


async def test_append_waiting_for_a_delete_starts_a_new_file(store: FileSystemStorage) -> None:
    _, late = await _append_blocked_on_old_file(store, "delete")
    assert await store.load("s") == [late]


async def test_count_stays_right_while_other_writers_change_the_file(tmp_path: Path) -> None:
    """count() resumes from where it last counted; every kind of change must still show."""
    reader = FileSystemStorage(tmp_path)
    writer = FileSystemStorage(tmp_path)
    msgs = [ChatMessage.user(f"m{i}") for i in range(6)]
    assert await reader.count("s") == 0
    await writer.append("s", msgs[:3])
    assert await reader.count("s") == 3
    await writer.append("s", msgs[3:5])
    assert await reader.count("s") == 5
    await writer.save("s", msgs[:2])
    assert await reader.count("s") == 2
    await writer.pop("s")
    assert await reader.count("s") == 1
    for _ in range(3):  # recreated files may get the old inode back
        await writer.delete("s")
        assert await reader.count("s") == 0
        await writer.append("s", msgs)
        assert await reader.count("s") == 6
        info = await reader.get_info("s")
        assert info is not None and info.message_count == 6


# -- a new storage object does not parse a checked history (issue 11, resume) ---------------


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the lines the file backend parses (decode_message calls)."""
    import conversa.storage.filesystem as fs

    calls = [0]
    real = fs.decode_message

    def counting(*args: object, **kwargs: object) -> ChatMessage:
        calls[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fs, "decode_message", counting)
    return calls


async def test_new_storage_object_counts_and_appends_without_parsing_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check mark kept on the file: a new process resumes a long history in O(1)."""
    writer = FileSystemStorage(tmp_path)
    await writer.save("s", [_user(f"m{i}") for i in range(500)])
    await writer.append("s", [_user("a"), _user("b")])
    await writer.pop("s")
    parses = _count_parses(monkeypatch)
    reader = FileSystemStorage(tmp_path)
    assert await reader.count("s") == 501
    assert [m.text for m in await reader.tail("s", 2)] == ["m499", "a"]
    await reader.append("s", [_user("c")])
    info = await FileSystemStorage(tmp_path).get_info("s")
    assert info is not None and info.message_count == 502
    assert parses[0] == 3  # the two lines tail read and the title get_info reads
    assert len(await FileSystemStorage(tmp_path).load("s")) == 502


async def test_checked_mark_is_not_trusted_after_a_hand_edit(tmp_path: Path) -> None:
    """A line damaged or added by another program moves the mtime: checked again, and found."""
    await FileSystemStorage(tmp_path).append("s", [_user(f"m{i}") for i in range(5)])
    path = tmp_path / "s.jsonl"
    data = path.read_bytes()
    second = data.split(b"\n")[1]
    path.write_bytes(data.replace(second, b"\xff" * len(second)))  # same size and ends
    with pytest.raises(CorruptSessionError, match="line 2"):
        await FileSystemStorage(tmp_path).count("s")
    path.write_bytes(data)
    assert await FileSystemStorage(tmp_path).count("s") == 5
    with open(path, "ab") as f:
        f.write(b'{"role": "user"}\n')
    with pytest.raises(CorruptSessionError, match="line 6"):
        await FileSystemStorage(tmp_path).append("s", [_user("x")])


async def test_damage_found_by_load_drops_the_mark_kept_on_the_file(tmp_path: Path) -> None:
    """An edit that keeps size, ends and mtime escapes the mark until a load finds it;
    from then on every storage object checks the file again."""
    await FileSystemStorage(tmp_path).append("s", [_user(f"m{i}" + "x" * 100) for i in range(5)])
    path = tmp_path / "s.jsonl"
    st = path.stat()
    data = path.read_bytes()
    second = data.split(b"\n")[1]
    path.write_bytes(data.replace(second, b"\xff" * len(second)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert await FileSystemStorage(tmp_path).count("s") == 5  # the documented blind spot
    with pytest.raises(CorruptSessionError, match="line 2"):
        await FileSystemStorage(tmp_path).load("s")
    for action in ("count", "tail"):
        with pytest.raises(CorruptSessionError, match="line 2"):
            await getattr(FileSystemStorage(tmp_path), action)("s")


# -- the index of sessions: listings read only what they return (issue 11) ------------------


async def _fill(store: FileSystemStorage, n: int, users: int = 4) -> None:
    for i in range(n):
        await store.append(f"s{i:04d}", [_user(f"q{i}")])
        await store.update_info(f"s{i:04d}", user_id=f"u{i % users}")


def _count_session_files(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The session files (history or meta) opened or stat'ed from now on, and directory scans."""
    touched: set[str] = set()
    real_open, real_stat, real_scandir = os.open, os.stat, os.scandir

    def note(path: object) -> None:
        name = os.path.basename(os.fspath(path))  # type: ignore[arg-type]
        if name.endswith((".jsonl", ".meta.json")):
            touched.add(name.split(".")[0])

    def counting_open(path: str, *args: object, **kw: object) -> int:
        note(path)
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    def counting_stat(path: object, *args: object, **kw: object) -> os.stat_result:
        if not isinstance(path, int):
            note(path)
        return real_stat(path, *args, **kw)  # type: ignore[arg-type]

    def counting_scandir(path: object = ".") -> object:
        touched.add("<scandir>")
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "stat", counting_stat)
    monkeypatch.setattr(os, "scandir", counting_scandir)
    return touched


@pytest.mark.parametrize("total", [40, 240])
async def test_find_sessions_reads_only_the_sessions_it_returns(
    store: FileSystemStorage, monkeypatch: pytest.MonkeyPatch, total: int
) -> None:
    await _fill(store, total)
    assert len(await store.find_sessions(limit=1)) == 1  # the first listing builds the index
    fresh = FileSystemStorage(store.directory)  # and another process's object reads it
    for storage in (store, fresh):
        touched = _count_session_files(monkeypatch)
        found = await storage.find_sessions(limit=5)
        mine = await storage.find_sessions(user_id="u1", limit=5)
        monkeypatch.undo()
        assert [i.session_id for i in found] == [
            f"s{i:04d}" for i in range(total - 1, total - 6, -1)
        ]
        assert [i.session_id for i in mine] == [f"s{i:04d}" for i in range(total - 3, 0, -4)][:5]
        # the newest five, the user's five, and nothing else: no directory scan
        assert "<scandir>" not in touched
        assert len(touched) <= 10, sorted(touched)


async def test_index_is_rebuilt_when_deleted(store: FileSystemStorage) -> None:
    await _fill(store, 12)
    expected = await store.find_sessions()
    for name in os.listdir(store.directory):
        if name.startswith(".conversa-index"):
            os.unlink(os.path.join(store.directory, name))
    assert await store.find_sessions() == expected  # the same object, its state now gone
    for name in os.listdir(store.directory):
        if name.startswith(".conversa-index"):
            os.unlink(os.path.join(store.directory, name))
    await store.append("s0003", [_user("again")])  # a writer recreates the log alone
    assert [
        i.session_id for i in await FileSystemStorage(store.directory).find_sessions(limit=2)
    ] == [
        "s0003",
        "s0011",
    ]


async def test_index_is_rebuilt_when_a_session_changed_behind_its_back(
    store: FileSystemStorage,
) -> None:
    await _fill(store, 6)
    assert (await store.find_sessions(limit=1))[0].session_id == "s0005"
    # another program (or an older conversa) moves s0005 to user "x" without the index
    meta = Path(store.directory) / "s0005.meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "user_id": "x"}))
    assert [i.session_id for i in await store.find_sessions(user_id="x")] == []  # not yet seen
    assert [i.user_id for i in await store.find_sessions(limit=1)] == ["x"]  # seen: rebuilt
    assert [i.session_id for i in await store.find_sessions(user_id="x")] == ["s0005"]
    assert "s0005" not in [i.session_id for i in await store.find_sessions(user_id="u1")]


async def test_index_is_rebuilt_after_a_torn_log_line(store: FileSystemStorage) -> None:
    await _fill(store, 3)
    await store.find_sessions()
    with open(Path(store.directory) / ".conversa-index.log", "ab") as log:
        log.write(b'{"s":"s00')  # a writer killed in the middle of its line
    await store.update_info("s0000", user_id="late")  # the next line is glued onto it
    fresh = FileSystemStorage(store.directory)
    assert [i.session_id for i in await fresh.find_sessions(user_id="late")] == ["s0000"]
    assert [i.session_id for i in await store.find_sessions(user_id="late")] == ["s0000"]


_INDEX_WRITER = """
import asyncio, sys
from conversa import ChatMessage
from conversa.storage import _file_index
from conversa.storage.filesystem import FileSystemStorage

# fold the log often, so that folds race with the other writers
_file_index.COMPACT_BYTES, _file_index._WRITER_COMPACT_BYTES = 2000, 4000

async def main(directory, me, rounds):
    store = FileSystemStorage(directory)
    for n in range(rounds):
        sid = f"{me}-{n % 5}"
        await store.append(sid, [ChatMessage.user(f"{me}:{n}")])
        await store.update_info(sid, user_id=f"user-{n % 3}", status="active")
        await store.append("shared", [ChatMessage.user(f"{me}:{n}")])
        if n % 7 == 6:
            await store.delete(f"{me}-{n % 5}")
        if n % 10 == 0:
            await store.find_sessions(limit=3)  # readers fold the log now and then

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_concurrent_writers_keep_the_index_consistent(
    store: FileSystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:

    await store.append("before", [_user("x")])
    await store.find_sessions()  # the index exists before the writers start
    run_children(_INDEX_WRITER, [[store.directory, f"w{i}", "40"] for i in range(4)])
    fresh = FileSystemStorage(store.directory)

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the index had to be rebuilt")

    monkeypatch.setattr(fresh._index, "_rebuild", no_rebuild)
    monkeypatch.setattr(store._index, "_rebuild", no_rebuild)
    truth = fresh._find_scanned(SessionQuery(), [])  # every session's files, read
    assert {"before", "shared", "w0-0", "w3-4"} <= {i.session_id for i in truth}
    for storage in (fresh, store):
        assert await storage.find_sessions() == truth
        for user in ("user-0", "user-1", "user-2"):
            mine = [i for i in truth if i.user_id == user]
            assert await storage.find_sessions(user_id=user) == mine


# -- the usage log: what appends add to the usage totals ------------------------------------


def _usage_of(info: object) -> tuple[int, int, int]:
    usage = info.usage  # type: ignore[attr-defined]
    return usage.prompt_tokens, usage.completion_tokens, usage.calls


async def test_an_append_with_usage_writes_the_log_not_the_meta_file(
    store: FileSystemStorage,
) -> None:
    await store.append("s", [ChatMessage.user("q")])
    meta = Path(store.directory) / "s.meta.json"
    before = meta.read_bytes(), meta.stat().st_mtime_ns
    for i in range(3):
        await store.append("s", [ChatMessage.assistant(f"a{i}")], usage=UsageTotals(10, 2, 1))
    assert (meta.read_bytes(), meta.stat().st_mtime_ns) == before  # never rewritten
    log = Path(store.directory) / "s.usage.log"
    lines = log.read_text().splitlines()
    assert [json.loads(line)["usage.calls"] for line in lines] == [1, 2, 3]  # running totals
    await store.add_usage("s", prompt_tokens=5, calls=1)  # the meta file's numbers add to it
    info = await store.get_info("s")
    assert info is not None and _usage_of(info) == (35, 6, 4)
    assert [i.usage for i in await store.find_sessions()] == [info.usage]
    await store.delete("s")
    assert not log.exists() and not meta.exists()
    await store.append("s", [ChatMessage.user("again")])
    info = await store.get_info("s")
    assert info is not None and _usage_of(info) == (0, 0, 0)


async def test_a_torn_usage_line_is_skipped_and_overwritten(store: FileSystemStorage) -> None:
    await store.append("s", [ChatMessage.user("q")], usage=UsageTotals(10, 2, 1))
    log = Path(store.directory) / "s.usage.log"
    with log.open("ab") as f:  # a crash in the middle of the next line's write
        f.write(b'{"usage.prompt_tokens": 99')
    info = await store.get_info("s")
    assert info is not None and _usage_of(info) == (10, 2, 1)
    await store.append("s", [ChatMessage.assistant("a")], usage=UsageTotals(1, 1, 1))
    info = await store.get_info("s")
    assert info is not None and _usage_of(info) == (11, 3, 2)
    assert all(json.loads(line) for line in log.read_text().splitlines())
    # a torn first line: no totals yet
    await store.append("t", [ChatMessage.user("q")])
    (Path(store.directory) / "t.usage.log").write_bytes(b'{"usage.ca')
    info = await store.get_info("t")
    assert info is not None and _usage_of(info) == (0, 0, 0)


async def test_a_long_usage_log_is_replaced_by_its_last_line(
    store: FileSystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("conversa.storage.filesystem._USAGE_LOG_LIMIT", 400)
    for i in range(40):
        await store.append("s", [ChatMessage.assistant(f"a{i}")], usage=UsageTotals(3, 1, 1))
    log = Path(store.directory) / "s.usage.log"
    assert log.stat().st_size <= 400
    info = await store.get_info("s")
    assert info is not None and _usage_of(info) == (120, 40, 40)
    assert not [p for p in Path(store.directory).iterdir() if p.name.endswith(".tmp")]


async def test_a_damaged_usage_log_is_named(store: FileSystemStorage) -> None:
    await store.append("s", [ChatMessage.user("q")], usage=UsageTotals(1, 1, 1))
    log = Path(store.directory) / "s.usage.log"
    for damage in (b"not json\n", b'{"usage.calls": -3}\n', b"x" * 5000):
        log.write_bytes(damage)
        with pytest.raises(CorruptSessionError, match="usage log"):
            await store.get_info("s")
        with pytest.raises(CorruptSessionError, match="usage log"):
            await store.append("s", [ChatMessage.assistant("a")], usage=UsageTotals(calls=1))
    assert await store.count("s") == 1  # each append was refused before it stored anything
    await store.delete("s")  # the way out the error names
    assert not log.exists()


async def test_the_temp_file_of_a_killed_usage_log_rewrite_is_swept(tmp_path: Path) -> None:
    first = FileSystemStorage(tmp_path / "sessions")
    await first.append("s", [ChatMessage.user("q")], usage=UsageTotals(calls=1))
    stale = tmp_path / "sessions" / ".s.usage.log.k1ll3d.tmp"
    stale.write_text('{"usage.calls": 1}\n')
    second = FileSystemStorage(tmp_path / "sessions")
    await second.append("s", [ChatMessage.assistant("a")])  # a new object's first write sweeps
    assert not stale.exists()


async def test_an_append_that_fails_takes_its_usage_back(
    store: FileSystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.append("s", [ChatMessage.user("q")], usage=UsageTotals(10, 2, 1))
    log = Path(store.directory) / "s.usage.log"
    before = log.read_bytes()

    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("conversa.storage.filesystem._write_all", disk_full)
    with pytest.raises(StorageError, match="No space left"):
        await store.append("s", [ChatMessage.assistant("a")], usage=UsageTotals(1, 1, 1))
    monkeypatch.undo()
    assert log.read_bytes() == before
    info = await store.get_info("s")
    assert info is not None and _usage_of(info) == (10, 2, 1) and info.message_count == 1


_DIES_BETWEEN = """
import asyncio, os, sys
import conversa.storage.filesystem as fs
from conversa import ChatMessage
from conversa.storage import UsageTotals

real = fs._write_all


def dying(fd, data):
    if b"DIES-HERE" in data:
        os._exit(3)  # killed after the usage line, before the history is written
    real(fd, data)


fs._write_all = dying
store = fs.FileSystemStorage(sys.argv[1])
asyncio.run(store.append("s", [ChatMessage.assistant("DIES-HERE")], usage=UsageTotals(4, 2, 1)))
"""


async def test_an_append_killed_before_its_messages_still_counts_its_model_call(
    store: FileSystemStorage,
) -> None:
    await store.append("s", [ChatMessage.user("q")], usage=UsageTotals(10, 2, 1))
    child = subprocess.run(
        [sys.executable, "-c", _DIES_BETWEEN, store.directory], timeout=60, capture_output=True
    )
    assert child.returncode == 3, child.stderr
    info = await store.get_info("s")
    assert info is not None and info.message_count == 1  # the reply was never written
    assert _usage_of(info) == (14, 4, 2)  # the call that produced it did happen
    await store.append("s", [ChatMessage.assistant("again")], usage=UsageTotals(1, 1, 1))
    info = await store.get_info("s")
    assert info is not None and info.message_count == 2 and _usage_of(info) == (15, 5, 3)
