"""What the chat REPL shows and how it behaves, read back from a terminal emulator.

The real `conversa chat` runs in a pseudo-terminal against a FakeOpenAIServer on 127.0.0.1;
every byte it writes is fed to a pyte terminal emulator, so a test can read the scrollback
as a user would see it (and count how often a word is in it).
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pexpect
import pyte
from _cli import CONVERSA, TIMEOUT, conversa, run_storage, stored
from _wait import wait_until

from conversa.messages import ChatMessage
from conversa.testing.replies import model_not_found, rate_limited, text
from conversa.testing.server import FakeOpenAIServer

ROWS, COLUMNS = 45, 100
PROMPT = b"alice> "


class Terminal:
    """`conversa chat` in a pty of ROWS x COLUMNS, its output replayed in a terminal emulator."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.child = pexpect.spawn(
            CONVERSA, ["chat", *args], env=env, dimensions=(ROWS, COLUMNS), timeout=TIMEOUT
        )
        self.screen = pyte.HistoryScreen(COLUMNS, ROWS, history=100_000)
        self.stream = pyte.ByteStream(self.screen)

    def expect(self, pattern: bytes | str) -> None:
        """Wait for ``pattern`` (exact bytes, or a regular expression given as str)."""
        if isinstance(pattern, str):
            self.child.expect(pattern.encode())
        else:
            self.child.expect_exact(pattern)
        self.stream.feed(self.child.before + self.child.after)

    def say(self, line: str, *expected: bytes, prompt: bytes = PROMPT) -> None:
        """Send a line, wait for each expected text and for the next prompt."""
        self.child.sendline(line)
        for pattern in expected:
            self.expect(pattern)
        self.expect(prompt)

    def lines(self) -> list[str]:
        """The scrollback and the screen, one string per terminal row."""
        rows = [
            "".join(line[x].data for x in range(COLUMNS)).rstrip()
            for line in self.screen.history.top
        ]
        return rows + [row.rstrip() for row in self.screen.display]

    def text(self) -> str:
        """Everything the user can scroll through, as text."""
        return "\n".join(self.lines())

    def quit(self) -> None:
        """Ctrl-D, and the program ends cleanly."""
        self.child.sendcontrol("d")
        self.child.expect(pexpect.EOF)
        self.stream.feed(self.child.before)
        self.child.close()
        assert self.child.exitstatus == 0


