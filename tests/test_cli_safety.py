"""What the terminal app shows and keeps: no control sequences from a model or the storage,
no credentials, the real target of an approval, private files, clean warnings and --debug.

Like test_cli_chat, each test runs the real `conversa` command (in a pseudo-terminal or with
pipes) against the FakeOpenAIServer on 127.0.0.1, with the sessions and HOME in tmp_path.
"""

from __future__ import annotations

import io
import json
import stat
import subprocess
from pathlib import Path

import pexpect
import pytest
from _cli import CONVERSA, PROMPT, TIMEOUT, conversa, quit_, run_storage, say, spawn

from conversa import UnsupportedStorageURL, open_storage
from conversa._redact import redact_text, redact_url
from conversa.cli._format import approval_question, terminal_text
from conversa.messages import ChatMessage
from conversa.testing.replies import error, model_not_found, text, tool_call
from conversa.testing.server import FakeOpenAIServer

HOSTILE = "clip\x1b]52;c;aGVsbG8=\x07 title\x1b]0;pwned\x07 clear\x1b[2J done"
"""A model's answer that, passed raw, writes the clipboard, the window title, clears the screen."""


def assert_inert(output: str | bytes) -> None:
    """None of HOSTILE's sequences reached the terminal; their escaped form did."""
    shown = output.decode() if isinstance(output, bytes) else output
    assert "\x1b]" not in shown and "\x1b[2J" not in shown and "\x07" not in shown
    assert "clip\\x1b]52;c;aGVsbG8=\\x07" in shown


def in_terminal(env: dict[str, str], *args: str) -> str:
    """Run `conversa ARGS` in a pseudo-terminal to its end; everything it wrote."""
    child = pexpect.spawn(CONVERSA, list(args), env=env, encoding="utf-8", timeout=TIMEOUT)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def store(env: dict[str, str], session_id: str, *messages: ChatMessage) -> None:
    run_storage(env["CONVERSA_STORAGE"], lambda storage: storage.append(session_id, list(messages)))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- 4: the approval question shows what will really be contacted ---------------------------


