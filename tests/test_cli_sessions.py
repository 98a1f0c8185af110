"""`conversa sessions ...` on real storage: file directories and SQLite databases."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _cli import kept, run_storage
from click.testing import CliRunner, Result

from conversa.cli._app import cli
from conversa.cli._export import parse_import
from conversa.compaction import SummaryRange, summary_record
from conversa.messages import ChatMessage
from conversa.model import Usage
from conversa.storage import ConversationStorage, FileSystemStorage, SqliteStorage, UsageTotals
from conversa.storage._stored import (
    COMPLETED_AT_KEY,
    RouteVisit,
    SessionFlow,
    SummaryMark,
    to_micros,
)

OLD = datetime.now(UTC) - timedelta(days=40)
T = TypeVar("T")


def conversation(*texts: str, when: datetime | None = None) -> list[ChatMessage]:
    """Alternating user/assistant messages."""
    stamp = when or datetime.now(UTC)
    return [
        ChatMessage(role="user" if i % 2 == 0 else "assistant", content=t, created_at=stamp)
        for i, t in enumerate(texts)
    ]


@pytest.fixture(params=["file", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return str(tmp_path / "sessions")
    return f"sqlite:///{tmp_path / 'sessions.db'}"


@pytest.fixture
def filled(url: str) -> str:
    """Storage holding two sessions: 'alice' (newest) and 'bob'."""

    async def fill(storage: ConversationStorage) -> None:
        await storage.save("bob", conversation("Tell me about otters", "Otters are mustelids."))
        await storage.set_state("bob", {"mood": "curious"})
        await storage.save(
            "alice",
            conversation("How do I sort a list?", "Use sorted(xs).", "And reversed?", "reversed"),
        )

    run_storage(url, fill)
    return url


@pytest.fixture
def runner() -> Iterator[CliRunner]:
    yield CliRunner()


def invoke(runner: CliRunner, url: str, *args: str, input: str | None = None) -> Result:
    """Run `conversa ARGS` with CONVERSA_STORAGE pointing at ``url``."""
    return runner.invoke(cli, list(args), env={"CONVERSA_STORAGE": url}, input=input)


def test_list_as_table_and_json(runner: CliRunner, filled: str) -> None:
    table = invoke(runner, filled, "sessions", "list")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["session", "messages", "updated", "title"]
    assert lines[1].split()[:2] == ["alice", "4"] and "How do I sort a list?" in lines[1]
    assert lines[2].split()[:2] == ["bob", "2"] and "Tell me about otters" in lines[2]

    data = json.loads(invoke(runner, filled, "sessions", "list", "--json").output)
    assert [(d["session_id"], d["messages"], d["title"]) for d in data] == [
        ("alice", 4, "How do I sort a list?"),
        ("bob", 2, "Tell me about otters"),
    ]
    assert datetime.fromisoformat(data[0]["updated_at"]) >= datetime.fromisoformat(
        data[1]["updated_at"]
    )


def test_storage_option_beats_the_environment(
    runner: CliRunner, filled: str, tmp_path: Path
) -> None:
    empty = str(tmp_path / "elsewhere")
    for args in (
        ["--storage", filled, "sessions", "list"],
        ["sessions", "list", "--storage", filled],
    ):
        result = runner.invoke(cli, args, env={"CONVERSA_STORAGE": empty})
        assert "alice" in result.output
    assert "no sessions yet" in invoke(runner, empty, "sessions", "list").output


def test_show_and_missing_session(runner: CliRunner, filled: str) -> None:
    shown = invoke(runner, filled, "sessions", "show", "bob")
    assert shown.exit_code == 0
    assert "[0] user: Tell me about otters" in shown.output
    assert "[1] assistant: Otters are mustelids." in shown.output
    assert '"mood": "curious"' in shown.output
    missing = invoke(runner, filled, "sessions", "show", "carol")
    assert missing.exit_code == 1
    assert "there is no session 'carol'" in missing.output
    assert "Traceback" not in missing.output


def test_show_last_reads_only_what_it_shows(
    runner: CliRunner, filled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(self: ConversationStorage, session_id: str) -> None:
        raise AssertionError(f"the whole history of {session_id!r} was read")

    for backend in (FileSystemStorage, SqliteStorage):
        monkeypatch.setattr(backend, "load", no_load)
    shown = invoke(
        runner, filled, "sessions", "show", "alice", "--last", "2", "--context-window", "4000"
    )
    assert shown.exit_code == 0, shown.output
    assert "alice: 4 messages" in shown.output
    assert "[2] user: And reversed?" in shown.output and "[3] assistant: reversed" in shown.output
    assert "How do I sort" not in shown.output.split("alice: 4 messages")[1]


def test_export_and_import_round_trip(runner: CliRunner, filled: str, tmp_path: Path) -> None:
    target = tmp_path / "bob.json"
    assert invoke(runner, filled, "sessions", "export", "bob", "-o", str(target)).exit_code == 0
    document = json.loads(target.read_text())
    assert document["format"] == "conversa.session" and document["state"] == {"mood": "curious"}

    again = invoke(runner, filled, "sessions", "import", str(target))
    assert again.exit_code == 1 and "session 'bob' exists" in again.output
    copied = invoke(runner, filled, "sessions", "import", str(target), "--as", "bob2")
    assert copied.exit_code == 0 and "imported 2 messages into bob2" in copied.output

    original = run_storage(filled, lambda s: s.load("bob"))
    imported = run_storage(filled, lambda s: s.load("bob2"))
    assert [m.to_dict() for m in imported] == [m.to_dict() for m in original]
    assert run_storage(filled, lambda s: s.get_state("bob2")) == {"mood": "curious"}

    markdown = invoke(runner, filled, "sessions", "export", "alice", "--format", "md")
    assert markdown.exit_code == 0
    assert markdown.output.startswith("# alice")
    assert "### user" in markdown.output and "Use sorted(xs)." in markdown.output


def test_import_a_plain_json_array(runner: CliRunner, url: str, tmp_path: Path) -> None:
    plain = tmp_path / "user-7.json"
    plain.write_text(
        json.dumps(
            [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi ✓"},
                {"role": "assistant", "content": "Hello!"},
            ]
        )
    )
    result = invoke(runner, url, "sessions", "import", str(plain))
    assert result.exit_code == 0, result.output
    history = run_storage(url, lambda s: s.load("user-7"))
    assert [(m.role, m.text) for m in history] == [
        ("system", "Be kind."),
        ("user", "Hi ✓"),
        ("assistant", "Hello!"),
    ]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"content": "no role"}]')
    failed = invoke(runner, url, "sessions", "import", str(broken))
    assert failed.exit_code == 1 and "message 0 cannot be read" in failed.output


def test_delete_asks_unless_yes(runner: CliRunner, filled: str) -> None:
    kept = invoke(runner, filled, "sessions", "delete", "bob", input="n\n")
    assert kept.exit_code != 0 and "delete session bob (2 messages)?" in kept.output
    assert run_storage(filled, lambda s: s.exists("bob"))
    deleted = invoke(runner, filled, "sessions", "delete", "bob", input="y\n")
    assert deleted.exit_code == 0 and "deleted bob" in deleted.output
    assert not run_storage(filled, lambda s: s.exists("bob"))
    assert invoke(runner, filled, "sessions", "delete", "alice", "--yes").exit_code == 0
    assert run_storage(filled, lambda s: s.list_sessions()) == []
    assert invoke(runner, filled, "sessions", "delete", "alice", "--yes").exit_code == 1


def age(url: str, session_id: str) -> None:
    """Make a session look untouched for 40 days, as the backend measures it."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute(
                "UPDATE sessions SET updated_at = ?, created_at = ? WHERE id = ?",
                (int(OLD.timestamp() * 1e6), int(OLD.timestamp() * 1e6), session_id),
            )
        return
    for path in Path(url).iterdir():
        if path.name == session_id + ".meta.json":  # the file backend's readable info file
            meta = json.loads(path.read_text())
            path.write_text(json.dumps({**meta, "created_at": OLD.isoformat()}))
        if path.name.startswith(session_id + "."):
            os.utime(path, (OLD.timestamp(), OLD.timestamp()))


