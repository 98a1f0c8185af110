"""Running the real `conversa` command in tests: its environment, a pty, pipes, its storage.

The child talks only to 127.0.0.1 (a FakeOpenAIServer) and keeps HOME and its sessions in the
test's tmp_path. A pseudo-terminal (pexpect) is the user's terminal; pipes are a script's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pexpect

from conversa.messages import ChatMessage
from conversa.storage import ConversationStorage, open_storage
from conversa.testing.server import FakeOpenAIServer

CONVERSA = str(Path(sys.executable).with_name("conversa"))
TIMEOUT = 30
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY")
PROMPT = "alice> "
T = TypeVar("T")


def child_env(tmp_path: Path, server: FakeOpenAIServer) -> dict[str, str]:
    """The environment of a `conversa` child talking to ``server``, storing in tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    for key in ("XDG_STATE_HOME", "CONVERSA_HISTORY", "CONVERSA_DEBUG", "OPENAI_API_KEY"):
        base.pop(key, None)
    base.update(
        HOME=str(home),
        TERM="xterm",
        LOGNAME="alice",
        USER="alice",
        CONVERSA_STORAGE=str(tmp_path / "sessions"),
        OPENAI_BASE_URL=server.base_url,
        OPENAI_API_KEY="test-key",
        CONVERSA_MODEL="fake-model",
        NO_PROXY="127.0.0.1,localhost",
        # a pty answers no cursor-position requests; don't wait for one
        PROMPT_TOOLKIT_NO_CPR="1",
    )
    return base


def conversa(
    env: dict[str, str], *args: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `conversa ARGS` with pipes (umask 022, as on most machines)."""
    return subprocess.run(
        [CONVERSA, *args],
        input=stdin,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        umask=0o022,
    )


def spawn(env: dict[str, str], *args: str) -> pexpect.spawn:
    """Start `conversa chat ARGS` in a pseudo-terminal."""
    return pexpect.spawn(
        CONVERSA,
        ["chat", *args],
        env=env,
        encoding="utf-8",
        dimensions=(50, 200),
        timeout=TIMEOUT,
    )


def say(child: pexpect.spawn, line: str, *expected: str, prompt: str = PROMPT) -> str:
    """Send a line, wait for each expected text in order and for the next prompt."""
    child.sendline(line)
    for pattern in expected:
        child.expect_exact(pattern)
    child.expect_exact(prompt)
    return str(child.before)


def quit_(child: pexpect.spawn) -> None:
    """Ctrl-D, and the program ends cleanly."""
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def run_storage(url: str, work: Callable[[ConversationStorage], Awaitable[T]]) -> T:
    """Run ``work(storage)`` on a freshly opened storage and close it."""

    async def main() -> T:
        async with open_storage(url) as storage:
            return await work(storage)

    return asyncio.run(main())


async def kept(storage: ConversationStorage, session_id: str) -> tuple[Any, ...]:
    """What a copy must keep: history, info with its times, state with each key's expiry,
    the usage totals, where the newest summary is, the flow and when it was completed."""
    info = await storage.get_info(session_id)
    assert info is not None
    entries = await storage.get_state_entries(session_id)
    return (
        [m.to_dict() for m in await storage.load(session_id)],
        (info.title, info.user_id, info.status, info.metadata),
        (info.created_at, info.updated_at),
        {k: (e.value, e.expires_at) for k, e in entries.items()},
        (info.usage, info.summary_mark),
        (info.flow, info.completed_at),
    )


def stored(env: dict[str, str], session_id: str = "alice") -> list[ChatMessage]:
    """What the child's storage holds for a session."""
    return run_storage(env["CONVERSA_STORAGE"], lambda storage: storage.load(session_id))
