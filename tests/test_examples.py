"""The examples run against the fake OpenAI server, so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conversa.testing import FakeOpenAIServer, text, tool_call

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


def run(server: FakeOpenAIServer, cwd: Path, *args: str, stdin: str = "") -> str:
    env = {
        **os.environ,
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "test",
        "CONVERSA_MODEL": "fake-model",
    }
    out = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_session_usage_patterns(server: FakeOpenAIServer, tmp_path: Path) -> None:
    script = str(EXAMPLES / "session_usage.py")
    out = run(server, tmp_path, script)
    assert "--- ephemeral" in out and "echo: Now say it in French." in out
    assert "[2 messages stored] echo: My name is Alice." in out
    assert "alice: echo: What is 2+2? (2 messages)" in out
    assert "bob: history cleared (0 messages)" in out
    assert (tmp_path / "example-sessions" / "user-alice.jsonl").exists()

    out = run(server, tmp_path, script, "persistent")
    assert "[4 messages stored] echo: What is my name?" in out
    sent = [m["content"] for m in server.requests[-1]["messages"]]
    assert sent[:2] == [
        "My name is Alice. Please remember it.",
        "echo: My name is Alice. Please remember it.",
    ]

    out = run(server, tmp_path, script, "interactive", stdin="hello\nsecond line\n\n")
    assert "resumed with 0 messages" in out
    assert "echo: hello" in out and "echo: second line" in out


def test_tools_agent(server: FakeOpenAIServer, tmp_path: Path) -> None:
    server.add_reply(
        tool_call("word_count", {"text": "the quick brown fox jumps"}),
        tool_call("calculator", {"expression": "17 * 23"}),
        tool_call("remember", {"fact": "likes foxes"}),
        text("5 words; 17 * 23 = 391; noted."),
    )
    out = run(server, tmp_path, str(EXAMPLES / "tools_agent.py"))
    assert "tool word_count({'text': 'the quick brown fox jumps'}) -> 5" in out
    assert "-> 391" in out
    assert "facts=['likes foxes']" in out
    assert "success=True iterations=4" in out
