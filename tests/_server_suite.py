"""The tests every server backend (Redis, PostgreSQL) must pass, as StorageConformance is for all.

A test module subclasses ``ServerBackendSuite``, fills in its class attributes and
``damage_message``, and provides these fixtures:

- ``admin``: a plain client of the server, to look at it or damage it directly;
- ``space``: this test's own namespace (a key prefix, a schema), cleaned up afterwards;
- ``store``: a storage of this backend in that namespace;
- ``unreachable_urls``: the backend's own ways to miss the server, by case name;
- ``login`` and ``wrong_logins``: a user and password the server accepts, and URLs with them
  that fail, each with a word its error must contain.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest
from _services import CutProxy, blackhole, check_writers, run_writers, unused_port, with_url

from conversa import (
    BackendUnavailable,
    ChatMessage,
    CorruptSessionError,
    create_session,
    open_storage,
)
from conversa.storage import ConversationStorage
from conversa.storage._urls import redact_url
from conversa.testing.scripted import ScriptedModel


class ServerBackendSuite:
    """The server-backend tests; a subclass names its server and how to reach into it."""

    NAME: ClassVar[str]
    """How the backend's errors name the server ("Redis")."""
    URL: ClassVar[str]
    SPACE_OPTION: ClassVar[str]
    """The URL option that puts a storage in a namespace ("prefix", "schema")."""
    DRIVER_MODULES: ClassVar[tuple[str, ...]]
    EXTRA: ClassVar[str]
    """The pip extra that installs the driver."""
    UNREACHABLE: ClassVar[tuple[tuple[str, str], ...]]
    """The ways to miss the server besides a wrong host or port, with a hint each error gives."""
    CUTS: ClassVar[tuple[tuple[str, str, bool], ...]]
    """Each write cut midway: operation, CutProxy mode, whether the write was applied."""

    @property
    def host(self) -> str:
        return urlsplit(self.URL).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        port = urlsplit(self.URL).port
        assert port is not None, "the test URL names its port"
        return port

    @property
    def userinfo(self) -> str:
        """The ``user[:password]@`` part of the URL, or nothing."""
        netloc = urlsplit(self.URL).netloc
        return netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""

    def url(
        self, space: str | None, netloc: str | None = None, path: str | None = None, **opts: Any
    ) -> str:
        """The server's URL in namespace ``space``, with another host part, database or options."""
        if space is not None:
            opts[self.SPACE_OPTION] = space
        return with_url(self.URL, netloc, path, **opts)

    async def damage_message(self, admin: Any, space: str, session_id: str, n: int) -> None:
        """Overwrite message ``n`` of ``session_id`` in the server with what is not JSON."""
        raise NotImplementedError

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize the tests whose cases differ by backend from the subclass's tables."""
        missed = f"check that {self.NAME} is running and the host and port are right"
        unreachable = [("wrong-host", missed), ("wrong-port", missed), *self.UNREACHABLE]
        cases: dict[str, tuple[str, Any]] = {
            "test_write_cut_midway_is_all_or_nothing": ("operation, mode, applied", self.CUTS),
            "test_unreachable_is_one_clear_line": ("where, hint", unreachable),
        }
        if metafunc.function.__name__ in cases:
            metafunc.parametrize(*cases[metafunc.function.__name__])

    async def test_tail_reads_only_the_newest(
        self, store: ConversationStorage, admin: Any, space: str
    ) -> None:
        """With an early message damaged in the server, load fails but tail of the newest works."""
        msgs = [ChatMessage.user(str(i)) for i in range(6)]
        await store.append("s", msgs[:1])
        await store.append("s", msgs[1:])
        await self.damage_message(admin, space, "s", 1)
        with pytest.raises(CorruptSessionError):
            await store.load("s")
        assert await store.tail("s") == msgs[5:]
        assert await store.tail("s", 4) == msgs[2:]
        with pytest.raises(CorruptSessionError, match=r"message 1 of session 's'.*damaged"):
            await store.tail("s", 5)
        assert await store.tail("unknown", 3) == []
        assert await store.count("s") == 6

    # -- many processes -------------------------------------------------------------------

    async def test_four_processes_append_to_one_session(
        self, store: ConversationStorage, space: str
    ) -> None:
        await run_writers(self.url(space), ["shared"] * 4, 250)
        check_writers(await store.load("shared"), [0, 1, 2, 3], 250)
        assert await store.count("shared") == 1000

    async def test_four_processes_append_to_four_sessions(
        self, store: ConversationStorage, space: str
    ) -> None:
        sessions = [f"own-{w}" for w in range(4)]
        await run_writers(self.url(space), sessions, 250)
        for w, sid in enumerate(sessions):
            check_writers(await store.load(sid), [w], 250)
            assert await store.count(sid) == 250
        assert sorted(await store.list_sessions()) == sessions

    # -- the server goes away -------------------------------------------------------------

    @pytest.fixture
    async def proxy(self) -> AsyncIterator[CutProxy]:
        p = CutProxy(self.host, self.port)
        await p.start()
        yield p
        await p.stop()

    def proxied(self, proxy: CutProxy, space: str) -> str:
        """The URL of namespace ``space`` on the server reached through ``proxy``."""
        return self.url(space, netloc=f"{self.userinfo}127.0.0.1:{proxy.port}")

    async def test_write_cut_midway_is_all_or_nothing(
        self,
        proxy: CutProxy,
        space: str,
        store: ConversationStorage,
        operation: str,
        mode: str,
        applied: bool,
    ) -> None:
        url = self.proxied(proxy, space)
        storage = open_storage(url)
        try:
            first = [ChatMessage.user("before"), ChatMessage.assistant("reply")]
            await storage.append("s", first)
            batch = [ChatMessage.user(f"CUT-{uuid.uuid4().hex} {i}") for i in range(3)]
            proxy.trigger, proxy.mode = batch[0].text.encode(), mode
            shown = re.escape(f"{self.NAME} at {redact_url(url)}")
            with pytest.raises(BackendUnavailable, match=shown):
                if operation == "append":
                    await storage.append("s", batch)
                else:
                    await storage.save("s", batch)
            assert proxy.trigger is None, "the proxy never saw the write"
            expected = (first + batch if operation == "append" else batch) if applied else first
            assert await store.load("s") == expected
            assert await store.count("s") == len(expected)
            # the next operation reconnects by itself
            after = [ChatMessage.assistant("after")]
            await storage.append("s", after)
            assert await storage.load("s") == expected + after
        finally:
            await storage.close()

    async def test_a_reply_committed_but_unanswered_counts_its_usage_once(
        self, proxy: CutProxy, space: str, store: ConversationStorage
    ) -> None:
        storage = open_storage(self.proxied(proxy, space))
        try:
            reply = f"CUT-{uuid.uuid4().hex}"
            session = await create_session("s", storage, model=ScriptedModel([reply]))
            proxy.trigger, proxy.mode = reply.encode(), "after"  # the reply's append, with usage
            with pytest.raises(BackendUnavailable):
                await session.send_message("hello")
            assert proxy.trigger is None, "the proxy never saw the write"
            info = await store.get_info("s")
            assert info is not None and info.usage.calls == 1  # the append's, not added again
            assert [m.text for m in session.history] == ["hello", reply]  # as stored
        finally:
            await storage.close()

    async def test_server_gone_then_back(self, proxy: CutProxy, space: str) -> None:
        storage = open_storage(self.proxied(proxy, space))
        gone = f"{self.NAME} at .*check that {self.NAME} is running"
        try:
            await storage.append("s", [ChatMessage.user("one")])
            port = proxy.port
            await proxy.stop()
            with pytest.raises(BackendUnavailable, match=gone):
                await storage.append("s", [ChatMessage.user("lost")])
            with pytest.raises(BackendUnavailable, match=gone):
                await storage.load("s")
            await proxy.start(port)
            await storage.append("s", [ChatMessage.user("two")])
            assert [m.text for m in await storage.load("s")] == ["one", "two"]
        finally:
            await storage.close()

    # -- wrong addresses and credentials --------------------------------------------------

    async def test_unreachable_is_one_clear_line(
        self, where: str, hint: str, space: str, unreachable_urls: dict[str, str]
    ) -> None:
        hole = blackhole()
        url = {
            "wrong-host": self.url(space, netloc=f"{self.userinfo}127.0.0.2:{self.port}"),
            "wrong-port": self.url(space, netloc=f"{self.userinfo}127.0.0.1:{unused_port()}"),
            "no-answer": self.url(
                None, netloc=f"{self.userinfo}127.0.0.1:{hole.getsockname()[1]}", timeout=0.5
            ),
            **unreachable_urls,
        }[where]
        storage = open_storage(url)
        try:
            with pytest.raises(BackendUnavailable) as info:
                await storage.append("s", [ChatMessage.user("x")])
            message = str(info.value)
            assert "\n" not in message
            assert hint in message
            assert redact_url(url) in message
        finally:
            await storage.close()
            hole.close()

    async def test_credentials_never_leak(
        self,
        login: tuple[str, str],
        wrong_logins: list[tuple[str, str]],
        space: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        user, password = login
        caplog.set_level(logging.DEBUG)
        good = self.url(space, netloc=f"{user}:{password}@{self.host}:{self.port}")
        storage = open_storage(good)
        assert password not in repr(storage) and "***" in repr(storage)
        await storage.append("s", [ChatMessage.user("authorised")])
        assert await storage.count("s") == 1
        await storage.close()

        seen: list[str] = []
        wrong_port = self.url(space, netloc=f"{user}:{password}@127.0.0.1:{unused_port()}")
        for url, hint in [*wrong_logins, (wrong_port, "port")]:
            storage = open_storage(url)
            with pytest.raises(BackendUnavailable) as info:
                await storage.load("s")
            assert hint in str(info.value)
            assert "\n" not in str(info.value)
            seen += [repr(storage), *traceback.format_exception(info.value)]
            await storage.close()
        seen.append(caplog.text)
        assert not [text for text in seen if password in text]

    async def test_missing_dependency_message(self) -> None:
        blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in self.DRIVER_MODULES)
        code = (
            f"import sys; {blocked}\n"
            "from conversa import open_storage, BackendUnavailable\n"
            f"try:\n    open_storage({self.URL!r})\n"
            "except BackendUnavailable as e:\n    print(e)\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert f"pip install 'conversa-ai[{self.EXTRA}]'" in out.decode()
