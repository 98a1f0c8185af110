"""Helpers for the tests of the server backends (Redis, PostgreSQL).

Skipping (or failing, in CI) when a server is missing, writer processes that append at once,
and a TCP proxy that can cut the link to a server mid-operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from conversa import ChatMessage
from conversa.storage._urls import redact_url


def require_server(what: str, url: str, env_var: str, default_port: int) -> None:
    """Skip the calling test module when nothing listens at ``url``; fail instead in CI."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or default_port), 1).close()
    except OSError:
        message = f"no {what} at {redact_url(url)}: start one or set {env_var}"
        if os.environ.get("CONVERSA_TEST_REQUIRE_SERVICES"):
            pytest.fail(f"{message} (CONVERSA_TEST_REQUIRE_SERVICES is set)", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def with_url(url: str, netloc: str | None = None, path: str | None = None, **opts: Any) -> str:
    """``url`` with another host part, database or query options."""
    parts = urlsplit(url)
    return parts._replace(
        netloc=parts.netloc if netloc is None else netloc,
        path=parts.path if path is None else path,
        query=urlencode(opts),
    ).geturl()


@contextlib.asynccontextmanager
async def redis_space(url: str, prefix: str, **opts: Any) -> AsyncIterator[str]:
    """``url`` with the key prefix of one test (and ``opts``); its keys are deleted after."""
    import redis.asyncio as aioredis

    yield with_url(url, prefix=prefix, **opts)
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def postgres_space(url: str, schema: str, **opts: Any) -> AsyncIterator[str]:
    """``url`` with the schema of one test (and ``opts``); the schema is dropped after."""
    import asyncpg

    yield with_url(url, schema=schema, **opts)
    con = await asyncpg.connect(url)
    try:
        await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await con.close()


def run_children(code: str, arguments: Sequence[Sequence[str]], timeout: float = 120) -> None:
    """Run ``python -c code`` once per argument list, all at once; each must exit 0."""
    procs = [
        subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE)
        for args in arguments
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err.decode()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORKER = """
import asyncio, sys
from conversa import ChatMessage, open_storage

async def main(url, sid, writer, total):
    store = open_storage(url)
    print("ready", flush=True)
    sys.stdin.readline()
    sent, batch = 0, 0
    while sent < total:
        size = min(1 + batch % 3, total - sent)
        msgs = [
            ChatMessage.user(f"{writer}-{i}", metadata={"w": writer, "i": i, "b": batch})
            for i in range(sent, sent + size)
        ]
        await store.append(sid, msgs)
        sent, batch = sent + size, batch + 1
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def run_writers(url: str, sessions: list[str], per_writer: int) -> None:
    """Start one process per session id, let them append at the same moment, wait for all."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            url,
            sid,
            str(w),
            str(per_writer),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for w, sid in enumerate(sessions)
    ]
    for p in procs:
        assert p.stdout is not None
        assert await p.stdout.readline() == b"ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    assert [await p.wait() for p in procs] == [0] * len(procs)


def check_writers(loaded: list[ChatMessage], writers: list[int], per_writer: int) -> None:
    """Nothing lost or duplicated, each writer's order kept, each append contiguous."""
    assert len(loaded) == len(writers) * per_writer
    assert len({m.id for m in loaded}) == len(loaded)
    for w in writers:
        assert [m.metadata["i"] for m in loaded if m.metadata["w"] == w] == list(range(per_writer))
    runs = [key for key, _ in itertools.groupby((m.metadata["w"], m.metadata["b"]) for m in loaded)]
    assert len(runs) == len(set(runs)), "an append was split by another writer's messages"


class CutProxy:
    """A TCP proxy on 127.0.0.1 in front of the server, which the test can cut at will.

    Arm it with ``trigger``: the next client chunk containing those bytes is either half
    forwarded and the link cut ("half": the server sees a broken request), or forwarded whole
    and the link cut when the server's reply arrives ("after": the server did the work, the
    client never hears of it). With ``linger`` a server that hangs up is not passed on: the
    client gets the server's last words but its socket stays open, as when a FIN is late.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.trigger: bytes | None = None
        self.mode = "half"
        self.linger = False
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    def drop_all(self) -> None:
        """Close every open connection, as a server restart or CLIENT KILL would."""
        for link in list(self._links):
            for writer in link:
                writer.close()
            self._links.discard(link)

    async def stop(self) -> None:
        """Stop listening and cut every connection: the server is gone."""
        assert self._server is not None
        self._server.close()
        self.drop_all()
        await self._server.wait_closed()

    def _cut(self, link: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        for writer in link:
            writer.transport.abort()
        self._links.discard(link)

    async def _handle(self, c_read: asyncio.StreamReader, c_write: asyncio.StreamWriter) -> None:
        try:
            s_read, s_write = await asyncio.open_connection(*self.target)
        except OSError:
            c_write.transport.abort()
            return
        link = (c_write, s_write)
        self._links.add(link)
        swallow = asyncio.Event()

        async def upstream() -> None:
            while data := await c_read.read(65536):
                if self.trigger is not None and self.trigger in data:
                    self.trigger = None
                    if self.mode == "half":
                        s_write.write(data[: len(data) // 2])
                        await s_write.drain()
                        return
                    swallow.set()
                s_write.write(data)
                await s_write.drain()

        async def downstream() -> None:
            while data := await s_read.read(65536):
                if swallow.is_set():
                    return
                c_write.write(data)
                await c_write.drain()
            if self.linger:
                await c_write.wait_closed()

        async def pump(direction: Callable[[], Any]) -> None:
            try:
                await direction()
            except OSError:
                pass
            finally:
                self._cut(link)

        await asyncio.gather(pump(upstream), pump(downstream))


def blackhole() -> socket.socket:
    """A socket that accepts connections (in its backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s