def test_approval_shows_the_real_host_behind_userinfo(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    disguise = "docs.python.org:443:" + "stable-library-index.html-" * 8
    url = f"http://{disguise}@127.0.0.1:{server.port}/secret"
    server.add_reply(tool_call("fetch_url", {"url": url}), text("I did not fetch it."))
    child = spawn(env, "--tools", "fetch_url")
    child.expect_exact(PROMPT)
    child.sendline("read the docs")
    child.expect_exact(f"→ contacts host 127.0.0.1, port {server.port} (http)")
    child.expect_exact("before the '@' is a user name and password, not the host")
    child.expect_exact("[y/n/always]")
    child.sendline("n")
    child.expect_exact("I did not fetch it.")
    child.expect_exact(PROMPT)
    quit_(child)
    assert len(server.requests) == 2  # only the two chat calls: nothing fetched /secret


def test_approval_question_never_cuts_the_target() -> None:
    url = "https://" + "a" * 500 + ".example.com:8443/" + "p" * 500
    question = approval_question("fetch_url", {"url": url, "note": "n" * 1000})
    call, target = question.splitlines()
    assert len(call) < 400 and "…" in call and call.endswith('"n…nnnnnnnnnnnnnnn")?'[-4:])
    assert target == f"  → contacts host {'a' * 500}.example.com, port 8443 (https)"
    # a default port is named too, and a look-alike Unicode host shows as what is resolved
    assert "port 443" in approval_question("fetch_url", {"url": "https://pаypal.com/"})
    assert "xn--" in approval_question("fetch_url", {"url": "https://pаypal.com/"})


# -- 8: control sequences from a model or the storage are shown, not obeyed ----------------


def test_terminal_text_escapes_controls_and_keeps_layout() -> None:
    assert terminal_text("a\tb\nc\r\n\x1b[2J\x9b1m\x7f") == "a\tb\nc\n\\x1b[2J\\x9b1m\\x7f"
    # bidi overrides and isolates are shown, so no text reads as what it is not
    assert terminal_text("rm \u202eftp.exe \u2066x\u2069") == "rm \\u202eftp.exe \\u2066x\\u2069"
    assert approval_question("read_file", {"path": "a\u202etxt.exe"}).count("\\u202e") == 1
    assert terminal_text("שלום \u200f world") == "שלום \u200f world"  # marks stay: they only hint


def test_ask_does_not_pass_control_sequences(env: dict[str, str], server: FakeOpenAIServer) -> None:
    server.add_reply(text(HOSTILE))
    piped = subprocess.run([CONVERSA, "ask", "hi"], env=env, capture_output=True, timeout=TIMEOUT)
    assert piped.returncode == 0, piped.stderr
    assert_inert(piped.stdout)
    server.add_reply(text(HOSTILE))
    assert_inert(in_terminal(env, "ask", "hi"))


def test_sessions_show_and_export_do_not_pass_control_sequences(env: dict[str, str]) -> None:
    store(env, "alice", ChatMessage.user("hi"), ChatMessage.assistant(HOSTILE))
    piped = subprocess.run(
        [CONVERSA, "sessions", "show", "alice"], env=env, capture_output=True, timeout=TIMEOUT
    )
    assert piped.returncode == 0, piped.stderr
    assert_inert(piped.stdout)
    shown = in_terminal(env, "sessions", "show", "alice")
    assert_inert(shown)
    assert "\x1b[" in shown  # the app's own styling still is ANSI on a terminal
    assert_inert(in_terminal(env, "sessions", "export", "alice"))
    # a Markdown file is read with `cat` too; the JSON export keeps the text exactly
    markdown = conversa(env, "sessions", "export", "alice")
    assert_inert(markdown.stdout)
    data = conversa(env, "sessions", "export", "alice", "--format", "json")
    assert json.loads(data.stdout)["messages"][1]["content"] == HOSTILE


def test_the_repl_does_not_pass_control_sequences(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    server.add_reply(text(HOSTILE))
    child = spawn(env)
    child.logfile_read = shown = io.StringIO()
    child.expect_exact(PROMPT)
    say(child, "hi", "done")
    answered = shown.getvalue()
    say(child, "/history", "assistant", "done")
    quit_(child)
    assert_inert(answered)
    assert_inert(shown.getvalue()[len(answered) :])


# -- 9: credentials are hidden by where they are, not by what they look like ----------------


def test_the_base_urls_password_is_hidden_in_the_banner_and_errors(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    env["OPENAI_BASE_URL"] = f"http://bob:hunter2@127.0.0.1:{server.port}/v1"
    chat = conversa(env, "chat", stdin="")
    assert f"model: fake-model via http://bob:***@127.0.0.1:{server.port}/v1" in chat.stderr
    server.add_reply(model_not_found())
    failed = conversa(env, "ask", "hi")
    assert failed.returncode == 1
    assert f"http://bob:***@127.0.0.1:{server.port}/v1" in failed.stderr
    assert "hunter2" not in chat.stderr + failed.stderr


def test_a_storage_urls_password_option_is_hidden(env: dict[str, str]) -> None:
    url = "redis://127.0.0.1:6379/0?password=hunter2"
    with pytest.raises(UnsupportedStorageURL) as caught:
        open_storage(url)
    assert "'password'" in str(caught.value) and "hunter2" not in str(caught.value)
    listed = conversa(env, "sessions", "list", "--storage", url)
    assert listed.returncode == 1 and "unknown option 'password'" in listed.stderr
    assert "hunter2" not in listed.stderr


@pytest.mark.parametrize("key", ["e", "ollama"])
def test_a_short_api_key_does_not_garble_errors(
    env: dict[str, str], server: FakeOpenAIServer, key: str
) -> None:
    env["OPENAI_API_KEY"] = key
    server.add_reply(error(400, "the ollama server here rejected the request"))
    failed = conversa(env, "ask", "hi")
    assert failed.returncode == 1
    assert "(HTTP 400: the ollama server here rejected the request)" in failed.stderr
    assert "***" not in failed.stderr


def test_a_key_or_token_the_server_echoes_is_hidden(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    key = "sk-test-0123456789abcdef"
    env["OPENAI_API_KEY"] = key
    server.add_reply(error(401, f"Incorrect API key provided: {key}. Authorization: Bearer {key}"))
    failed = conversa(env, "ask", "hi")
    assert failed.returncode == 1 and "Incorrect API key provided: ***" in failed.stderr
    assert key not in failed.stderr


def test_redaction_finds_credentials_by_position() -> None:
    assert redact_url("http://bob:pw@host/v1") == "http://bob:***@host/v1"
    # a web URL's bare user info is a token by convention; a database URL's is a user name
    assert redact_url("https://ghp_abc123@github.com/x.git") == "https://***@github.com/x.git"
    assert redact_text("see https://tok@h/v1 now") == "see https://***@h/v1 now"
    assert (
        redact_url("postgresql://postgres@127.0.0.1/test") == "postgresql://postgres@127.0.0.1/test"
    )
    assert redact_url("redis://:p@ss@h/0?prefix=a&password=pw") == (
        "redis://:***@h/0?prefix=a&password=***"
    )
    assert (
        redact_url("sqlite:///tmp/x.db?durability=power") == "sqlite:///tmp/x.db?durability=power"
    )
    said = redact_text(
        "to http://u:pw@h/v1: {'api_key': 'sk-1', 'message': 'e e'} "
        "headers Authorization: Basic dTpwdw== token=abc Bearer xyz",
        ["e"],
    )
    assert said == (
        "to http://u:***@h/v1: {'api_key': '***', 'message': 'e e'} "
        "headers Authorization: Basic *** token=*** Bearer ***"
    )


# -- 10: the input history and exports are the user's alone ---------------------------------


def test_history_and_exports_are_private(env: dict[str, str], tmp_path: Path) -> None:
    history = Path(env["HOME"]) / ".conversa_history"
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", f"umask 022 && exec {CONVERSA} chat"],
        env=env,
        encoding="utf-8",
        dimensions=(50, 200),
        timeout=TIMEOUT,
    )
    child.expect_exact(PROMPT)
    exported = tmp_path / "alice.md"
    say(child, "a secret plan", "echo: a secret plan")
    say(child, f"/export {exported}", "exported 2 messages")
    quit_(child)
    assert "a secret plan" in history.read_text()
    assert mode(history) == 0o600
    assert mode(exported) == 0o600

    history.chmod(0o644)  # one written by an earlier version is tightened
    child = spawn(env)
    child.expect_exact(PROMPT)
    quit_(child)
    assert mode(history) == 0o600

    target = tmp_path / "alice.json"
    assert conversa(env, "sessions", "export", "alice", "-o", str(target)).returncode == 0
    assert mode(target) == 0o600


# -- 15: --debug shows the traceback of a model error, without credentials ------------------


def test_debug_shows_the_model_errors_traceback(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    key = "sk-test-0123456789abcdef"
    env.update(OPENAI_API_KEY=key, OPENAI_BASE_URL=f"http://bob:hunter2@127.0.0.1:{server.port}/v1")
    for args in (["--debug", "ask", "hi"], ["chat", "--debug"]):
        server.add_reply(model_not_found(), error(404, f"no such model for key {key}"))
        result = conversa(env, *args, stdin="hi\n")
        assert "Traceback (most recent call last)" in result.stderr, args
        assert "openai.NotFoundError" in result.stderr  # the chained cause
        assert "conversa.errors.ModelError" in result.stderr
        assert key not in result.stderr and "hunter2" not in result.stderr
        server.clear_requests()
    without = conversa(env, "ask", "hi")
    assert "Traceback" not in without.stderr


# -- 17: a torn last line is one clean warning ----------------------------------------------


def test_a_torn_tail_is_one_clean_warning(env: dict[str, str]) -> None:
    store(env, "alice", ChatMessage.user("hi"))
    (session_file,) = Path(env["CONVERSA_STORAGE"]).glob("alice*.jsonl")
    torn = '{"role": "user", "cont'
    with session_file.open("a") as file:
        file.write(torn)
    shown = conversa(env, "sessions", "show", "alice")
    assert shown.returncode == 0, shown.stderr
    warnings = [line for line in shown.stderr.splitlines() if "ignoring the last" in line]
    assert warnings == [
        f"warning: {session_file}: ignoring the last {len(torn)} bytes, an append that was "
        "interrupted before it finished (it never returned); the next write to this session "
        "cuts them off"
    ]
    assert "UserWarning" not in shown.stderr and ".py:" not in shown.stderr