def piped(
    env: dict[str, str], lines: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`conversa chat` with ``lines`` on a pipe (no terminal)."""
    return conversa(env, "chat", stdin=lines, cwd=cwd)


def word_counts(text_: str) -> Counter[str]:
    return Counter(re.findall(r"\bw\d{4}\b", text_))


# -- item 11: what was shown is in the scrollback once ------------------------------------


def test_a_long_streamed_answer_is_in_the_scrollback_once(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    words = [f"w{i:04d}" for i in range(1500)]
    paragraphs = [" ".join(words[i : i + 60]) for i in range(0, len(words), 60)]
    server.add_reply(text("\n\n".join(paragraphs)))
    term = Terminal(env)
    term.expect(PROMPT)
    term.say("a long story please", b"w1499")
    term.quit()
    counts = word_counts(term.text())
    assert sorted(counts) == words
    assert [w for w, n in counts.items() if n != 1] == []


def test_ctrl_c_keeps_the_partial_answer_on_screen_once(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    gate = threading.Event()  # holds back the last word until Ctrl-C was pressed
    server.gate = gate
    first = " ".join(f"w{i:04d}" for i in range(10))
    second = " ".join(f"w{i:04d}" for i in range(10, 40))
    server.add_reply(text(f"{first}\n\n{second} never"))
    term = Terminal(env)
    term.expect(PROMPT)
    term.child.sendline("tell me")
    term.expect(b"w0039")
    term.child.sendcontrol("c")
    term.expect(b"the partial answer is kept")
    term.expect(PROMPT)
    gate.set()
    term.quit()
    counts = word_counts(term.text())
    assert len(counts) == 40
    assert set(counts.values()) == {1}, counts
    assert "never" not in term.text()


def test_ctrl_c_before_any_text_does_not_claim_a_partial_answer(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    gate = threading.Event()
    server.gate = gate
    server.add_reply(text("unsent"))  # one piece: the gate holds back all of the text
    term = Terminal(env)
    term.expect(PROMPT)
    term.child.sendline("hello?")
    wait_until(lambda: len(server.requests) == 1, "the request", TIMEOUT)
    term.child.sendcontrol("c")
    term.expect("interrupted")
    term.expect(PROMPT)
    gate.set()
    term.quit()
    assert "⏹ interrupted" in term.text()
    assert "partial answer" not in term.text()
    assert [m.role for m in stored(env)] == ["user"]


# -- item 12: line breaks as written ------------------------------------------------------


def test_single_line_breaks_are_kept_in_answers_and_history(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    server.add_reply(text("Roses are red,\nviolets are blue\n\n```\ncode line\n```"))
    term = Terminal(env)
    term.expect(PROMPT)
    term.say("a poem", b"blue")
    term.say("/history", b"[1]", b"blue")
    term.quit()
    lines = term.lines()
    assert lines.count("Roses are red,") == 2, lines
    assert lines.count("violets are blue") == 2


# -- item 13: piped chat fails when its turns fail -----------------------------------------


def test_piped_chat_exits_non_zero_when_a_turn_fails(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    server.add_reply(model_not_found())
    failed = piped(env, "first\nsecond\n")
    assert failed.returncode == 1, failed.stderr
    assert "fake-model" in failed.stderr and "Traceback" not in failed.stderr
    assert failed.stdout == "echo: second\n"  # the next line was still answered

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = piped({**env, "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"}, "anyone?\n")
    assert down.returncode == 1
    assert "no server answers" in down.stderr

    assert piped(env, "fine\n/nosuch\n").returncode == 0  # a mistyped command fails no turn


# -- item 14: /clear asks, and /undo brings the messages back --------------------------------


def test_clear_asks_first_and_undo_brings_the_messages_back(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    term = Terminal(env)
    term.expect(PROMPT)
    term.say("one", b"echo: one")
    term.say("two", b"echo: two")
    term.say("/clear", b"delete all 4 messages of alice?", prompt=b"[y/n]")
    term.say("n", b"nothing deleted")
    assert len(stored(env)) == 4
    term.say("/clear", b"delete all 4 messages", prompt=b"[y/n]")
    term.say("y", b"cleared 4 messages from alice; /undo brings them back")
    assert stored(env) == []
    term.say("/undo", b"brought back the 4 messages /clear deleted")
    term.say("/undo", b"removed 2 messages")  # now an ordinary undo again
    term.quit()
    assert [m.text for m in stored(env)] == ["one", "echo: one"]


def test_piped_clear_needs_yes(env: dict[str, str]) -> None:
    refused = piped(env, "one\n/clear\n")
    assert refused.returncode == 0
    assert "no terminal to answer; add --yes" in refused.stderr
    assert len(stored(env)) == 2
    cleared = piped(env, "/clear --yes\n")
    assert "cleared 2 messages" in cleared.stderr
    assert stored(env) == []


# -- item 16: sloppy arguments get a clear answer ------------------------------------------


def test_commands_refuse_arguments_they_do_not_take(env: dict[str, str], tmp_path: Path) -> None:
    existing = tmp_path / "root.md"
    existing.write_text("keep me")
    result = piped(
        env,
        "one\n/undo extra\n/model a b\n/history 0\n/history -3\n/export root.md\n"
        "/export notes.txt\n/clear --now\n/system --clear\n",
        cwd=tmp_path,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: /undo takes no argument, not 'extra' (usage: /undo)",
        "error: /model takes one argument, not 'a b' (usage: /model [NAME])",
        "error: /history takes a whole number from 1 up, not '0' (usage: /history [N])",
        "error: /history takes a whole number from 1 up, not '-3' (usage: /history [N])",
        "error: root.md exists; overwrite it? there is no terminal to answer; add --force to "
        "go ahead",
        "error: /export writes .md (Markdown) or .json files, not 'notes.txt'",
        "error: /clear has no option --now (usage: /clear [--yes])",
    ]
    assert len(stored(env)) == 2  # nothing was undone
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "notes.txt").exists()
    forced = piped(env, "/export root.md --force\n", cwd=tmp_path)
    assert "exported 2 messages to root.md" in forced.stderr
    assert "echo: one" in existing.read_text()


def test_export_asks_before_overwriting(env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "chat.md"
    target.write_text("keep me")
    term = Terminal(env)
    term.expect(PROMPT)
    term.say(f"/export {target}", b"exists; overwrite it?", prompt=b"[y/n]")
    term.say("n", b"not exported")
    assert target.read_text() == "keep me"
    term.say(f"/export {target}", b"overwrite it?", prompt=b"[y/n]")
    term.say("y", b"exported 0 messages")
    term.quit()
    assert target.read_text().startswith("# alice")


# -- item 18: honest status lines ----------------------------------------------------------


def test_count_says_unknown_when_the_server_reported_no_usage(env: dict[str, str]) -> None:
    seed = [ChatMessage.user("imported"), ChatMessage.assistant("no usage here")]
    run_storage(env["CONVERSA_STORAGE"], lambda storage: storage.append("alice", seed))
    unknown = piped(env, "/count\n")
    assert "tokens used: unknown (the server reported no usage)" in unknown.stdout
    mixed = piped(env, "more\n/count\n")
    assert re.search(
        r"tokens used: \d+ \(prompt \d+, completion \d+; not counted: 1 answer without "
        r"reported usage\)",
        mixed.stdout,
    ), mixed.stdout


def test_a_stalled_stream_is_reported_as_a_timeout(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    gate = threading.Event()  # never set: the last word never comes
    server.gate = gate
    server.add_reply(text("the start of an answer"))
    try:
        result = piped({**env, "CONVERSA_TIMEOUT": "0.5"}, "hello\n")
    finally:
        gate.set()
    assert result.returncode == 1
    assert "timed out: the answer from" in result.stderr
    assert "stalled (nothing for 0.5s)" in result.stderr
    assert "broke" not in result.stderr
    assert result.stdout.startswith("the start of an")


def test_rate_limit_retries_are_announced(env: dict[str, str], server: FakeOpenAIServer) -> None:
    server.add_reply(rate_limited(retry_after=0.01))
    term = Terminal(env)
    term.expect(PROMPT)
    term.say("hi", b"rate limited, retrying in 0.01 s (retry 1 of 3)", b"echo: hi")
    term.quit()


# -- item 19: the SDK is imported while the user types --------------------------------------


def test_the_openai_sdk_is_imported_while_the_first_message_is_typed(env: dict[str, str]) -> None:
    # Python reports each finished import on stderr, which the pty shows
    term = Terminal({**env, "PYTHONPROFILEIMPORTTIME": "1"})
    term.expect(PROMPT)
    term.expect(r"\| +openai\._")  # the SDK's modules, and nothing has been sent yet
    term.quit()
