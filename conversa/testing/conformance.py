"""The storage conformance suite: every ConversationStorage must pass it.

Subclass ``StorageConformance`` in a test module and provide a ``storage`` fixture that yields a
fresh, empty backend::

    import pytest_asyncio
    from conversa.testing.conformance import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest_asyncio.fixture
        async def storage(self, tmp_path):
            store = MyStorage(tmp_path)
            yield store
            await store.close()

The suite needs pytest, pytest-asyncio and hypothesis (``pip install 'conversa-ai[dev]'``).

The lease tests are also available alone, as ``LeaseConformance`` (StorageConformance includes
them). A backend shared by processes also defines a ``lease_url`` fixture: the URL of the same
store for ``open_storage`` in a child process, which takes the lease and is killed; another
holder must then get it (for a backend with a lease ttl, within that ttl: the child asks for
``LEASE_CHILD_TTL`` seconds).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..errors import InvalidSessionId, SessionBusy, StateValueError, StorageError
from ..messages import ChatMessage, Role, ToolCall
from ..storage._stored import RouteVisit, SessionFlow, StateEntry, SummaryMark, UsageTotals
from ..storage.base import ConversationStorage

# -- strategies: arbitrary valid messages ------------------------------------------------

_text = st.text(max_size=300)
_json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
json_values: st.SearchStrategy[Any] = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_metadata = st.dictionaries(_text, json_values, max_size=4)
_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_parts = st.lists(
    st.builds(lambda t: {"type": "text", "text": t}, _text)
    | st.builds(
        lambda u: {"type": "image_url", "image_url": {"url": "data:image/png;base64," + u}},
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", max_size=40),
    ),
    min_size=1,
    max_size=3,
)
_tool_calls = st.lists(
    st.builds(
        ToolCall,
        id=st.text(min_size=1, max_size=40),
        name=st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,30}", fullmatch=True),
        arguments=st.builds(lambda d: __import__("json").dumps(d), st.dictionaries(_text, _text)),
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def chat_messages(draw: st.DrawFn) -> ChatMessage:
    """Any valid ChatMessage: every role, text or content parts, tool calls, metadata."""
    role: Role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
    kw: dict[str, Any] = {
        "created_at": draw(_times),
        "metadata": draw(_metadata),
        "name": draw(st.none() | st.text(min_size=1, max_size=20)),
    }
    if role == "user":
        kw["content"] = draw(_text | _parts)
    elif role == "system":
        kw["content"] = draw(_text)
    elif role == "assistant":
        calls = draw(st.just(()) | _tool_calls)
        kw["tool_calls"] = tuple(calls)
        kw["content"] = draw(_text | st.none()) if calls else draw(_text)
    else:
        kw["tool_call_id"] = draw(st.text(min_size=1, max_size=40))
        kw["content"] = draw(_text)
    return ChatMessage(role=role, **kw)


def _sid() -> str:
    return f"conf-{uuid.uuid4().hex[:12]}"


def _user(text: str, **meta: Any) -> ChatMessage:
    return ChatMessage.user(text, metadata=dict(meta))


# Every subclass runs the same test methods against another backend: that is the point of the
# suite, so the differing-executors check does not apply. Each example uses a fresh session id,
# which is why sharing the function-scoped storage fixture across examples is safe.
_HYPOTHESIS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.differing_executors,
    ],
)

# Tests that need writes in a known order set the sessions' times (as a copy does) instead of
# sleeping: a clock, and a file's mtime above all, may be too coarse to tell two writes apart.
_LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


async def _age(storage: ConversationStorage, session_id: str, minutes: int = 0) -> None:
    """Date the session ``minutes`` after _LONG_AGO, so that any later write is newer."""
    moment = _LONG_AGO + timedelta(minutes=minutes)
    await storage.set_times(session_id, created_at=moment, updated_at=moment)


def _dated(text: str, minutes: int = 0) -> ChatMessage:
    """A user message written ``minutes`` after _LONG_AGO, as in a copied session.

    The default get_info counts the messages' own times in ``updated_at``, so an aged session
    holds only aged messages.
    """
    return ChatMessage(role="user", content=text, created_at=_LONG_AGO + timedelta(minutes=minutes))


LEASE_CHILD_TTL = 1.0
"""The lease ttl (seconds) the killed child of the dead-holder test asks for."""
_BOUND = 30.0
"""Seconds any wait of the lease tests may take before the test fails (never reached if well)."""

_LEASE_CHILD = """
import asyncio, sys
from conversa import open_storage