def test_prune_older_than(runner: CliRunner, url: str) -> None:
    run_storage(url, lambda s: s.save("old", conversation("ancient", "history", when=OLD)))
    age(url, "old")
    run_storage(url, lambda s: s.save("new", conversation("fresh")))

    dry = invoke(runner, url, "sessions", "prune", "--older-than", "30d", "--dry-run")
    assert (
        dry.exit_code == 0 and "old" in dry.output and "1 sessions would be deleted" in dry.output
    )
    assert run_storage(url, lambda s: s.exists("old"))
    assert (
        "no session is older than 6w"
        in invoke(runner, url, "sessions", "prune", "--older-than", "6w").output
    )
    done = invoke(runner, url, "sessions", "prune", "--older-than", "30d", "--yes")
    assert done.exit_code == 0 and "deleted 1 sessions" in done.output
    assert run_storage(url, lambda s: s.list_sessions()) == ["new"]
    bad = invoke(runner, url, "sessions", "prune", "--older-than", "soon")
    assert bad.exit_code == 2 and "45s, 90m, 12h, 30d, 2w" in bad.output


DAMAGE = {
    "meta": ("broken.meta.json", b'{"created_at": '),
    "first line": ("broken.jsonl", b"not json\n"),
}


def damage(directory: str, how: str) -> Path:
    """Break the file session 'broken' as a bad disk or hand edit would; the broken file."""
    name, data = DAMAGE[how]
    path = Path(directory) / name
    if how == "first line":
        data += path.read_bytes()
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("url", ["file"], indirect=True)
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_list_reports_a_damaged_session_and_shows_the_rest(
    runner: CliRunner, filled: str, how: str
) -> None:
    run_storage(filled, lambda s: s.save("broken", conversation("hi")))
    broken = damage(filled, how)
    for args in (["sessions", "list"], ["sessions", "list", "--json"]):
        result = invoke(runner, filled, *args)
        assert result.exit_code == 0, result.output
        warning = result.stderr.splitlines()
        assert len(warning) == 1 and warning[0].startswith("warning: left out a damaged session")
        assert str(broken) in warning[0]
        assert "alice" in result.stdout and "bob" in result.stdout
        assert "broken" not in result.stdout
    rows = json.loads(result.stdout)
    assert [r["session_id"] for r in rows] == ["alice", "bob"]


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_prune_deletes_the_old_sessions_but_a_damaged_one(
    runner: CliRunner, tmp_path: Path, how: str
) -> None:
    url = str(tmp_path / "sessions")
    for sid in ("old", "broken"):
        run_storage(url, lambda s, sid=sid: s.save(sid, conversation("ancient", when=OLD)))
        age(url, sid)
    run_storage(url, lambda s: s.save("new", conversation("fresh")))
    broken = damage(url, how)
    done = invoke(runner, url, "sessions", "prune", "--older-than", "30d", "--yes")
    assert done.exit_code == 0, done.output
    assert "deleted 1 sessions" in done.stdout
    assert done.stderr.startswith("warning: left out a damaged session") and str(broken) in (
        done.stderr
    )
    sessions_files = (p.name for p in Path(url).iterdir() if p.name[0] != ".")  # not the index
    assert sorted(sessions_files) == [  # the damaged one: never unseen
        "broken.jsonl",
        "broken.meta.json",
        "new.jsonl",
        "new.meta.json",
    ]


