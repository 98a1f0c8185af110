"""The session lease across processes: one turn at a time per session on every shared backend.

Against real files and SQLite in tmp dirs, the local Redis and PostgreSQL (each test in its own
key prefix or schema), and the strict FakeOpenAIServer. Children are real processes
(lease_child.py, turn_child.py), SIGKILLed where a holder must die.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pexpect
import pytest
from _services import postgres_space, redis_space
from _wait import wait_for

from conversa import ChatMessage, OpenAIChatModel, SessionBusy, create_session, open_storage, tool
from conversa.storage import ConversationStorage
from conversa.testing.conformance import LeaseConformance
from conversa.testing.replies import Reply, last_user_text, text, tool_call
from conversa.testing.server import FakeOpenAIServer
from conversa.testing.validation import validate_chat_request

HERE = Path(__file__).parent
LEASE_CHILD = str(HERE / "lease_child.py")
TURN_CHILD = str(HERE / "turn_child.py")
REDIS = os.environ.get("CONVERSA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES = os.environ.get("CONVERSA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUN = uuid.uuid4().hex[:10]
_counter = itertools.count()
BOUND = 60.0


def _up(url: str, port: int) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or port), 1).close()
    except OSError:
        if os.environ.get("CONVERSA_TEST_REQUIRE_SERVICES"):
            raise
        return False
    return True


def _with(url: str, **opts: Any) -> str:
    return urlsplit(url)._replace(query=urlencode(opts)).geturl()


@pytest.fixture(params=["file", "sqlite", "redis", "postgres"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty store of each shared backend (Redis leases outlive a holder by
    8 s: longer than a loaded machine stalls a renewal)."""
    kind = request.param
    if kind == "file":
        yield f"file://{tmp_path / 'sessions'}"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'sessions.db'}"
    elif kind == "redis":
        if not _up(REDIS, 6379):
            pytest.skip(f"no Redis at {REDIS}")
        prefix = f"conversa-lease-{RUN}-{next(_counter)}:"
        async with redis_space(REDIS, prefix, lease_ttl=8) as space:
            yield space
    else:
        if not _up(POSTGRES, 5432):
            pytest.skip(f"no PostgreSQL at {POSTGRES}")
        async with postgres_space(POSTGRES, f"conversa_lease_{RUN}_{next(_counter)}") as space:
            yield space


class TestSharedBackendLease(LeaseConformance):
    @pytest.fixture
    async def storage(self, url: str) -> AsyncIterator[ConversationStorage]:
        store = open_storage(url)
        yield store
        await store.close()

    @pytest.fixture
    def lease_url(self, url: str) -> str:
        return url


# -- turns of many processes in one session -----------------------------------------------


def answer(request: dict[str, Any]) -> Reply:
    """A user message gets a call of `add` (or `hang`), a tool result the answer to it."""
    last = request["messages"][-1]
    if last["role"] == "user":
        name = "hang" if last_user_text(request).startswith("hang") else "add"
        return tool_call(name, {"a": 1, "b": 2} if name == "add" else {})
    return text(f"answer to {last_user_text(request)}")


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(default_reply=answer) as srv:
        yield srv


def check_history(history: list[ChatMessage], users: list[str]) -> None:
    """Valid as stored (the strict API takes it unchanged) and each user message answered."""
    problem = validate_chat_request({"model": "m", "messages": [m.to_openai() for m in history]})
    assert problem is None, problem
    assert sorted(m.text for m in history if m.role == "user") == sorted(users)
    for i, m in enumerate(history):
        if m.role == "user" and not m.text.startswith("hang"):
            call, result, reply = history[i + 1 : i + 4]
            assert call.role == "assistant" and call.tool_calls[0].name == "add"
            assert result.role == "tool" and result.tool_call_id == call.tool_calls[0].id
            assert reply.role == "assistant" and reply.text == f"answer to {m.text}"


async def test_turns_of_many_processes_never_interleave(url: str, server: FakeOpenAIServer) -> None:
    workers, turns = 4, 3
    # a ttl that no stall of a loaded test machine outlasts: live holders must keep their lease
    url = url.replace("lease_ttl=8", "lease_ttl=20")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                LEASE_CHILD,
                "turns",
                url,
                "shared",
                server.base_url,
                str(w),
                str(turns),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    try:
        for p in procs:  # every child is ready before any starts: the turns really race
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, _ = await asyncio.to_thread(p.communicate, timeout=BOUND)
            assert p.returncode == 0 and out.strip() == "done", out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    store = open_storage(url)
    try:
        history = await store.load("shared")
    finally:
        await store.close()
    check_history(history, [f"w{w}-{i}" for w in range(workers) for i in range(turns)])
    assert len(server.requests) == 2 * workers * turns  # every request valid, none retried


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def model(server: FakeOpenAIServer) -> OpenAIChatModel:
    return OpenAIChatModel("fake-model", base_url=server.base_url, api_key="t", max_retries=0)


