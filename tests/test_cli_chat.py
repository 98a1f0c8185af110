"""The `conversa chat` REPL, driven as a real process in a pseudo-terminal.

Each test starts the real `conversa` command under pexpect, talking to a FakeOpenAIServer
(a real OpenAI-compatible HTTP server on 127.0.0.1) and storing sessions in a temporary
directory; the assertions read what the terminal showed, what the server received and what
the storage holds.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pexpect
from _cli import PROMPT, conversa, quit_, say, spawn, stored

from conversa.testing.replies import model_not_found, text, tool_call
from conversa.testing.server import FakeOpenAIServer


def user_texts(request: dict[str, Any]) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "user"]


def test_conversation_persists_across_restarts(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    child = spawn(env)
    child.expect_exact("new session alice")
    child.expect_exact(PROMPT)
    say(child, "hello there", "echo: hello there")
    say(child, "what did I say?", "echo: what did I say?")
    say(child, "/system answer briefly", "system prompt set")
    say(child, "third message", "echo: third message")
    # the model saw the whole conversation, and the system prompt
    last = server.requests[-1]
    assert user_texts(last) == ["hello there", "what did I say?", "third message"]
    assert last["messages"][0] == {"role": "system", "content": "answer briefly"}
    # Ctrl-C at the prompt clears the line instead of sending it
    child.send("half a thought")
    child.sendcontrol("c")
    child.expect_exact(PROMPT)
    say(child, "/exit")  # nothing after the prompt; exits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert len(server.requests) == 3

    child = spawn(env)
    child.expect_exact("resumed alice: 6 messages")
    child.expect_exact("system prompt: answer briefly")
    child.expect_exact(PROMPT)
    say(child, "and now?", "echo: and now?")
    quit_(child)
    last = server.requests[-1]
    assert user_texts(last) == ["hello there", "what did I say?", "third message", "and now?"]
    assert last["messages"][0]["content"] == "answer briefly"
    assert [m.role for m in stored(env)] == ["user", "assistant"] * 4
    # the input history is kept in a file for the next start
    history = (Path(env["HOME"]) / ".conversa_history").read_text()
    assert "+hello there" in history and "+/system answer briefly" in history
    assert "half a thought" not in history


def test_count_and_clear(env: dict[str, str], server: FakeOpenAIServer) -> None:
    server.usage = (10, 5)
    child = spawn(env)
    child.expect_exact(PROMPT)
    say(child, "one", "echo: one")
    say(child, "two", "echo: two")
    say(
        child,
        "/count",
        "4 messages (assistant 2, user 2)",
        "tokens used: 30 (prompt 20, completion 10)",
    )
    say(child, "/clear", "delete all 4 messages of alice?", prompt="[y/n]")
    say(child, "y", "cleared 4 messages from alice")
    say(child, "/count", "0 messages", "tokens used: 0")
    say(child, "three", "echo: three")
    quit_(child)
    assert [m.text for m in stored(env)] == ["three", "echo: three"]
    assert user_texts(server.requests[-1]) == ["three"]


def test_undo_and_retry(env: dict[str, str], server: FakeOpenAIServer) -> None:
    server.add_reply(text("first answer"), text("second answer"), text("a better answer"))
    child = spawn(env)
    child.expect_exact(PROMPT)
    say(child, "one", "first answer")
    say(child, "two", "second answer")
    say(child, "/retry", "a better answer")
    # the retry asked the same question again, without duplicating it
    assert user_texts(server.requests[-1]) == ["one", "two"]
    assert [m.text for m in stored(env)] == ["one", "first answer", "two", "a better answer"]
    say(child, "/undo", "removed 2 messages")
    assert [m.text for m in stored(env)] == ["one", "first answer"]
    say(child, "/history", "[0]", "user", "one", "[1]", "assistant", "first answer")
    say(child, "after undo", "echo: after undo")
    quit_(child)
    assert user_texts(server.requests[-1]) == ["one", "after undo"]


def test_switch_new_fork_and_search(env: dict[str, str], server: FakeOpenAIServer) -> None:
    child = spawn(env)
    child.expect_exact(PROMPT)
    say(child, "the alpha question", "echo: the alpha question")
    say(child, "/new work", "new session work", prompt="work> ")
    say(child, "a work question", "echo: a work question", prompt="work> ")
    assert user_texts(server.requests[-1]) == ["a work question"]
    say(child, "/sessions", "* work", "alice", "the alpha question", prompt="work> ")
    say(child, "/switch nowhere", "there is no session 'nowhere'", prompt="work> ")
    say(child, "/new alice", "session 'alice' exists", prompt="work> ")
    say(child, "/switch alice", "resumed alice: 2 messages")
    say(child, "back again", "echo: back again")
    assert user_texts(server.requests[-1]) == ["the alpha question", "back again"]
    say(child, "/fork side", "forked alice into side (4 messages)", prompt="side> ")
    say(child, "only on the side", "echo: only on the side", prompt="side> ")
    say(child, "/search alpha", "side #0 user: ", "alpha", "alice #0 user: ", prompt="side> ")
    quit_(child)
    assert len(stored(env, "alice")) == 4
    assert len(stored(env, "side")) == 6
    assert [m.text for m in stored(env, "work")] == ["a work question", "echo: a work question"]


def test_ctrl_c_cancels_the_streaming_answer_only(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    gate = threading.Event()  # holds back the answer's last word until the test is done
    server.gate = gate
    server.add_reply(text("alpha beta gamma delta epsilon"))
    child = spawn(env)
    child.expect_exact(PROMPT)
    child.sendline("tell me a long story")
    child.expect_exact("gamma delta")  # streamed before the whole answer exists
    child.sendcontrol("c")
    child.expect_exact("interrupted")
    child.expect_exact(PROMPT)
    server.gate = None
    gate.set()
    say(child, "are you still there?", "echo: are you still there?")
    quit_(child)
    history = stored(env)
    assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]
    partial = history[1]
    assert partial.metadata.get("interrupted") is True
    assert partial.text.startswith("alpha beta gamma")
    assert "epsilon" not in partial.text
    # the next request carried the kept partial answer, and was valid
    sent = server.requests[-1]["messages"]
    assert sent[1]["role"] == "assistant" and sent[1]["content"].startswith("alpha beta")


def test_tool_call_asks_for_approval(env: dict[str, str], server: FakeOpenAIServer) -> None:
    page = f"{server.url}/v1/models"  # any local HTTP page will do
    server.add_reply(
        tool_call("fetch_url", {"url": page}),
        text("The page lists fake-model."),
        tool_call("fetch_url", {"url": page}),
        text("Fine, I did not fetch it."),
        tool_call("fetch_url", {"url": page}),
        text("Fetched without asking."),
        tool_call("fetch_url", {"url": page}),
        text("Again without asking."),
    )
    child = spawn(env, "--tools", "fetch_url", "--allow-private-fetch")  # the page is local
    child.expect_exact(PROMPT)
    child.sendline("what models are there?")
    child.expect_exact("[y/n/always]")
    child.sendline("y")
    child.expect_exact("fetch_url(url=")
    child.expect_exact("fake-model")  # the shortened result
    child.expect_exact("The page lists fake-model.")
    child.expect_exact(PROMPT)
    tool_message = server.requests[1]["messages"][-1]
    assert tool_message["role"] == "tool" and "fake-model" in tool_message["content"]

    child.sendline("fetch it again")
    child.expect_exact("[y/n/always]")
    child.sendline("n")
    child.expect_exact("Fine, I did not fetch it.")
    child.expect_exact(PROMPT)
    assert "did not approve" in server.requests[3]["messages"][-1]["content"]

    child.sendline("and once more")
    child.expect_exact("[y/n/always]")
    child.sendline("always")
    child.expect_exact("Fetched without asking.")
    child.expect_exact(PROMPT)
    # "always" holds for the rest of the chat: no question this time
    child.sendline("last time")
    index = child.expect_exact(["[y/n/always]", "Again without asking."])
    assert index == 1
    child.expect_exact(PROMPT)
    say(child, "/tools", "fetch_url", "asks first")
    quit_(child)
    roles = [m.role for m in stored(env)]
    assert roles == ["user", "assistant", "tool", "assistant"] * 4


def test_server_down_keeps_the_repl(env: dict[str, str]) -> None:
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    child = spawn(env)
    child.expect_exact(PROMPT)
    child.sendline("anyone there?")
    child.expect(r"error: [^\r\n]*127\.0\.0\.1")
    child.expect_exact(PROMPT)
    output = str(child.before)
    say(child, "/count", "1 message (user 1)")
    quit_(child)
    assert "Traceback" not in output
    assert [m.text for m in stored(env)] == ["anyone there?"]


def test_without_a_model_it_starts_and_explains(env: dict[str, str]) -> None:
    for key in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CONVERSA_MODEL"):
        env.pop(key)
    # nothing configured and nothing on the local ports it probes (unless a real Ollama runs)
    child = spawn(env)
    child.expect_exact("OPENAI_BASE_URL")
    child.expect_exact(PROMPT)
    say(child, "/help", "/history", "/switch")
    say(child, "hello?", "CONVERSA_MODEL")
    say(child, "/count", "0 messages")
    quit_(child)


def test_commands_completion_paste_and_export(
    env: dict[str, str], server: FakeOpenAIServer, tmp_path: Path
) -> None:
    child = spawn(env)
    child.expect_exact(PROMPT)
    # bracketed paste: several lines stay one message
    child.send("\x1b[200~first line\nsecond line\x1b[201~")
    child.send("\r")
    child.expect_exact("echo: first line")
    child.expect_exact(PROMPT)
    assert user_texts(server.requests[-1]) == ["first line\nsecond line"]
    # Esc+Enter inserts a newline, Enter sends
    child.send("top\x1b\rbottom\r")
    child.expect_exact("echo: top")
    child.expect_exact(PROMPT)
    assert user_texts(server.requests[-1])[-1] == "top\nbottom"
    # Tab completes slash commands
    child.send("/cou")
    child.expect_exact(" /count ")  # the completion menu, offered while typing
    child.send("\t")
    child.expect_exact("nt")  # Tab completed the line to /count
    child.send("\r")
    child.expect_exact("4 messages (assistant 2, user 2)")
    child.expect_exact(PROMPT)
    say(child, "/hsitory", "unknown command /hsitory; did you mean /history?")
    assert len(server.requests) == 2  # the mistyped command never reached the model
    say(child, "/model other-model", "model: other-model")
    say(child, "next", "echo: next")
    assert server.requests[-1]["model"] == "other-model"
    say(child, "/state", "the state is empty")  # the CLI's own settings are internal keys
    markdown, data = tmp_path / "chat.md", tmp_path / "chat.json"
    say(child, f"/export {markdown}", f"exported 6 messages to {markdown}")
    say(child, f"/export {data}", f"exported 6 messages to {data}")
    quit_(child)
    assert "### user" in markdown.read_text() and "echo: next" in markdown.read_text()
    document = json.loads(data.read_text())
    assert document["session_id"] == "alice"
    assert [m["content"] for m in document["messages"]][-1] == "echo: next"
    assert document["state"]["__conversa.model"] == "other-model"


def test_piped_input_is_read_line_by_line(env: dict[str, str], server: FakeOpenAIServer) -> None:
    server.add_reply(text("**bold** answer"))
    result = conversa(
        env, "chat", "scripted", stdin="first question\n/count\n/nosuch\nsecond question\n"
    )
    assert result.returncode == 0, result.stderr
    # answers and command results on stdout as plain text; notes and errors on stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6, result.stdout
    assert lines[0] == "**bold** answer"
    assert lines[1] == "2 messages (assistant 1, user 1)"
    assert re.fullmatch(r"tokens used: \d+ \(prompt \d+, completion \d+\)", lines[2])
    assert lines[3].startswith("session totals: ")
    assert lines[4].startswith("model sees: 2 of 2 messages")
    assert lines[5] == "echo: second question"
    assert "\x1b" not in result.stdout
    assert "new session scripted" in result.stderr
    assert "unknown command /nosuch" in result.stderr
    assert [m.text for m in stored(env, "scripted")][-1] == "echo: second question"


def test_ask_prints_the_answer_and_fails_clearly(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    ok = conversa(env, "ask", "what is up?", "--session", "asked")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "echo: what is up?\n"
    assert [m.text for m in stored(env, "asked")] == ["what is up?", "echo: what is up?"]

    server.add_reply(model_not_found())
    failed = conversa(env, "ask", "hello")
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: ") and "fake-model" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_ctrl_x_ctrl_e_writes_the_message_in_the_editor(
    env: dict[str, str], server: FakeOpenAIServer, tmp_path: Path
) -> None:
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "written in\\nthe editor" > "$1"\n')
    editor.chmod(0o755)
    env = {**env, "EDITOR": str(editor), "VISUAL": str(editor)}
    child = spawn(env)
    child.expect_exact(PROMPT)
    child.sendcontrol("x")
    child.sendcontrol("e")
    child.expect_exact("echo: written in")  # Markdown joins the two lines of the answer
    child.expect_exact(PROMPT)
    assert user_texts(server.requests[-1]) == ["written in\nthe editor"]
    quit_(child)


# -- a context window: compaction in the REPL and in `conversa ask` ---------------------------

FILLER = "the quick brown fox jumps over the lazy dog " * 9  # ~100 tokens


def long_turn(i: int) -> str:
    return f"Turn {i}: my name is Ada. {FILLER}"


def is_summary_request(request: dict[str, Any]) -> bool:
    from conversa.compaction import DEFAULT_SUMMARY_PROMPT

    return request["messages"][0]["content"] == DEFAULT_SUMMARY_PROMPT


def summarizing(request: dict[str, Any]) -> Any:
    if is_summary_request(request):
        return text("SUMMARY: the user is called Ada.")
    return text(f"noted {len(request['messages'])}")


def test_chat_with_a_window_compacts_and_a_restart_keeps_it(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    from conversa.compaction import SUMMARY_INTRO, summary_range

    server.default_reply = summarizing
    child = spawn(env, "--context-window", "1500")
    child.expect_exact(PROMPT)
    for i in range(14):
        say(child, long_turn(i), "noted")
    assert any(is_summary_request(r) for r in server.requests)
    say(child, "/count", "model sees:", "(and a summary of", "of 1,500 tokens")
    quit_(child)
    history = stored(env)
    records = [m for m in history if summary_range(m) is not None]
    assert records and len(history) == 2 * 14 + len(records)

    # a restart without the option: the window stays with the session, the summary is reused
    server.clear_requests()
    child = spawn(env)
    child.expect_exact(PROMPT)
    say(child, "/count", "(and a summary of", "of 1,500 tokens")
    say(child, "what is my name?", "noted")
    quit_(child)
    asked = [r for r in server.requests if not is_summary_request(r)]
    assert len(asked) == 1
    system = asked[0]["messages"][0]["content"]
    assert SUMMARY_INTRO in system and records[-1].text in system
    assert user_texts(asked[0])[-1] == "what is my name?"
    assert long_turn(0) not in user_texts(asked[0])


def test_ask_takes_a_window_and_no_compaction_and_keeps_them(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    server.default_reply = summarizing
    for i in range(10):
        done = conversa(env, "ask", "--session", "alice", long_turn(i))
        assert done.returncode == 0, done.stderr
    assert len(user_texts(server.requests[-1])) == 10  # no window: the whole history

    server.clear_requests()
    trimmed = conversa(
        env, "ask", "--session", "alice", "--context-window", "1000", "--no-compaction", "one"
    )
    assert trimmed.returncode == 0, trimmed.stderr
    assert window_kept(env) == {"tokens": 1000, "compaction": False}
    kept = conversa(env, "ask", "--session", "alice", "two")  # the window is kept, trim only
    assert kept.returncode == 0, kept.stderr
    assert not any(is_summary_request(r) for r in server.requests)
    # both trimmed: of 11 and 12 user messages, the oldest left out
    assert [len(user_texts(r)) < n for r, n in zip(server.requests, (11, 12), strict=True)] == [
        True,
        True,
    ]

    server.clear_requests()
    on = conversa(env, "ask", "--session", "alice", "--context-window", "1000", "three")
    assert on.returncode == 0, on.stderr
    assert is_summary_request(server.requests[0])
    assert user_texts(server.requests[-1])[-1] == "three"
    assert window_kept(env) == {"tokens": 1000, "compaction": True}

    server.clear_requests()
    off = conversa(env, "ask", "--session", "alice", "--context-window", "0", "four")
    assert off.returncode == 0, off.stderr  # 0 takes the window away
    assert window_kept(env) is None
    assert not any(is_summary_request(r) for r in server.requests)


def window_kept(env: dict[str, str]) -> Any:
    from _cli import run_storage

    from conversa.cli._factory import WINDOW_KEY

    state = run_storage(env["CONVERSA_STORAGE"], lambda storage: storage.get_state("alice"))
    return state.get(WINDOW_KEY)


def test_history_reads_only_what_it_shows(
    env: dict[str, str], server: FakeOpenAIServer, tmp_path: Path
) -> None:
    # a long session whose oldest row is damaged: /history of a session opened with a window
    # shows its newest messages without reading that row (a whole read would refuse)
    import sqlite3

    from _cli import run_storage

    from conversa import ChatMessage

    db = tmp_path / "long.db"
    env = {**env, "CONVERSA_STORAGE": f"sqlite:///{db}"}
    history = [
        ChatMessage.user(f"question {i}") if i % 2 == 0 else ChatMessage.assistant(f"answer {i}")
        for i in range(300)
    ]
    run_storage(env["CONVERSA_STORAGE"], lambda storage: storage.save("alice", history))
    with sqlite3.connect(db) as con:
        con.execute("UPDATE messages SET data = '{broken' WHERE session_id = 'alice' AND seq = 0")
    con.close()
    child = spawn(env, "--context-window", "1000")
    child.expect_exact("resumed alice: 300 messages")
    child.expect_exact(PROMPT)
    say(child, "/history 3", "[297]", "answer 297", "[298]", "question 298", "[299]", "answer 299")
    quit_(child)