def test_search_across_sessions(runner: CliRunner, filled: str) -> None:
    result = invoke(runner, filled, "sessions", "search", "otters")
    assert result.exit_code == 0
    assert sorted(result.output.splitlines()) == [
        "bob #0 user: Tell me about otters",
        "bob #1 assistant: Otters are mustelids.",
    ]
    sorted_ = invoke(runner, filled, "sessions", "search", "sorted")
    assert "alice #1 assistant: Use sorted(xs)." in sorted_.output
    assert (
        "no message contains 'zebra'"
        in invoke(runner, filled, "sessions", "search", "zebra").output
    )


def test_migrate_file_to_sqlite_and_back(runner: CliRunner, tmp_path: Path) -> None:
    files = str(tmp_path / "files")
    db = f"sqlite:///{tmp_path / 'migrated.db'}"
    back = f"file://{tmp_path / 'back'}"

    async def fill(storage: ConversationStorage) -> None:
        for n in range(5):
            await storage.save(
                f"user-{n}", conversation(*(f"message {n}.{i}" for i in range(n + 1)))
            )
        await storage.set_state("user-3", {"plan": ["a", "b"], "count": 3})
        await storage.update_info("user-3", title="Planning", user_id="u3", status="completed")

    run_storage(files, fill)
    for _ in range(2):  # running it again is safe and changes nothing
        result = invoke(runner, files, "sessions", "migrate", "--to", db)
        assert result.exit_code == 0, result.output
        assert "migrated 5 sessions (15 messages); verified" in result.output
    assert invoke(runner, files, "sessions", "migrate", "--from", db, "--to", back).exit_code == 0

    Snapshot = tuple[list[dict[str, Any]], dict[str, Any], tuple[str | None, str | None, str]]

    async def snapshot(storage: ConversationStorage) -> dict[str, Snapshot]:
        out: dict[str, Snapshot] = {}
        for sid in await storage.list_sessions():
            info = await storage.get_info(sid)
            assert info is not None
            out[sid] = (
                [m.to_dict() for m in await storage.load(sid)],
                await storage.get_state(sid),
                (info.title, info.user_id, info.status),
            )
        return out

    source = run_storage(files, snapshot)
    assert run_storage(db, snapshot) == source
    assert run_storage(back, snapshot) == source
    _, state, info = source["user-3"]
    assert state == {"plan": ["a", "b"], "count": 3}
    assert info == ("Planning", "u3", "completed")
    assert run_storage(db, lambda s: s.list_sessions()) == run_storage(
        files, lambda s: s.list_sessions()
    )

    same = invoke(runner, files, "sessions", "migrate", "--from", files, "--to", files)
    assert same.exit_code == 1 and "same storage" in same.output