async def main(url, sid, ttl):
    store = open_storage(url)
    async with store.lease(sid, ttl=ttl, wait=30):
        print("held", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


async def _holding(storage: ConversationStorage, sid: str) -> tuple[asyncio.Task[None], Any]:
    """A task that holds the lease of ``sid`` until cancelled or its event is set."""
    held, done = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with storage.lease(sid, wait=_BOUND):
            held.set()
            await done.wait()

    task = asyncio.create_task(hold())
    await asyncio.wait_for(held.wait(), _BOUND)
    return task, done


async def _free(storage: ConversationStorage, sid: str) -> bool:
    """Whether the lease of ``sid`` can be taken at once (and give it back)."""
    try:
        async with storage.lease(sid, wait=0):
            return True
    except SessionBusy:
        return False


class LeaseConformance:
    """The session lease as tests: subclass it (or StorageConformance), define ``storage``."""

    pytestmark = pytest.mark.asyncio

    @pytest.fixture
    async def storage(self) -> AsyncIterator[ConversationStorage]:
        """Override: yield a fresh, empty backend and close it afterwards."""
        raise NotImplementedError("define a `storage` fixture in your StorageConformance subclass")
        yield  # pragma: no cover

    @pytest.fixture
    def lease_url(self) -> str | None:
        """Override for a backend shared by processes: the URL of the store ``storage`` uses."""
        return None

    async def test_lease_is_exclusive_per_session(self, storage: ConversationStorage) -> None:
        sid, other = _sid(), _sid()
        task, done = await _holding(storage, sid)
        assert not await _free(storage, sid)
        assert await _free(storage, other)  # another session is not held up
        done.set()
        await asyncio.wait_for(task, _BOUND)
        assert await _free(storage, sid)
        assert not await storage.exists(sid)  # a lease is not a write

    async def test_lease_released_on_exit_exception_and_cancel(
        self, storage: ConversationStorage
    ) -> None:
        sid = _sid()
        async with storage.lease(sid):
            pass
        assert await _free(storage, sid)
        with pytest.raises(KeyError):
            async with storage.lease(sid):
                raise KeyError("boom")
        assert await _free(storage, sid)
        task, _ = await _holding(storage, sid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, _BOUND)
        assert await _free(storage, sid)

    async def test_lease_waits_for_the_holder(self, storage: ConversationStorage) -> None:
        sid = _sid()
        task, done = await _holding(storage, sid)
        entered = asyncio.Event()

        async def waiter() -> None:
            async with storage.lease(sid, wait=_BOUND):
                entered.set()

        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)  # give the waiter a chance to (wrongly) get in
        assert not entered.is_set()
        done.set()
        await asyncio.wait_for(waiting, _BOUND)
        assert entered.is_set()
        await task

    async def test_lease_raises_session_busy_after_wait(self, storage: ConversationStorage) -> None:
        sid = _sid()
        task, done = await _holding(storage, sid)
        started = time.monotonic()
        with pytest.raises(SessionBusy, match="in use elsewhere"):
            async with storage.lease(sid, wait=0.2):
                pass  # pragma: no cover
        assert time.monotonic() - started >= 0.2
        done.set()
        await task
        assert await _free(storage, sid)  # the failed wait left nothing behind

    async def test_cancelled_lease_wait_stops(self, storage: ConversationStorage) -> None:
        sid = _sid()
        task, done = await _holding(storage, sid)
        waiters: list[asyncio.Task[None]] = []
        for _ in range(10):  # a cancel may land in any step of a wait
            waiting = asyncio.create_task(_free_after(storage, sid))
            await asyncio.sleep(0.005 * len(waiters))
            waiting.cancel()
            waiters.append(waiting)
        results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), _BOUND)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        done.set()
        await task
        assert await _free(storage, sid)

    async def test_lease_arguments_are_checked(self, storage: ConversationStorage) -> None:
        with pytest.raises(InvalidSessionId):
            storage.lease("")
        for wait in (-1, float("nan"), "1", True):
            with pytest.raises(ValueError, match="wait"):
                storage.lease("s", wait=wait)  # type: ignore[arg-type]
        for ttl in (0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="ttl"):
                storage.lease("s", ttl=ttl)
        async with storage.lease("s", wait=None, ttl=5):
            pass

    async def test_dead_holders_lease_is_taken_over(
        self, storage: ConversationStorage, lease_url: str | None
    ) -> None:
        if lease_url is None:
            return  # a lease of this process only dies with its holder (the cancel test)
        sid = _sid()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _LEASE_CHILD,
            lease_url,
            sid,
            str(LEASE_CHILD_TTL),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), _BOUND)
            assert line.strip() == b"held"
            assert not await _free(storage, sid)
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()
        async with storage.lease(sid, wait=_BOUND):
            pass


async def _free_after(storage: ConversationStorage, sid: str) -> None:
    async with storage.lease(sid, wait=_BOUND):
        raise AssertionError("the lease was held by another task")  # pragma: no cover


