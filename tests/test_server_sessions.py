"""The server's live Sessions and plain turns: a turn's cost does not grow with its thread,
other instances' writes are seen, and a plain turn is finished when its client goes away."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _serve import serving
from _wait import wait_for

from conversa import ChatMessage, OpenAIChatModel
from conversa.server import create_app
from conversa.server._sessions import SessionPool
from conversa.storage import SessionInfo, SqliteStorage
from conversa.testing.replies import slow, text
from conversa.testing.server import FakeOpenAIServer

LONG = 2_000
LIVE = 64  # the default; 0 shows the cost without kept Sessions


class CountingStorage(SqliteStorage):
    """SQLite that counts whole-history loads and the messages every read returns."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.loads = 0
        self.rows_read = 0
        self.infos = 0

    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history, counted."""
        history = await super().load(session_id)
        self.loads += 1
        self.rows_read += len(history)
        return history

    async def tail(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """The newest messages, counted."""
        newest = await super().tail(session_id, n)
        self.rows_read += len(newest)
        return newest

    async def get_info(self, session_id: str) -> SessionInfo | None:
        """The thread's info, counted."""
        self.infos += 1
        return await super().get_info(session_id)

    async def read(
        self, session_id: str, offset: int = 0, limit: int | None = None
    ) -> list[ChatMessage]:
        """A range of messages, counted."""
        page = await super().read(session_id, offset, limit)
        self.rows_read += len(page)
        return page

    def reset(self) -> None:
        self.loads = self.rows_read = self.infos = 0


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[CountingStorage]:
    store = CountingStorage(str(tmp_path / "s.db"))
    yield store
    await store.close()


def model_of(server: FakeOpenAIServer) -> OpenAIChatModel:
    return OpenAIChatModel("fake-model", base_url=server.base_url, api_key="test")


def long_history(n: int) -> list[ChatMessage]:
    pairs = [
        (ChatMessage.user(f"question {i}"), ChatMessage.assistant(f"answer {i}"))
        for i in range(n // 2)
    ]
    return [m for pair in pairs for m in pair]


async def test_a_turn_on_a_long_thread_does_not_reload_its_history(
    storage: CountingStorage, server: FakeOpenAIServer
) -> None:
    await storage.save("long", long_history(LONG))
    app = create_app(storage=storage, model=model_of(server), live_sessions=LIVE)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        first = await client.post("/v1/threads/long/messages", json={"content": "q0"})
        assert first.json()["success"]
        assert storage.loads == 1  # the first turn of this server reads the thread once
        for i in range(1, 4):
            storage.reset()
            turn = await client.post("/v1/threads/long/messages", json={"content": f"q{i}"})
            assert turn.json()["result"] == f"echo: q{i}"
            # the kept Session: a count and the newest message, not the history again
            assert storage.loads == 0 and storage.rows_read <= 2, (storage.loads, storage.rows_read)
            # no auth: nothing to look up for isolation, and the turn reads its flow position
            # with its state (get_state_and_flow), not with an info read
            assert storage.infos == 0
            assert len(server.requests[-1]["messages"]) == LONG + 2 * i + 1
        storage.reset()
        undone = await client.post("/v1/threads/long/undo")
        assert [m["role"] for m in undone.json()["removed"]] == ["user", "assistant"]
        retried = await client.post("/v1/threads/long/retry")
        assert retried.json()["success"] and storage.loads == 0
        streamed = await client.post(
            "/v1/threads/long/messages", json={"content": "s", "stream": True}
        )
        assert "event: done" in streamed.text and storage.loads == 0
        assert await storage.count("long") == LONG + 8


async def test_a_page_of_a_long_thread_reads_only_that_page(
    storage: CountingStorage, server: FakeOpenAIServer
) -> None:
    history = long_history(LONG)
    await storage.save("long", history)
    app = create_app(storage=storage, model=model_of(server))
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        for offset, limit in [(0, 50), (1000, 100), (LONG - 10, 100), (LONG, 5), (10**30, 5)]:
            storage.reset()
            page = await client.get(
                "/v1/threads/long/messages", params={"offset": offset, "limit": limit}
            )
            assert page.status_code == 200, page.text
            body = page.json()
            expected = history[offset : offset + limit]
            assert [m["id"] for m in body["messages"]] == [m.id for m in expected]
            assert body["total"] == LONG
            assert storage.loads == 0 and storage.rows_read == len(expected), offset
        for bad in ({"offset": -1}, {"limit": -1}, {"limit": 1001}, {"offset": "x"}):
            refused = await client.get("/v1/threads/long/messages", params=bad)
            assert refused.status_code == 400, bad


async def test_a_kept_session_sees_what_another_instance_stored(
    storage: CountingStorage, tmp_path: Path, server: FakeOpenAIServer
) -> None:
    app = create_app(storage=storage, model=model_of(server))
    other = SqliteStorage(str(tmp_path / "s.db"))  # another instance's storage object
    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.post("/v1/threads/t/messages", json={"content": "a"})).is_success
            await other.append("t", [ChatMessage.user("b"), ChatMessage.assistant("from two")])
            await other.set_state("t", {"k": 1})
            storage.reset()
            turn = await client.post("/v1/threads/t/messages", json={"content": "c"})
            assert turn.json()["success"]
            seen = [m["content"] for m in server.requests[-1]["messages"]]
            assert seen == ["a", "echo: a", "b", "from two", "c"]
            # only what the other stored is read (and the message before it, to check)
            assert storage.loads == 0 and storage.rows_read == 3
            await other.truncate("t", 2)  # undone elsewhere: the count changes back
            server.add_reply(text("after the undo"))
            again = await client.post("/v1/threads/t/messages", json={"content": "d"})
            assert again.json()["result"] == "after the undo"
            assert [m["content"] for m in server.requests[-1]["messages"]] == ["a", "echo: a", "d"]
            assert (await client.delete("/v1/threads/t")).status_code == 204
            fresh = await client.post("/v1/threads/t/messages", json={"content": "e"})
            assert fresh.json()["success"] and await storage.count("t") == 2
    finally:
        await other.close()


