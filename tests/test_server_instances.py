"""Two `conversa serve` processes on one SQLite file, Redis or PostgreSQL: the same threads,
turns never interleaved."""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from _serve import ServeProcess, sse_events
from _services import postgres_space, redis_space, require_server

from conversa.testing.server import FakeOpenAIServer

POSTGRES = os.environ.get("CONVERSA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("CONVERSA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN = uuid.uuid4().hex[:10]
_counter = itertools.count()
TURNS = 6


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
async def shared_storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A storage URL both instances open: one SQLite file, a Redis prefix, a PostgreSQL schema."""
    name = f"conversa_serve_{RUN}_{next(_counter)}"
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
    elif request.param == "redis":
        require_server("Redis", REDIS, "CONVERSA_TEST_REDIS_URL", 6379)
        async with redis_space(REDIS, f"{name}:") as url:
            yield url
    else:
        require_server("PostgreSQL", POSTGRES, "CONVERSA_TEST_POSTGRES_URL", 5432)
        async with postgres_space(POSTGRES, name) as url:
            yield url


@pytest.fixture
def instances(
    env: dict[str, str], tmp_path: Path, shared_storage: str
) -> Iterator[list[ServeProcess]]:
    storage = shared_storage
    with (
        ServeProcess(env, "--storage", storage, "--turn-wait", "60", cwd=tmp_path) as one,
        ServeProcess(env, "--storage", storage, "--turn-wait", "60", cwd=tmp_path) as two,
    ):
        yield [one, two]


def streamed_turn(url: str, thread: str, content: str) -> dict[str, Any]:
    """One streamed turn, read to its done event."""
    body = {"content": content, "stream": True}
    with httpx.stream("POST", f"{url}/v1/threads/{thread}/messages", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = list(sse_events(r.iter_lines()))
    assert events[-1][0] == "done", events[-1]
    return json.loads(events[-1][1])  # type: ignore[no-any-return]


def test_a_turn_on_one_is_seen_by_the_next_on_the_other(
    instances: list[ServeProcess], server: FakeOpenAIServer
) -> None:
    one, two = instances
    assert streamed_turn(one.url, "shared", "remember the tulip")["success"]
    assert streamed_turn(two.url, "shared", "what flower?")["success"]
    seen = [m["content"] for m in server.requests[-1]["messages"]]
    assert "remember the tulip" in seen and "echo: remember the tulip" in seen
    listed = httpx.get(two.url + "/v1/threads/shared", timeout=30).json()
    assert listed["message_count"] == 4


def test_concurrent_turns_on_one_thread_never_interleave(
    instances: list[ServeProcess], server: FakeOpenAIServer
) -> None:
    server.chunk_delay = 0.02  # every answer streams for a while: turns would overlap
    urls = [instances[i % 2].url for i in range(TURNS)]
    with ThreadPoolExecutor(TURNS) as pool:
        results = list(
            pool.map(lambda i: streamed_turn(urls[i], "busy", f"question {i}"), range(TURNS))
        )
    assert all(r["success"] for r in results)
    history = httpx.get(instances[0].url + "/v1/threads/busy/messages", timeout=30).json()
    messages = history["messages"]
    assert history["total"] == 2 * TURNS
    # user, then its own answer: the echo proves the model saw this turn's question last
    for user, answer in zip(messages[::2], messages[1::2], strict=True):
        assert user["role"] == "user" and answer["role"] == "assistant"
        assert answer["content"] == f"echo: {user['content']}"
    assert {m["content"] for m in messages[::2]} == {f"question {i}" for i in range(TURNS)}
