"""The must-holds of the Session issue, against a strict OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from _closing import opened
from _wait import wait_for

from conversa import OpenAIChatModel, Session, TextDelta, create_session, tool
from conversa.testing.replies import (
    drop_stream,
    invalid_json,
    rate_limited,
    server_error,
    slow,
    text,
    tool_call,
)
from conversa.testing.server import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("close_opened")

CHILD = str(Path(__file__).with_name("turn_child.py"))


hanging: list[None] = []  # one entry for each call of `hang` that has started


@tool
async def hang() -> str:
    """Waits forever."""
    hanging.append(None)
    await asyncio.sleep(3600)
    return "never"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def model_for(server: FakeOpenAIServer, **kw: Any) -> OpenAIChatModel:
    kw.setdefault("max_retries", 2)
    kw.setdefault("retry_backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return OpenAIChatModel("fake-model", base_url=server.base_url, api_key="test", **kw)


async def session_for(server: FakeOpenAIServer, url: str, sid: str = "s", **kw: Any) -> Session:
    kw.setdefault("tools", [hang, add])
    session = await create_session(sid, url, model=model_for(server), **kw)
    opened(session)
    return session


def run_child(url: str, sid: str, server: FakeOpenAIServer, message: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, CHILD, url, sid, server.base_url, message],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


def sent_contents(request: dict[str, Any]) -> list[str]:
    return [str(m.get("content")) for m in request["messages"]]


# -- 1. the invariants hold after every kind of interruption ------------------------------------


async def next_turn_succeeds(server: FakeOpenAIServer, session: Session) -> None:
    """The strict server answers 400 to any invalid history, so success proves validity."""
    server.add_reply(text("all good"))
    result = await session.send_message("are we fine?")
    assert result.success, result.error
    assert result.result == "all good"


async def test_cancel_mid_stream(server: FakeOpenAIServer, tmp_path: Path) -> None:
    session = await session_for(server, f"sqlite:///{tmp_path}/s.db")
    server.gate = threading.Event()
    server.add_reply(text("a long answer that will be cut off"))
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for event in session.stream_message("tell me a story"):
            if isinstance(event, TextDelta):
                first_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_delta.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    server.gate.set()
    server.gate = None
    partial = session.history[-1]
    assert partial.role == "assistant" and partial.metadata["interrupted"] is True
    assert partial.text and "cut off" not in partial.text
    await next_turn_succeeds(server, session)


async def test_cancel_during_tool(server: FakeOpenAIServer, tmp_path: Path) -> None:
    session = await session_for(server, f"file://{tmp_path}/sessions")
    server.add_reply(tool_call("hang", {}))
    hanging.clear()
    task = asyncio.create_task(session.send_message("run the slow tool"))
    await wait_for(lambda: hanging, "the tool to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert session.history[-1].metadata.get("interrupted") is True
    await next_turn_succeeds(server, session)


async def test_sigkill_mid_turn(server: FakeOpenAIServer, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    server.add_reply(tool_call("hang", {}))
    child = subprocess.Popen(
        [sys.executable, CHILD, url, "victim", server.base_url, "start the tool"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "TOOL STARTED"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    session = await session_for(server, url, "victim")
    assert [m.role for m in session.history] == ["user", "assistant"]
    await next_turn_succeeds(server, session)
    stored = session.history
    assert stored[2].role == "tool" and stored[2].metadata["interrupted"] is True


async def test_model_error_then_next_turn(server: FakeOpenAIServer, tmp_path: Path) -> None:
    session = await session_for(server, f"sqlite:///{tmp_path}/s.db")
    server.add_reply(server_error(), server_error(), server_error())
    result = await session.send_message("hello?")
    assert not result.success and result.stop_reason == "error"
    assert "500" in (result.error or "") or "server" in (result.error or "").lower()
    assert len(server.requests) == 3
    await next_turn_succeeds(server, session)
    assert [m.role for m in session.history] == ["user", "user", "assistant"]


async def test_max_iterations_then_next_turn(server: FakeOpenAIServer, tmp_path: Path) -> None:
    session = await session_for(server, f"sqlite:///{tmp_path}/s.db")
    server.add_reply(*[tool_call("add", {"a": 1, "b": 2})] * 2)
    result = await session.send_message_with_iterations("loop", max_iterations=2)
    assert result.stop_reason == "max_iterations" and not result.success
    await next_turn_succeeds(server, session)


# -- 2 and 3. other processes -------------------------------------------------------------------


async def test_conversation_continues_across_restart(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    server.add_reply(text("Nice to meet you, Alice."), text("Your name is Alice."))
    assert run_child(url, "alice", server, "my name is Alice")["success"]
    second = run_child(url, "alice", server, "what is my name?")
    assert second["result"] == "Your name is Alice."
    assert sent_contents(server.requests[-1]) == [
        "my name is Alice",
        "Nice to meet you, Alice.",
        "what is my name?",
    ]


@pytest.mark.parametrize("scheme", ["sqlite", "file"])
async def test_two_processes_alternate_turns(
    server: FakeOpenAIServer, tmp_path: Path, scheme: str
) -> None:
    url = f"sqlite:///{tmp_path}/s.db" if scheme == "sqlite" else f"file://{tmp_path}/sessions"
    session = await session_for(server, url, "shared")
    for i in range(2):
        server.add_reply(text(f"child answer {i}"))
        run_child(url, "shared", server, f"child question {i}")
        assert "child question" in sent_contents(server.requests[-1])[-1]
        server.add_reply(text(f"parent answer {i}"))
        await session.send_message(f"parent question {i}")
        contents = sent_contents(server.requests[-1])
        assert contents[-3:] == [f"child question {i}", f"child answer {i}", f"parent question {i}"]
    server.add_reply(text("last"))
    run_child(url, "shared", server, "child question 2")
    assert sent_contents(server.requests[-1])[-3:] == [
        "parent question 1",
        "parent answer 1",
        "child question 2",
    ]


# -- 4. fault injection -------------------------------------------------------------------------


async def stored_roles(session: Session) -> list[str]:
    return [m.role for m in await session.storage.load(session.session_id)]


@pytest.mark.parametrize(
    "faults",
    [
        [rate_limited(retry_after=0.05)],
        [server_error(), server_error(502, "bad gateway")],
        [drop_stream(after_chunks=0)],
    ],
    ids=["429-retry-after", "5xx", "dropped-before-text"],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_faults_recovered_by_retry(
    server: FakeOpenAIServer, faults: list[Any], streaming: bool
) -> None:
    session = await session_for(server, "memory://")
    server.add_reply(*faults, text("recovered"))
    if streaming:
        events = [e async for e in session.stream_message("hi")]
        result = events[-1].result  # type: ignore[union-attr]
    else:
        result = await session.send_message("hi")
    assert result.success and result.result == "recovered"
    assert len(server.requests) == len(faults) + 1
    assert await stored_roles(session) == ["user", "assistant"]


async def test_timeout_ends_turn_with_clear_error(server: FakeOpenAIServer) -> None:
    session = await session_for(server, "memory://")
    session.model = model_for(server, timeout=0.3, max_retries=1)
    server.add_reply(slow(3, "too late"), slow(3, "too late"))
    result = await session.send_message("hi")
    assert not result.success and result.stop_reason == "error"
    assert "timed out" in (result.error or "").lower()
    assert len(server.requests) == 2
    assert await stored_roles(session) == ["user"]


async def test_stream_dropped_after_text_keeps_partial(server: FakeOpenAIServer) -> None:
    session = await session_for(server, "memory://")
    server.add_reply(drop_stream(after_chunks=2, text="one two three four five six"))
    events = [e async for e in session.stream_message("hi")]
    result = events[-1].result  # type: ignore[union-attr]
    assert not result.success and result.stop_reason == "error"
    assert "dropped" in (result.error or "").lower() or "connection" in (result.error or "").lower()
    stored = await session.storage.load("s")
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[1].metadata["interrupted"] is True
    assert stored[1].text.startswith("one")
    await next_turn_succeeds(server, session)


async def test_invalid_json_from_server(server: FakeOpenAIServer) -> None:
    session = await session_for(server, "memory://", tools=[])
    session.model = model_for(server, max_retries=0)
    server.add_reply(invalid_json())
    result = await session.send_message("hi")
    assert not result.success and "json" in (result.error or "").lower()
    assert await stored_roles(session) == ["user"]
    await next_turn_succeeds(server, session)


# -- 5. streaming is incremental ----------------------------------------------------------------


async def test_first_delta_arrives_before_the_last_chunk_is_sent(
    server: FakeOpenAIServer,
) -> None:
    session = await session_for(server, "memory://")
    server.gate = threading.Event()
    server.add_reply(text("streamed word by word"))
    received: list[str] = []
    async for event in session.stream_message("go"):
        if isinstance(event, TextDelta):
            received.append(event.text)
            if len(received) == 1:
                assert not server.gate.is_set()
                server.gate.set()
    assert "".join(received) == "streamed word by word"
    assert len(received) > 1