async def test_concurrent_turns_on_one_thread_each_get_a_session(
    storage: CountingStorage, server: FakeOpenAIServer
) -> None:
    # the kept Session is lent to one request at a time: the second turn, waiting for the
    # lease meanwhile, runs in a Session of its own that catches up with the first's answer
    gate = threading.Event()
    app = create_app(storage=storage, model=model_of(server))
    body = {"stream": True}
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        await client.post("/v1/threads/x/messages", json={"content": "warm"})
        server.gate, server.gate_timeout = gate, 30
        server.add_reply(text("first answer, quite long"))
        try:
            async with client.stream(
                "POST", "/v1/threads/x/messages", json={**body, "content": "one"}
            ) as first:
                lines = first.aiter_lines()
                async for line in lines:
                    if line.startswith("event: text_delta"):
                        break  # the first turn runs (the end of its answer waits for the gate)
                second = asyncio.create_task(
                    client.post("/v1/threads/x/messages", json={**body, "content": "two"})
                )
                await wait_for(lambda: _lease_users(storage, "x") == 2, "the second turn")
                gate.set()
                rest = [line async for line in lines]
            assert json.loads(rest[-2][5:])["result"] == "first answer, quite long"
            assert "echo: two" in (await second).text
        finally:
            gate.set()
        messages = (await client.get("/v1/threads/x/messages")).json()["messages"]
        assert [m["content"] for m in messages] == [
            "warm", "echo: warm", "one", "first answer, quite long", "two", "echo: two",
        ]  # fmt: skip
    assert len(server.requests[-1]["messages"]) == 5


def _lease_users(storage: CountingStorage, thread: str) -> int:
    """How many changes hold or wait for the thread's lease in this process."""
    entry = storage.__dict__.get("_conversa_leases", {}).get(thread)
    return entry[1] if entry else 0


class Kept:
    """A stand-in for a Session: an id and a cached message count."""

    def __init__(self, session_id: str, messages: int) -> None:
        self.session_id, self.messages = session_id, messages

    def message_count(self) -> int:
        return self.messages


def test_the_pool_is_bounded_by_sessions_and_by_messages() -> None:
    pool = SessionPool(size=2, messages=100)
    a, b, c = Kept("a", 10), Kept("b", 10), Kept("c", 10)
    for kept in (a, b):
        pool.give_back(kept)  # type: ignore[arg-type]
    assert pool.take("a") is a and pool.take("a") is None  # lent: one request at a time
    pool.give_back(a)  # type: ignore[arg-type]
    pool.give_back(c)  # type: ignore[arg-type]
    assert "b" not in pool and len(pool) == 2  # the least recently used went
    pool.give_back(Kept("big", 85))  # type: ignore[arg-type]
    assert list(sorted(k for k in ("a", "c", "big") if k in pool)) == ["big", "c"]
    pool.give_back(Kept("huge", 101))  # type: ignore[arg-type]
    assert "huge" not in pool and "big" in pool  # too long to keep: read again next time
    pool.forget("big")
    assert "big" not in pool and pool.take("c") is c
    empty = SessionPool(size=0)
    empty.give_back(a)  # type: ignore[arg-type]
    assert "a" not in empty
    with pytest.raises(ValueError, match="0 or more"):
        SessionPool(size=-1)


# -- a plain (not streamed) turn whose client goes away: finished and stored -------------


async def test_a_plain_turn_is_finished_when_its_client_goes_away(
    storage: CountingStorage, server: FakeOpenAIServer
) -> None:
    server.add_reply(slow(1.0, text("the whole answer")))
    app = create_app(storage=storage, model=model_of(server))
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.3) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/v1/threads/p/messages", json={"content": "long one"})

        await wait_for(_count_is(storage, "p", 2), "the answer to be stored", timeout=30)
    user, answer = await storage.load("p")
    assert user.text == "long one" and answer.text == "the whole answer"
    assert not answer.metadata.get("interrupted")


async def test_a_plain_turn_is_finished_when_the_server_cancels_its_request(
    storage: CountingStorage, server: FakeOpenAIServer
) -> None:
    # some ASGI servers cancel the request's task when the client disconnects: the turn
    # runs on and is stored complete all the same
    server.add_reply(slow(0.5, text("complete anyway")))
    app = create_app(storage=storage, model=model_of(server))
    body = json.dumps({"content": "hello"}).encode()
    sent: list[dict[str, Any]] = []
    request = asyncio.create_task(_asgi_post(app, "/v1/threads/c/messages", body, sent))
    await wait_for(lambda: len(server.requests) == 1, "the model call")
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await wait_for(_count_is(storage, "c", 2), "the answer to be stored", timeout=30)
    _user, answer = await storage.load("c")
    assert answer.text == "complete anyway" and not answer.metadata.get("interrupted")
    assert not sent  # nobody was answered: the request had gone


def _count_is(storage: CountingStorage, thread: str, n: int) -> Any:
    async def check() -> bool:
        return await storage.count(thread) == n

    return check


async def _asgi_post(app: Any, path: str, body: bytes, sent: list[dict[str, Any]]) -> None:
    """POST ``body`` to ``app`` straight through ASGI (no server), recording what it sends."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    given = False
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