class StorageConformance(LeaseConformance):
    """The contract of ConversationStorage as tests; subclass it and define ``storage``."""

    # marked, so the suite runs in pytest-asyncio's default strict mode, not only in auto mode
    pytestmark = pytest.mark.asyncio

    # -- round trips ---------------------------------------------------------------------

    @_HYPOTHESIS
    @given(history=st.lists(chat_messages(), max_size=6))
    async def test_save_load_roundtrip(
        self, storage: ConversationStorage, history: list[ChatMessage]
    ) -> None:
        sid = _sid()
        await storage.save(sid, history)
        assert await storage.load(sid) == history
        assert await storage.count(sid) == len(history)

    @_HYPOTHESIS
    @given(batches=st.lists(st.lists(chat_messages(), min_size=1, max_size=3), max_size=4))
    async def test_append_roundtrip(
        self, storage: ConversationStorage, batches: list[list[ChatMessage]]
    ) -> None:
        sid = _sid()
        for batch in batches:
            await storage.append(sid, batch)
        expected = [m for batch in batches for m in batch]
        assert await storage.load(sid) == expected
        assert await storage.count(sid) == len(expected)

    async def test_megabyte_contents(self, storage: ConversationStorage) -> None:
        big = ('line one\nzweite Zeile ü 雪 🎉 "quoted" \\ back\t tab\n' * 20_000)[:1_000_000]
        parts = [{"type": "text", "text": big}, {"type": "text", "text": "tail"}]
        msgs = [ChatMessage.user(big), ChatMessage.user(parts), ChatMessage.assistant(big)]
        sid = _sid()
        await storage.append(sid, msgs[:1])
        await storage.append(sid, msgs[1:])
        assert await storage.load(sid) == msgs

    async def test_loaded_messages_are_not_shared(self, storage: ConversationStorage) -> None:
        sid = _sid()
        original = ChatMessage.user([{"type": "text", "text": "hi"}], metadata={"k": [1]})
        await storage.append(sid, [original])
        loaded = (await storage.load(sid))[0]
        assert isinstance(loaded.content, list)
        loaded.content[0]["text"] = "changed"
        loaded.metadata["k"].append(2)
        assert await storage.load(sid) == [original]
        assert original.metadata == {"k": [1]}

    # -- history operations --------------------------------------------------------------

    async def test_unknown_session(self, storage: ConversationStorage) -> None:
        sid = _sid()
        assert await storage.load(sid) == []
        assert await storage.count(sid) == 0
        assert not await storage.exists(sid)
        assert await storage.get_info(sid) is None
        assert await storage.get_state(sid) == {}
        assert await storage.pop(sid) == []
        assert sid not in await storage.list_sessions()

    async def test_append_after_save_and_save_replaces(self, storage: ConversationStorage) -> None:
        sid = _sid()
        a, b, c, d = (_user(x) for x in "abcd")
        await storage.save(sid, [a, b])
        await storage.append(sid, [c])
        assert await storage.load(sid) == [a, b, c]
        await storage.save(sid, [d])
        assert await storage.load(sid) == [d]
        await storage.append(sid, [a])
        assert await storage.load(sid) == [d, a]
        assert await storage.count(sid) == 2

    async def test_save_empty_creates_session(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.save(sid, [])
        assert await storage.exists(sid)
        assert await storage.count(sid) == 0
        assert sid in await storage.list_sessions()
        await storage.append(sid, [_user("x")])
        await storage.save(sid, [])
        assert await storage.load(sid) == []

    async def test_order_kept_across_many_appends(self, storage: ConversationStorage) -> None:
        sid = _sid()
        for i in range(50):
            await storage.append(sid, [_user(f"m{i}"), ChatMessage.assistant(f"r{i}")])
        texts = [m.text for m in await storage.load(sid)]
        assert texts == [t for i in range(50) for t in (f"m{i}", f"r{i}")]

    async def test_empty_append_creates_the_session(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.append(sid, [])
        assert await storage.exists(sid)
        assert await storage.count(sid) == 0
        assert sid in await storage.list_sessions()

    async def test_search(self, storage: ConversationStorage) -> None:
        word = f"w{uuid.uuid4().hex[:10]}"
        old, new = _sid(), _sid()
        await storage.append(old, [_dated(f"the {word} fox"), _dated("no match")])
        await _age(storage, old)
        parts = [{"type": "text", "text": f"parts with {word} inside"}]
        await storage.append(new, [_user("nothing"), ChatMessage.assistant(f"a {word} reply")])
        await storage.append(new, [ChatMessage.user(parts)])
        hits = await storage.search(word)
        assert [(h.session_id, h.position) for h in hits] == [(new, 1), (new, 2), (old, 0)]
        assert hits[0].message.text == f"a {word} reply"
        assert len(await storage.search(word, limit=2)) == 2
        await storage.pop(new)
        await storage.delete(old)
        assert [(h.session_id, h.position) for h in await storage.search(word)] == [(new, 1)]
        assert await storage.search("   ") == []

    async def test_search_matches_words_and_prefixes(self, storage: ConversationStorage) -> None:
        """One rule on every backend: each query word is a word or the start of one."""
        tag = f"k{uuid.uuid4().hex[:10]}"
        sid = _sid()
        texts = [
            f"{tag} The Deployment failed",
            f"{tag} un café, s'il vous plaît",
            f"{tag} Straße und Strasse",
            f"{tag} 東京タワー に行く",
            f"{tag} foo-bar/baz_qux (x.y)",
            f"{tag} redeploy later",
        ]
        await storage.append(sid, [_user(t) for t in texts])

        async def found(query: str) -> list[int]:
            return [h.position for h in await storage.search(f"{tag} {query}")]

        assert await found("deployment") == [0]  # a word
        assert await found("deploy") == [0]  # the start of a word; "redeploy" does not match
        assert await found("ploy") == []  # the inside of a word never matches
        assert await found("DEPLOYMENT FAIL") == [0]  # case ignored, every word required
        assert await found("deployment later") == []
        assert await found("cafe") == await found("CAFÉ") == [1]  # accents ignored
        assert await found("plait") == [1] and await found("s") == [1, 2]  # s'il: "s", "il"
        assert await found("straße") == [2] and await found("strass") == [2]  # ß is not ss
        assert await found("東京") == [3] and await found("タワー") == []  # one word per run
        assert await found("foo bar") == await found("foo-bar") == [4]  # punctuation splits
        assert await found("baz") == await found("qux") == await found("y") == [4]
        assert await found("baz_qux") == [4]  # "_" splits too
        assert await found("!!") == [0, 1, 2, 3, 4, 5]  # no word: only the tag counts
        assert await storage.search("!! ?") == []  # a query without words finds nothing
        assert await storage.search(f"{tag}x") == []

    async def test_append_empty_is_harmless(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.append(sid, [_user("a")])
        await storage.append(sid, [])
        assert [m.text for m in await storage.load(sid)] == ["a"]

    async def test_concurrent_appends_stay_contiguous(self, storage: ConversationStorage) -> None:
        sid = _sid()

        async def writer(w: int) -> None:
            for i in range(5):
                batch = [_user(f"{w}-{i}-{j}", w=w, i=i) for j in range(3)]
                await storage.append(sid, batch)

        await asyncio.gather(*(writer(w) for w in range(6)))
        loaded = await storage.load(sid)
        assert len(loaded) == 90
        assert len({m.id for m in loaded}) == 90
        for k in range(0, 90, 3):
            texts = [m.text for m in loaded[k : k + 3]]
            prefix = texts[0].rsplit("-", 1)[0]
            assert texts == [f"{prefix}-{j}" for j in range(3)], texts

    async def test_tail(self, storage: ConversationStorage) -> None:
        sid = _sid()
        assert await storage.tail(sid) == []
        msgs = [_user(str(i)) for i in range(5)]
        await storage.append(sid, msgs[:2])
        await storage.append(sid, msgs[2:])
        assert await storage.tail(sid) == msgs[4:]
        assert await storage.tail(sid, 3) == msgs[2:]
        assert await storage.tail(sid, 9) == msgs
        assert await storage.tail(sid, 0) == []
        with pytest.raises(ValueError):
            await storage.tail(sid, -1)

    async def test_read_gives_a_range_of_positions(self, storage: ConversationStorage) -> None:
        sid = _sid()
        assert await storage.read(sid) == []
        assert await storage.read(sid, 3, 2) == []
        msgs = [_user(str(i)) for i in range(7)]
        await storage.append(sid, msgs[:3])
        await storage.append(sid, msgs[3:])
        assert await storage.read(sid) == msgs
        # every offset and limit around the history's length (both ends of a file are read)
        for offset in range(9):
            assert await storage.read(sid, offset) == msgs[offset:], offset
            for limit in range(9):
                got = await storage.read(sid, offset, limit)
                assert got == msgs[offset : offset + limit], (offset, limit)
        assert await storage.read(sid, 2**40, 2**40) == []
        assert await storage.read(sid, 2**64) == []  # past any SQL integer: no overflow
        assert await storage.read(sid, 5, 2**64) == msgs[5:]
        # positions stay dense after a cut and a replacement
        await storage.truncate(sid, 4)
        await storage.append(sid, [msgs[6]])
        assert await storage.read(sid, 3, 5) == [msgs[3], msgs[6]]
        await storage.pop(sid, 2)
        assert await storage.read(sid, 1) == msgs[1:3]
        await storage.save(sid, msgs[5:])
        assert await storage.read(sid, 1) == msgs[6:]
        assert await storage.read(sid, 0, 1) == msgs[5:6]
        bad_values: list[dict[str, Any]] = [
            {"offset": -1},
            {"limit": -1},
            {"offset": True},
            {"limit": 1.5},
            {"offset": -1, "limit": 0},  # checked even when nothing is asked for
            {"offset": "1", "limit": 0},
        ]
        for bad in bad_values:
            with pytest.raises(ValueError):
                await storage.read(sid, **bad)
        with pytest.raises(InvalidSessionId):
            await storage.read("", 0, 1)

    async def test_pop_and_truncate(self, storage: ConversationStorage) -> None:
        sid = _sid()
        msgs = [_user(str(i)) for i in range(6)]
        await storage.append(sid, msgs)
        assert await storage.pop(sid) == msgs[5:]
        assert await storage.pop(sid, 2) == msgs[3:5]
        assert await storage.pop(sid, 0) == []
        assert await storage.count(sid) == 3
        await storage.truncate(sid, 5)
        assert await storage.load(sid) == msgs[:3]
        await storage.truncate(sid, 1)
        assert await storage.load(sid) == msgs[:1]
        await storage.append(sid, [msgs[4]])
        assert await storage.load(sid) == [msgs[0], msgs[4]]
        assert await storage.pop(sid, 10) == [msgs[0], msgs[4]]
        assert await storage.load(sid) == []
        assert await storage.exists(sid)
        with pytest.raises(ValueError):
            await storage.pop(sid, -1)
        with pytest.raises(ValueError):
            await storage.truncate(sid, -1)

    async def test_delete_is_complete_and_idempotent(self, storage: ConversationStorage) -> None:
        sid, other = _sid(), _sid()
        await storage.append(sid, [_user("a")])
        await storage.set_state(sid, {"k": 1})
        await storage.update_info(sid, title="t", user_id="u")
        await storage.append(other, [_user("keep")])
        await storage.delete(sid)
        await storage.delete(sid)
        await storage.delete(_sid())
        assert not await storage.exists(sid)
        assert await storage.load(sid) == []
        assert await storage.get_state(sid) == {}
        assert await storage.get_info(sid) is None
        assert sid not in await storage.list_sessions()
        assert [m.text for m in await storage.load(other)] == ["keep"]
        await storage.append(sid, [_user("again")])
        info = await storage.get_info(sid)
        assert info is not None and info.user_id is None and info.title == "again"

    async def test_list_sessions_newest_update_first(self, storage: ConversationStorage) -> None:
        ids = [_sid() for _ in range(3)]
        for minutes, sid in enumerate(ids):
            await storage.append(sid, [_dated(sid, minutes)])
            await _age(storage, sid, minutes)
        listed = [s for s in await storage.list_sessions() if s in ids]
        assert listed == ids[::-1]
        await storage.append(ids[0], [_user("later")])
        listed = [s for s in await storage.list_sessions() if s in ids]
        assert listed == [ids[0], ids[2], ids[1]]

    async def test_exists(self, storage: ConversationStorage) -> None:
        a, b, c = _sid(), _sid(), _sid()
        await storage.append(a, [_user("x")])
        await storage.set_state(b, {"k": "v"})
        await storage.update_info(c, user_id="u")
        assert await storage.exists(a)
        assert await storage.exists(b)
        assert await storage.exists(c)
        assert not await storage.exists(_sid())

    @pytest.mark.parametrize("bad", ["", "nul\x00id", "x" * 300, "tab\tid", "line\nbreak"])
    async def test_invalid_session_ids_rejected(
        self, storage: ConversationStorage, bad: str
    ) -> None:
        with pytest.raises(InvalidSessionId):
            await storage.append(bad, [_user("x")])
        with pytest.raises(InvalidSessionId):
            await storage.load(bad)
        with pytest.raises(InvalidSessionId):
            await storage.save(bad, [])
        with pytest.raises(InvalidSessionId):
            await storage.set_state(bad, {"k": 1})
        reads: list[Callable[[], Awaitable[object]]] = [
            lambda: storage.exists(bad),
            lambda: storage.delete(bad),
            lambda: storage.count(bad),
            lambda: storage.tail(bad),
            lambda: storage.pop(bad),
            lambda: storage.truncate(bad, 0),
            lambda: storage.get_info(bad),
            lambda: storage.update_info(bad, title="t"),
            lambda: storage.get_state(bad),
            lambda: storage.get_state_entries(bad),
            lambda: storage.delete_state(bad, ["k"]),
            lambda: storage.clear_state(bad),
        ]
        for call in reads:
            with pytest.raises(InvalidSessionId):
                await call()

    @pytest.mark.parametrize(
        "odd",
        [
            "../../etc/passwd",
            "/abs/path",
            "a/b",
            "..",
            ".",
            "alice@example.com",
            "ü 雪 🎉",
            "x" * 256,
        ],
    )
    async def test_odd_but_valid_ids_roundtrip(
        self, storage: ConversationStorage, odd: str
    ) -> None:
        await storage.append(odd, [_user(odd)])
        assert await storage.exists(odd)
        assert [m.text for m in await storage.load(odd)] == [odd]
        assert odd in await storage.list_sessions()
        await storage.delete(odd)
        assert not await storage.exists(odd)

    # -- session info --------------------------------------------------------------------

    async def test_info_timestamps_and_counts(self, storage: ConversationStorage) -> None:
        sid = _sid()
        before = datetime.now(UTC) - timedelta(seconds=1)
        await storage.append(sid, [ChatMessage.system("sys"), _user("Hello   there\nfriend")])
        info = await storage.get_info(sid)
        assert info is not None
        assert info.session_id == sid
        assert info.message_count == 2
        assert info.title == "Hello there friend"
        assert info.status == "active"
        assert info.user_id is None
        assert before <= info.created_at <= info.updated_at
        await _age(storage, sid)
        info = await storage.get_info(sid)
        assert info is not None
        await storage.append(sid, [ChatMessage.assistant("hi")])
        later = await storage.get_info(sid)
        assert later is not None
        assert later.message_count == 3
        assert later.created_at == info.created_at
        assert later.updated_at > info.updated_at

    async def test_every_kind_of_write_moves_updated_at(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.append(sid, [_dated(str(i)) for i in range(4)])
        writes: list[Callable[[], Awaitable[object]]] = [
            lambda: storage.pop(sid),
            lambda: storage.truncate(sid, 1),
            lambda: storage.save(sid, [_user("x")]),
            lambda: storage.set_state(sid, {"k": 1}),
            lambda: storage.update_info(sid, title="t"),
            lambda: storage.append(sid, [_user("y")]),
        ]
        for write in writes:
            await _age(storage, sid)
            before = await storage.get_info(sid)
            await write()
            after = await storage.get_info(sid)
            assert before is not None and after is not None
            assert after.updated_at > before.updated_at, write

    async def test_default_title_is_shortened(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.append(sid, [_user("word " * 100)])
        info = await storage.get_info(sid)
        assert info is not None and info.title is not None
        assert info.title.startswith("word word")
        assert len(info.title) <= 60

    async def test_update_info(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.append(sid, [_user("first question")])
        info = await storage.update_info(
            sid, title="My chat", user_id="alice", status="completed", metadata={"tags": ["x"]}
        )
        assert (info.title, info.user_id, info.status, info.metadata) == (
            "My chat",
            "alice",
            "completed",
            {"tags": ["x"]},
        )
        again = await storage.get_info(sid)
        assert again == info
        await storage.update_info(sid, title=None)
        reset = await storage.get_info(sid)
        assert reset is not None
        assert reset.title == "first question"
        assert reset.user_id == "alice"
        with pytest.raises(ValueError):
            await storage.update_info(sid, status="sleeping")  # not a SessionStatus
        with pytest.raises(ValueError):
            await storage.update_info(sid, metadata={"bad": object()})

    async def test_usage_totals_add_up_atomically(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.append(sid, [_user("q")])
        info = await storage.get_info(sid)
        assert info is not None and info.usage == UsageTotals()
        await storage.add_usage(sid, prompt_tokens=10, completion_tokens=3, calls=1)
        await storage.add_usage(sid, prompt_tokens=5, calls=1)
        await asyncio.gather(*(storage.add_usage(sid, completion_tokens=1) for _ in range(8)))
        info = await storage.get_info(sid)
        assert info is not None
        assert info.usage == UsageTotals(prompt_tokens=15, completion_tokens=11, calls=2)
        assert info.usage.total == 26
        # the app's own info stays apart: replacing metadata keeps the totals, and back
        await storage.update_info(sid, metadata={"usage": "mine"}, title="t")
        info = await storage.get_info(sid)
        assert info is not None and info.metadata == {"usage": "mine"}
        assert info.usage.calls == 2 and info.title == "t"
        await storage.append(sid, [ChatMessage.assistant("a")])
        found = [i for i in await storage.find_sessions() if i.session_id == sid]
        assert found and found[0].usage == info.usage and found[0].message_count == 2
        with pytest.raises(ValueError):
            await storage.add_usage(sid, prompt_tokens=-1)
        fresh = _sid()
        await storage.add_usage(fresh, calls=1)  # creates the session, as any write does
        info = await storage.get_info(fresh)
        assert info is not None and info.usage.calls == 1
        await storage.delete(sid)
        await storage.append(sid, [_user("again")])
        info = await storage.get_info(sid)
        assert info is not None and info.usage == UsageTotals()

    async def test_an_append_adds_its_usage_in_the_same_write(
        self, storage: ConversationStorage
    ) -> None:
        sid = _sid()
        await storage.append(sid, [_user("q")], usage=UsageTotals(7, 2, 1))  # a new session
        info = await storage.get_info(sid)
        assert info is not None and info.message_count == 1
        assert info.usage == UsageTotals(prompt_tokens=7, completion_tokens=2, calls=1)
        replies = [ChatMessage.assistant(f"a{i}") for i in range(8)]
        await asyncio.gather(
            *(storage.append(sid, [m], usage=UsageTotals(1, 1, 1)) for m in replies)
        )
        await storage.add_usage(sid, prompt_tokens=100)
        await storage.append(sid, [ChatMessage.assistant("free")], usage=UsageTotals())
        await storage.append(sid, [], usage=UsageTotals(calls=1))  # no message, still counted
        info = await storage.get_info(sid)
        assert info is not None and info.message_count == 10
        assert info.usage == UsageTotals(prompt_tokens=115, completion_tokens=10, calls=10)
        assert (await storage.tail(sid, 1))[0].text == "free"
        for bad in (UsageTotals(prompt_tokens=-1), UsageTotals(calls=True)):
            with pytest.raises(ValueError):
                await storage.append(sid, [ChatMessage.assistant("refused")], usage=bad)
        assert await storage.count(sid) == 10  # a refused append stores nothing
        info = await storage.get_info(sid)
        assert info is not None and info.usage.calls == 10

    # -- the flow (falai's route, step, history and data) and completed_at ----------------

    async def test_flow_is_kept_with_the_info(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.append(sid, [_user("q")])
        info = await storage.get_info(sid)
        assert info is not None and info.flow == SessionFlow() and info.completed_at is None
        t0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
        t1 = t0 + timedelta(minutes=3, microseconds=7)
        flow = SessionFlow(
            route="book-flight",
            step="ask_date",
            entered_at=t1,
            step_entered_at=t1 + timedelta(seconds=1),
            history=(
                RouteVisit("greet", t0, t1, completed=True),
                RouteVisit("book-flight", t1),
            ),
            data={"book-flight": {"destination": "Paris", "passengers": 2}, "greet": {}},
        )
        await storage.set_flow(sid, flow)
        info = await storage.get_info(sid)
        assert info is not None and info.flow == flow  # times exact to the microsecond
        assert info.message_count == 1 and info.usage == UsageTotals()
        listed = [i for i in await storage.find_sessions() if i.session_id == sid]
        assert listed and listed[0].flow == flow
        # apart from the app's metadata and the usage totals, both ways
        await storage.update_info(sid, metadata={"flow": "mine"}, title="t")
        await storage.add_usage(sid, calls=1)
        info = await storage.get_info(sid)
        assert info is not None and info.flow == flow and info.metadata == {"flow": "mine"}
        assert info.usage.calls == 1
        # a new position replaces the old whole
        await storage.set_flow(sid, SessionFlow(history=flow.history[:1]))
        info = await storage.get_info(sid)
        assert info is not None and info.flow == SessionFlow(history=flow.history[:1])
        await storage.set_flow(sid, SessionFlow())
        info = await storage.get_info(sid)
        assert info is not None and info.flow == SessionFlow()
        fresh = _sid()
        await storage.set_flow(fresh, flow)  # creates the session, as any write does
        assert await storage.exists(fresh)
        await storage.delete(fresh)
        await storage.append(fresh, [_user("again")])
        info = await storage.get_info(fresh)
        assert info is not None and info.flow == SessionFlow()

    async def test_flow_is_checked_before_anything_is_stored(
        self, storage: ConversationStorage
    ) -> None:
        sid = _sid()
        now = datetime.now(UTC)
        bad: list[Any] = [
            {"route": "r"},
            SessionFlow(route="", entered_at=now),
            SessionFlow(route="r"),  # no entered_at
            SessionFlow(route="r\n", entered_at=now),
            SessionFlow(route="r" * 257, entered_at=now),
            SessionFlow(step="s", step_entered_at=now),  # a step without a route
            SessionFlow(route="r", entered_at=now, step="s"),  # no step_entered_at
            SessionFlow(history=[RouteVisit("r", now)]),  # type: ignore[arg-type]
            SessionFlow(history=(RouteVisit("r", "yesterday"),)),  # type: ignore[arg-type]
            SessionFlow(history=(None,)),  # type: ignore[arg-type]
            SessionFlow(history=tuple(RouteVisit("r", now) for _ in range(257))),
            SessionFlow(data={"r": {"x": object()}}),
            SessionFlow(data={"r": [1]}),  # type: ignore[dict-item]
            SessionFlow(data={"r": {"x": float("nan")}}),
        ]
        for flow in bad:
            with pytest.raises(StateValueError):
                await storage.set_flow(sid, flow)
        assert not await storage.exists(sid)
        with pytest.raises(InvalidSessionId):
            await storage.set_flow("", SessionFlow())

    async def test_summary_mark_is_kept_with_the_info(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.append(sid, [_user(str(i)) for i in range(4)])
        info = await storage.get_info(sid)
        assert info is not None and info.summary_mark is None
        await storage.set_summary_mark(sid, SummaryMark(3, 1))
        await storage.add_usage(sid, calls=2)  # apart from the usage totals and the flow
        await storage.set_flow(sid, SessionFlow())
        info = await storage.get_info(sid)
        assert info is not None and info.summary_mark == SummaryMark(3, 1)
        assert info.usage.calls == 2 and info.message_count == 4
        await storage.set_summary_mark(sid, SummaryMark(1, 0))  # replaced whole
        info = await storage.get_info(sid)
        assert info is not None and info.summary_mark == SummaryMark(1, 0)
        await storage.set_summary_mark(sid, None)
        info = await storage.get_info(sid)
        assert info is not None and info.summary_mark is None
        bad: list[Any] = [
            (3, 1),
            SummaryMark(1, 1),  # a summary does not cover itself
            SummaryMark(1, 2),
            SummaryMark(-1, -2),
            SummaryMark(True, False),
            SummaryMark(3.0, 1),  # type: ignore[arg-type]
        ]
        for mark in bad:
            with pytest.raises(StateValueError):
                await storage.set_summary_mark(sid, mark)
        info = await storage.get_info(sid)
        assert info is not None and info.summary_mark is None
        fresh = _sid()
        with pytest.raises(StateValueError):
            await storage.set_summary_mark(fresh, SummaryMark(0, 0))
        assert not await storage.exists(fresh)
        with pytest.raises(InvalidSessionId):
            await storage.set_summary_mark("", None)

    async def test_find_sessions_by_current_route(self, storage: ConversationStorage) -> None:
        user = f"user-{uuid.uuid4().hex[:8]}"
        route, other = f"route-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
        now = datetime.now(UTC)
        old, new, done, elsewhere, foreign = _sid(), _sid(), _sid(), _sid(), _sid()
        for minutes, sid in enumerate((old, new, done, elsewhere, foreign)):
            await storage.update_info(sid, user_id="someone-else" if sid == foreign else user)
            await storage.append(sid, [_dated(sid, minutes)])
            here = other if sid == elsewhere else route
            await storage.set_flow(sid, SessionFlow(route=here, entered_at=now))
            await _age(storage, sid, minutes)
        visited = (RouteVisit(route, now, now, completed=True),)
        await storage.set_flow(done, SessionFlow(history=visited))  # left it: not in it now
        await _age(storage, done, 2)
        found = await storage.find_sessions(route=route)
        assert [i.session_id for i in found if i.session_id in (old, new, foreign)] == [
            foreign,
            new,
            old,
        ]
        assert all(i.flow.route == route for i in found)
        assert done not in {i.session_id for i in found}
        mine = await storage.find_sessions(user_id=user, route=route)
        assert [i.session_id for i in mine] == [new, old]
        assert [i.session_id for i in await storage.find_sessions(route=other)] == [elsewhere]
        assert [
            i.session_id for i in await storage.find_sessions(user_id=user, route=route, limit=1)
        ] == [new]
        await storage.update_info(new, status="completed")
        active = await storage.find_sessions(user_id=user, status="active", route=route)
        assert [i.session_id for i in active] == [old]
        assert await storage.find_sessions(route=f"nowhere-{uuid.uuid4().hex}") == []
        for bad in ("", "a\x00b", 5):
            with pytest.raises(ValueError):
                await storage.find_sessions(route=bad)  # type: ignore[arg-type]

    async def test_completed_at_follows_the_status(self, storage: ConversationStorage) -> None:
        sid, user = _sid(), f"user-{uuid.uuid4().hex[:8]}"
        await storage.update_info(sid, user_id=user)
        await storage.append(sid, [_user("q")])
        # falai's "active session of a user"
        found = await storage.find_sessions(user_id=user, status="active", limit=1)
        assert [i.session_id for i in found] == [sid] and found[0].completed_at is None
        before = datetime.now(UTC) - timedelta(seconds=1)
        info = await storage.update_info(sid, status="completed")
        assert info.status == "completed"
        assert info.completed_at is not None
        assert before <= info.completed_at <= datetime.now(UTC) + timedelta(seconds=1)
        again = await storage.get_info(sid)
        assert again is not None and again.completed_at == info.completed_at
        await storage.update_info(sid, title="kept")  # other fields leave it alone
        again = await storage.get_info(sid)
        assert again is not None and again.completed_at == info.completed_at
        assert await storage.find_sessions(user_id=user, status="active", limit=1) == []
        info = await storage.update_info(sid, status="active")
        assert info.completed_at is None
        info = await storage.update_info(sid, status="abandoned")
        assert info.completed_at is not None
        listed = await storage.find_sessions(user_id=user, status="abandoned")
        assert [i.completed_at for i in listed] == [info.completed_at]

    async def test_find_sessions(self, storage: ConversationStorage) -> None:
        user = f"user-{uuid.uuid4().hex[:8]}"
        old, mid, new, foreign = _sid(), _sid(), _sid(), _sid()
        for minutes, sid in enumerate((old, mid, new)):
            await storage.update_info(sid, user_id=user)
            await storage.append(sid, [_dated(sid, minutes)])
            await _age(storage, sid, minutes)
        await storage.update_info(foreign, user_id="someone-else")
        await storage.update_info(old, status="abandoned")
        await _age(storage, old, 10)
        await storage.append(mid, [_user("newest now")])

        mine = await storage.find_sessions(user_id=user)
        assert [i.session_id for i in mine] == [mid, old, new]
        assert all(i.user_id == user for i in mine)
        active = await storage.find_sessions(user_id=user, status="active")
        assert [i.session_id for i in active] == [mid, new]
        assert [i.session_id for i in await storage.find_sessions(user_id=user, limit=1)] == [mid]
        info_new = next(i for i in mine if i.session_id == new)
        stale = await storage.find_sessions(user_id=user, updated_before=info_new.updated_at)
        assert [i.session_id for i in stale] == []
        cutoff = info_new.updated_at + timedelta(microseconds=1)
        stale = await storage.find_sessions(user_id=user, updated_before=cutoff)
        assert [i.session_id for i in stale] == [new]
        assert await storage.find_sessions(user_id=f"nobody-{uuid.uuid4().hex}") == []

    # -- boundary values: one rule for every backend, applied by the ABC ------------------

    async def test_limits_zero_negative_and_none(self, storage: ConversationStorage) -> None:
        user, word = f"user-{uuid.uuid4().hex[:8]}", f"w{uuid.uuid4().hex[:10]}"
        for _ in range(3):
            sid = _sid()
            await storage.update_info(sid, user_id=user)
            await storage.append(sid, [_user(f"{word} one"), _user(f"{word} two")])
        find, search = storage.find_sessions, storage.search
        assert await find(user_id=user, limit=0) == []
        assert len(await find(user_id=user, limit=None)) == 3
        assert len(await find(user_id=user)) == 3
        assert len(await find(user_id=user, limit=2)) == 2
        assert len(await find(user_id=user, limit=99)) == 3
        assert await search(word, limit=0) == []
        assert len(await search(word, limit=None)) == 6
        assert len(await search(word, limit=1)) == 1
        assert len(await search(word, limit=99)) == 6
        for bad in (-1, -50, 1.5, True):
            with pytest.raises(ValueError, match="limit"):
                await find(user_id=user, limit=bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="limit"):
                await search(word, limit=bad)  # type: ignore[arg-type]

    async def test_naive_updated_before_is_utc(self, storage: ConversationStorage) -> None:
        user = f"user-{uuid.uuid4().hex[:8]}"
        await storage.update_info(_sid(), user_id=user)
        tomorrow = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)
        assert len(await storage.find_sessions(user_id=user, updated_before=tomorrow)) == 1
        yesterday = tomorrow - timedelta(days=2)
        assert await storage.find_sessions(user_id=user, updated_before=yesterday) == []

    async def test_counts_zero_beyond_and_negative(self, storage: ConversationStorage) -> None:
        sid, unknown = _sid(), _sid()
        msgs = [_user(str(i)) for i in range(3)]
        await storage.append(sid, msgs)
        before = await storage.get_info(sid)
        assert await storage.tail(sid, 0) == []
        assert await storage.tail(sid, 10) == msgs
        assert await storage.pop(sid, 0) == []
        await storage.truncate(sid, 3)
        await storage.truncate(sid, 10)
        assert await storage.load(sid) == msgs
        assert await storage.get_info(sid) == before  # nothing removed: not even updated_at moved
        for n in (-1, -10, 1.5, True):
            for call in (storage.tail, storage.pop, storage.truncate):
                with pytest.raises(ValueError, match=r"(n|keep) must"):
                    await call(sid, n)  # type: ignore[arg-type]
        assert await storage.load(sid) == msgs
        assert await storage.tail(unknown, 0) == await storage.pop(unknown, 0) == []
        assert await storage.pop(unknown, 5) == await storage.tail(unknown, 5) == []
        await storage.truncate(unknown, 0)
        assert not await storage.exists(unknown)

    # -- session state -------------------------------------------------------------------

    async def test_state_roundtrip(self, storage: ConversationStorage) -> None:
        sid, other = _sid(), _sid()
        await storage.set_state(sid, {"a": 1, "b": {"nested": [1, "two", None]}, "c": "ü"})
        await storage.set_state(sid, {"a": 2})
        await storage.set_state(other, {"a": "other"})
        assert await storage.get_state(sid) == {"a": 2, "b": {"nested": [1, "two", None]}, "c": "ü"}
        await storage.delete_state(sid, ["b", "missing"])
        assert await storage.get_state(sid) == {"a": 2, "c": "ü"}
        await storage.clear_state(sid)
        assert await storage.get_state(sid) == {}
        assert await storage.get_state(other) == {"a": "other"}
        state = await storage.get_state(other)
        state["a"] = "mutated"
        assert await storage.get_state(other) == {"a": "other"}

    async def test_change_state_sets_and_removes_in_one_call(
        self, storage: ConversationStorage
    ) -> None:
        sid = _sid()
        await storage.set_state(sid, {"a": 1, "b": 2})
        later = datetime.now(UTC) + timedelta(hours=1)
        await storage.change_state(
            sid, {"a": None, "c": StateEntry([3]), "d": StateEntry("x", later), "never": None}
        )
        assert await storage.get_state(sid) == {"b": 2, "c": [3], "d": "x"}
        entries = await storage.get_state_entries(sid)
        assert entries["d"].expires_at is not None
        assert abs((entries["d"].expires_at - later).total_seconds()) < 0.01
        assert "a" not in entries and "never" not in entries
        await storage.change_state(sid, {"a": StateEntry("again")})  # a removed key comes back
        assert await storage.get_state(sid) == {"a": "again", "b": 2, "c": [3], "d": "x"}
        await storage.change_state(sid, {})  # nothing to change: no write, no error
        with pytest.raises(StateValueError):
            await storage.change_state(sid, {"": StateEntry(1)})
        assert await storage.get_state(sid) == {"a": "again", "b": 2, "c": [3], "d": "x"}

    @_HYPOTHESIS
    @given(values=st.dictionaries(st.text(min_size=1, max_size=30), json_values, max_size=5))
    async def test_state_values_roundtrip(
        self, storage: ConversationStorage, values: dict[str, Any]
    ) -> None:
        sid = _sid()
        await storage.set_state(sid, values)
        assert await storage.get_state(sid) == values

    async def test_state_expiry(self, storage: ConversationStorage) -> None:
        sid = _sid()
        now = datetime.now(UTC)
        await storage.set_state(sid, {"gone": 1}, expires_at=now - timedelta(seconds=1))
        await storage.set_state(sid, {"long": 2}, ttl=60)
        await storage.set_state(sid, {"forever": 3})
        assert await storage.get_state(sid) == {"long": 2, "forever": 3}
        await storage.set_state(sid, {"gone": "back"})
        assert (await storage.get_state(sid))["gone"] == "back"
        # a moment in the past replaces a live key and reads as absent at once
        await storage.set_state(sid, {"forever": 0}, expires_at=now - timedelta(seconds=1))
        assert await storage.get_state(sid) == {"long": 2, "gone": "back"}

    async def test_a_copy_replaces_the_usage_totals_whole(
        self, storage: ConversationStorage
    ) -> None:
        from ..storage.memory import InMemoryStorage
        from ..storage.transfer import copy_session

        sid = _sid()
        await storage.append(sid, [_user("old")], usage=UsageTotals(10, 2, 1))
        await storage.add_usage(sid, prompt_tokens=3, calls=1)
        source = InMemoryStorage()
        await source.append(sid, [_user("new")], usage=UsageTotals(5, 0, 1))
        await copy_session(source, storage, sid)
        info = await storage.get_info(sid)
        assert info is not None and info.usage == UsageTotals(5, 0, 1)
        await storage.append(sid, [ChatMessage.assistant("a")], usage=UsageTotals(1, 1, 1))
        info = await storage.get_info(sid)
        assert info is not None and info.usage == UsageTotals(6, 1, 2)

    async def test_state_and_flow_are_read_together(self, storage: ConversationStorage) -> None:
        sid = _sid()
        assert await storage.get_state_and_flow(sid) == ({}, SessionFlow())
        assert not await storage.exists(sid)  # a read creates nothing
        await storage.append(sid, [_user("q")])
        assert await storage.get_state_and_flow(sid) == ({}, SessionFlow())
        past = datetime.now(UTC) - timedelta(seconds=1)
        await storage.set_state(sid, {"cart": [1, {"n": 2}], "gone": 0})
        await storage.set_state(sid, {"gone": 1}, expires_at=past)
        t0 = datetime(2024, 5, 1, 12, 0, 0, 654321, tzinfo=UTC)
        flow = SessionFlow(
            route="checkout",
            step="pay",
            entered_at=t0,
            step_entered_at=t0,
            history=(RouteVisit("checkout", t0),),
            data={"checkout": {"total": 12}},
        )
        await storage.set_flow(sid, flow)
        entries, position = await storage.get_state_and_flow(sid)
        assert entries == await storage.get_state_entries(sid)
        assert {k: e.value for k, e in entries.items()} == {"cart": [1, {"n": 2}]}
        info = await storage.get_info(sid)
        assert info is not None and position == info.flow == flow
        with pytest.raises(InvalidSessionId):
            await storage.get_state_and_flow("")

    async def test_state_entries_carry_the_expiry(self, storage: ConversationStorage) -> None:
        sid = _sid()
        moment = datetime(2999, 5, 17, 10, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
        before = datetime.now(UTC)
        await storage.set_state(sid, {"ttl": 1}, ttl=600)
        after = datetime.now(UTC)
        await storage.set_state(sid, {"at": [2]}, expires_at=moment)
        await storage.set_state(sid, {"naive": 3}, expires_at=moment.replace(tzinfo=None))
        await storage.set_state(sid, {"plain": 4})
        entries = await storage.get_state_entries(sid)
        assert {k: e.value for k, e in entries.items()} == {
            "ttl": 1,
            "at": [2],
            "naive": 3,
            "plain": 4,
        }
        by_ttl = entries["ttl"].expires_at
        assert by_ttl is not None
        slack = timedelta(milliseconds=1)
        assert before + timedelta(seconds=600) - slack <= by_ttl <= after + timedelta(seconds=600)
        at, naive = entries["at"].expires_at, entries["naive"].expires_at
        assert at is not None and abs(at - moment) < slack
        # a naive datetime is taken as UTC, as ChatMessage.created_at is
        assert naive is not None and abs(naive - moment.replace(tzinfo=UTC)) < slack
        assert entries["plain"].expires_at is None
        assert await storage.get_state(sid) == {k: e.value for k, e in entries.items()}

    async def test_state_ttl_and_expires_at_exclude_each_other(
        self, storage: ConversationStorage
    ) -> None:
        sid = _sid()
        moment = datetime.now(UTC) + timedelta(hours=1)
        with pytest.raises(ValueError, match="ttl or expires_at"):
            await storage.set_state(sid, {"k": 1}, ttl=60, expires_at=moment)
        with pytest.raises(ValueError, match="expires_at must be a datetime"):
            await storage.set_state(sid, {"k": 1}, expires_at="tomorrow")  # type: ignore[arg-type]
        assert await storage.get_state(sid) == {}

    async def test_set_times(self, storage: ConversationStorage) -> None:
        sid = _sid()
        created = datetime(2020, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        updated = datetime(2021, 6, 7, 8, 9, 10, 111213, tzinfo=UTC)
        # as in a copy: the messages are older than the session's last update
        await storage.append(sid, [ChatMessage(role="user", content="old", created_at=created)])
        await storage.set_times(sid, created_at=created, updated_at=updated)
        info = await storage.get_info(sid)
        assert info is not None
        assert (info.created_at, info.updated_at) == (created, updated)
        cutoff = datetime(2022, 1, 1, tzinfo=UTC)
        assert [i.session_id for i in await storage.find_sessions(updated_before=cutoff)] == [sid]
        await storage.append(sid, [_user("new")])
        later = await storage.get_info(sid)
        assert later is not None
        assert later.created_at == created and later.updated_at > cutoff

    async def test_state_rejects_bad_values(self, storage: ConversationStorage) -> None:
        sid = _sid()
        with pytest.raises((ValueError, StorageError)):
            await storage.set_state(sid, {"k": object()})
        with pytest.raises((ValueError, StorageError)):
            await storage.set_state(sid, {"k": 1}, ttl=-1)
        assert await storage.get_state(sid) == {}

    async def test_state_and_history_are_independent(self, storage: ConversationStorage) -> None:
        sid = _sid()
        await storage.set_state(sid, {"k": 1})
        await storage.append(sid, [_user("a")])
        await storage.save(sid, [_user("b")])
        await storage.pop(sid)
        assert await storage.get_state(sid) == {"k": 1}
        await storage.clear_state(sid)
        assert await storage.count(sid) == 0
        assert await storage.exists(sid)

    # -- lifecycle -----------------------------------------------------------------------

    async def test_async_context_manager(self, storage: ConversationStorage) -> None:
        async with storage as same:
            assert same is storage

    # -- decoding (issue 11) ---------------------------------------------------------------

    async def test_big_numbers_load_exactly(self, storage: ConversationStorage) -> None:
        sid = _sid()
        exact = {"big": 2**80 + 1, "neg": -(10**30) - 7, "float": 0.1, "nested": [[2**64]]}
        messages = [_user(f"m{i}").replace(metadata={**exact, "i": i}) for i in range(300)]
        await storage.save(sid, messages)
        await storage.append(sid, [_user("last").replace(metadata=exact)])
        loaded = await storage.load(sid)
        assert [m.metadata for m in loaded] == [m.metadata for m in messages] + [exact]
        assert type(loaded[0].metadata["big"]) is int
        assert loaded[-1].metadata["nested"] == [[18446744073709551616]]

    async def test_loads_leave_the_cycle_collector_as_they_found_it(
        self, storage: ConversationStorage
    ) -> None:
        sid = _sid()
        await storage.save(sid, [_user(f"m{i}") for i in range(50)])
        was = gc.isenabled()
        try:
            for state in (True, False):
                (gc.enable if state else gc.disable)()
                await asyncio.gather(*(storage.load(sid) for _ in range(4)))
                assert gc.isenabled() is state
        finally:
            (gc.enable if was else gc.disable)()