def summary_of(messages: list[ChatMessage]) -> ChatMessage:
    """A summary record covering ``messages``, as compaction stores one."""
    covers = SummaryRange(messages[0].id, messages[-1].id, len(messages))
    return summary_record(
        "they talked", covers, model="m", tokens_before=9, tokens_after=3, usage=Usage(5, 1)
    )


def fidelity(url: str, session_id: str) -> tuple[Any, ...]:
    """What a copy must keep of the session (see _cli.kept)."""
    return run_storage(url, lambda storage: kept(storage, session_id))


@pytest.fixture
def aged(tmp_path: Path) -> str:
    """A file storage with one session last written 40 days ago, with expiring state keys."""
    files = str(tmp_path / "files")

    async def fill(storage: ConversationStorage) -> None:
        history = conversation("ancient", "history", "more", when=OLD)
        await storage.save("old", [*history, summary_of(history[:2])])
        # what compaction keeps beside the history: the totals and where the summary is
        await storage.add_usage("old", prompt_tokens=120, completion_tokens=30, calls=3)
        await storage.set_summary_mark("old", SummaryMark(3, 1))
        await storage.set_state("old", {"token": "t"}, ttl=6)
        await storage.set_state("old", {"until": 1}, expires_at=datetime(2999, 1, 1, tzinfo=UTC))
        await storage.set_state("old", {"kept": [1]})
        await storage.update_info("old", user_id="u", status="completed", metadata={"k": 1})
        visit = RouteVisit("onboarding", OLD, OLD + timedelta(minutes=5), completed=True)
        flow = SessionFlow("billing", "card", OLD, OLD, (visit,), {"onboarding": {"name": "Al"}})
        await storage.set_flow("old", flow)
        # completed 40 days ago, as the history (a copy must keep the moment, not make one)
        await storage._change_reserved("old", {}, {COMPLETED_AT_KEY: to_micros(OLD)})

    run_storage(files, fill)
    age(files, "old")
    return files


def test_migrate_keeps_times_and_the_expiry_of_state_keys(
    runner: CliRunner, aged: str, tmp_path: Path
) -> None:
    before = fidelity(aged, "old")
    assert before[2][1] < datetime.now(UTC) - timedelta(days=39)
    token = before[3]["token"][1]
    assert before[4] == (UsageTotals(120, 30, 3), SummaryMark(3, 1))
    assert before[5][0].route == "billing" and before[5][0].history[0].completed
    assert before[5][1] is not None and before[5][1] < datetime.now(UTC) - timedelta(days=39)
    assert token is not None and token < datetime.now(UTC) + timedelta(seconds=7)
    db = f"sqlite:///{tmp_path / 'migrated.db'}"
    back = str(tmp_path / "back")
    assert invoke(runner, aged, "sessions", "migrate", "--to", db).exit_code == 0
    assert invoke(runner, aged, "sessions", "migrate", "--from", db, "--to", back).exit_code == 0
    assert fidelity(db, "old") == before
    assert fidelity(back, "old") == before
    pruned = invoke(runner, db, "sessions", "prune", "--older-than", "30d", "--dry-run")
    assert pruned.exit_code == 0 and "1 sessions would be deleted" in pruned.output