async def test_sigkill_of_the_holder_mid_turn_hands_the_lease_over(
    url: str, server: FakeOpenAIServer
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        TURN_CHILD,
        url,
        "s",
        server.base_url,
        "hang on",
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), BOUND)
        assert line.strip() == b"TOOL STARTED"  # the child holds the lease, mid-turn
        session = await create_session("s", url, model=model(server), tools=[add], turn_wait=0)
        with pytest.raises(SessionBusy, match="'s' is in use elsewhere"):
            await session.send_message("too early")
        session.turn_wait = BOUND
        turn = asyncio.create_task(session.send_message("after the crash"))
        await wait_for(lambda: session.waiting_for_lease, "the turn to wait for the lease")
        assert not turn.done()  # the turn waits ...
    finally:
        child.send_signal(signal.SIGKILL)  # ... until the holder dies
        await child.wait()
    result = await asyncio.wait_for(turn, BOUND)
    assert result.success and result.result == "answer to after the crash"
    check_history(session.history, ["hang on", "after the crash"])
    await session.close()


async def test_session_busy_after_turn_wait_for_every_change(
    tmp_path: Path, server: FakeOpenAIServer
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    session = await create_session("s", url, model=model(server), tools=[add], turn_wait=0.1)
    await session.send_message("first")
    holder = subprocess.Popen(
        [sys.executable, LEASE_CHILD, "hold", url, "s"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for change in (session.send_message("second"), session.retry(), session.undo()):
            with pytest.raises(SessionBusy, match="in use elsewhere"):
                await change
        with pytest.raises(SessionBusy):
            await session.clear_history()
        assert (await session.storage.load("s"))[0].text == "first"
        assert await session.storage.count("s") == 4  # nothing changed meanwhile
        assert session.message_count() == 4  # reads do not wait
    finally:
        holder.kill()
        holder.wait()
    assert (await session.send_message("second")).success
    await session.close()


async def test_creating_a_session_waits_for_its_lease(tmp_path: Path) -> None:
    # the first write of a new session is a change too: it waits for a holder, then SessionBusy
    url = f"sqlite:///{tmp_path / 's.db'}"
    holder = subprocess.Popen(
        [sys.executable, LEASE_CHILD, "hold", url, "new"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SessionBusy, match="in use elsewhere"):
            await create_session("new", url, turn_wait=0.1)
        store = open_storage(url)
        assert not await store.exists("new")  # nothing was written meanwhile
        await store.close()
    finally:
        holder.kill()
        holder.wait()
    session = await create_session("new", url, turn_wait=0.1)
    assert await session.storage.exists("new")
    await session.close()


# -- the REPL -----------------------------------------------------------------------------


def test_repl_says_it_waits_and_ctrl_c_stops_waiting(tmp_path: Path) -> None:
    from _cli import PROMPT, child_env, quit_, say, spawn, stored

    with FakeOpenAIServer() as server:
        env = child_env(tmp_path, server)
        storage = env["CONVERSA_STORAGE"]

        async def create() -> None:
            store = open_storage(storage)
            await store.append("alice", [])
            await store.close()

        asyncio.run(create())
        holder = subprocess.Popen(
            [sys.executable, LEASE_CHILD, "hold", storage, "alice"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            child = spawn(env)
            child.expect_exact(PROMPT)
            child.sendline("hello")
            child.expect_exact("waiting for session alice (in use by another process)")
            child.sendcontrol("c")
            child.expect_exact("interrupted")
            child.expect_exact(PROMPT)
        finally:
            holder.kill()
            holder.wait()
        say(child, "hello again", "echo: hello again")
        quit_(child)
        assert [m.text for m in stored(env)] == ["hello again", "echo: hello again"]
        assert isinstance(child, pexpect.spawn)


# -- Redis: cancellation really stops --------------------------------------------------------


@pytest.fixture
async def redis_store() -> AsyncIterator[Any]:
    if not _up(REDIS, 6379):
        pytest.skip(f"no Redis at {REDIS}")
    prefix = f"conversa-lease-{RUN}-{next(_counter)}:"
    store = open_storage(_with(REDIS, prefix=prefix))
    yield store
    await store.delete("s")
    await store.close()


async def test_cancelled_redis_operations_stop(redis_store: Any) -> None:
    """redis-py 8 on Python 3.11 swallows a cancel mid-command: the loop would go on."""
    message = [ChatMessage.user("x")]

    async def busy() -> None:
        while True:
            await redis_store.append("s", message)
            await redis_store.count("s")

    for attempt in range(30):  # a cancel lands in another step of a command each time
        task = asyncio.create_task(busy())
        await wait_for(lambda: redis_store._client.connection_pool._in_use_connections, "a call")
        await asyncio.sleep(0.001 * (attempt % 5))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=BOUND / 4)
        assert done, f"attempt {attempt}: the cancelled task kept running"
        assert task.cancelled()


async def test_redis_lease_is_renewed_while_held_and_the_renewal_stops(
    redis_store: Any,
) -> None:
    key = redis_store._key("l", "s")
    client = redis_store._client
    async with redis_store.lease("s", ttl=0.3):
        # renewed: the remaining time goes up again, however long the test machine stalls
        await wait_for(_rising(client, key), "a renewal", BOUND / 4)
        assert len(asyncio.all_tasks()) == 2  # this test and the renewal
    assert not await client.exists(key)
    assert asyncio.all_tasks() == {asyncio.current_task()}


def _rising(client: Any, key: str) -> Callable[[], Awaitable[bool]]:
    """A check that is true once the key's remaining time is seen to go up between two reads."""
    last: list[int] = []

    async def check() -> bool:
        now = int(await client.pttl(key))
        rose = bool(last) and now > last[-1]
        last.append(now)
        return rose

    return check