def test_export_and_import_keep_times_info_and_expiry(
    runner: CliRunner, aged: str, url: str, tmp_path: Path
) -> None:
    exported = tmp_path / "old.json"
    assert invoke(runner, aged, "sessions", "export", "old", "-o", str(exported)).exit_code == 0
    result = invoke(runner, url, "sessions", "import", str(exported))
    assert result.exit_code == 0, result.output
    assert fidelity(url, "old") == fidelity(aged, "old")
    document = json.loads(exported.read_text())
    document["state_expires_at"]["kept"] = "next tuesday"
    document["state"]["kept"] = 2
    exported.write_text(json.dumps(document))
    bad = invoke(runner, url, "sessions", "import", str(exported), "--replace")
    assert bad.exit_code == 1
    assert "state_expires_at['kept'] is not an ISO 8601 time" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ('[{"content": "no role"}]', (ValueError, TypeError, KeyError)),
        ('{"messages": [], "state": {"k": 1}, "state_expires_at": {"k": "soon"}}', ValueError),
        ('{"role": "user", "content": "hi"}\n{not json\n', json.JSONDecodeError),
    ],
)
def test_import_errors_chain_their_cause(text: str, cause: type[Exception]) -> None:
    """--debug shows why an export cannot be read: the error keeps its cause."""
    with pytest.raises(ValueError, match=r"bad\.json") as info:
        parse_import(text, "bad.json")
    assert isinstance(info.value.__cause__, cause)


def test_version_and_help_import_nothing_heavy(runner: CliRunner) -> None:
    from conversa import __version__

    assert runner.invoke(cli, ["--version"]).output.strip() == f"conversa, version {__version__}"
    # start-up speed: --help must not pull in the heavy libraries (timings: bench/startup.py)
    probe = (
        "import sys\n"
        "from conversa.cli._app import cli\n"
        "try:\n"
        "    cli(['--help'], prog_name='conversa')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ['openai', 'rich', 'prompt_toolkit', 'pydantic', 'aiosqlite', 'httpx']\n"
        "print('LOADED', [m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "LOADED []" in done.stdout, done.stdout + done.stderr


def test_errors_are_one_line_and_debug_shows_the_traceback(runner: CliRunner) -> None:
    plain = runner.invoke(cli, ["sessions", "list", "--storage", "bogus://nowhere"])
    assert plain.exit_code == 1
    assert plain.output.startswith("error: unknown storage URL scheme 'bogus://'")
    assert "Traceback" not in plain.output
    debug = runner.invoke(cli, ["--debug", "sessions", "list", "--storage", "bogus://nowhere"])
    assert debug.exit_code == 1
    assert "Traceback (most recent call last)" in debug.output
    assert "UnsupportedStorageURL" in debug.output


def test_list_shows_a_page_by_default(runner: CliRunner, url: str) -> None:
    async def fill(storage: ConversationStorage) -> None:
        for i in range(23):
            await storage.append(f"s{i:02d}", conversation(f"q{i}"))

    run_storage(url, fill)
    page = invoke(runner, url, "sessions", "list")
    assert page.exit_code == 0, page.output
    shown = [f"s{i:02d}" for i in range(23) if f"s{i:02d}" in page.stdout]
    assert shown == [f"s{i:02d}" for i in range(3, 23)]  # the newest 20
    assert "there are more" in page.stderr and "--all" in page.stderr  # a note, not a row
    every = invoke(runner, url, "sessions", "list", "--all")
    assert all(f"s{i:02d}" in every.stdout for i in range(23))
    assert "there are more" not in every.output
    few = json.loads(invoke(runner, url, "sessions", "list", "--json", "--limit", "2").stdout)
    assert [r["session_id"] for r in few] == ["s22", "s21"]
    exact = invoke(runner, url, "sessions", "list", "--limit", "23")
    assert "s00" in exact.stdout and "there are more" not in exact.output
    assert invoke(runner, url, "sessions", "list", "--limit", "0").exit_code == 2
