"""A session's transcript: the stored history, its cached wire form, and the repair of tool calls
left unanswered, kept equal to what storage holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._prompt_history import PromptHistory, newest_user_index
from .compaction import is_turn_start, summary_range
from .messages import ChatMessage
from .storage._stored import UsageTotals

if TYPE_CHECKING:
    from .model import Usage
    from .storage import ConversationStorage
    from .storage._stored import SummaryMark

Window = tuple[int, Callable[[dict[str, Any]], int]]
"""A context window: its token budget and the counter of one wire message's tokens."""

_FIRST_TAIL = 64  # the fewest messages read when resuming with a window, or reading more


_is_turn_start = is_turn_start


class Transcript:
    """One session's history as stored, with the cache a turn works from.

    Every change goes to storage first and to the cache only once storage has it, so the cache
    is always what storage holds (as of the last ``refresh``). With a context window, only the
    newest part is read: enough to fill the window, from the start of a user turn on (so tool
    calls keep their results); ``base`` counts the older messages, read by ``load_all`` or
    when undo/retry need to go further back.
    """

    def __init__(self, storage: ConversationStorage, session_id: str) -> None:
        self.storage = storage
        self.session_id = session_id
        self.cache = PromptHistory()
        """The cached history in wire form; read it, change it only through the transcript."""
        self.base = 0
        """Stored messages older than the cache (not read yet)."""
        self._window: Window | None = None  # what the cache is known to fill, when base > 0
        self._mark: SummaryMark | None = None
        """Where the newest summary is, checked against what was read (None: not known)."""

    @property
    def messages(self) -> list[ChatMessage]:
        """The cached messages, the newest ``len(self) - base`` (the cache's own list: do not
        change it)."""
        return self.cache.messages

    def __len__(self) -> int:
        return self.base + len(self.cache)

    def since(self, count: int) -> list[ChatMessage]:
        """The messages stored after the first ``count`` (which must be cached)."""
        return self.cache.messages[count - self.base :]

    async def refresh(self, window: Window | None = None) -> None:
        """Catch up with what other processes stored; reads the history only if it changed.

        Without a window the whole history is read; with one, what the prompt can hold.
        """
        count = await self.storage.count(self.session_id)
        if count == len(self) and await self._newest_is_cached(count):
            if self.base and window is None:
                await self.load_all()
            elif self.base and window != self._window:
                await self._fit(window)
            return
        if count > len(self) and await self._read_newer(count):
            if self.base:
                await self._fit(window)
            return
        self._window = None
        if window is None:
            self._install(await self.storage.load(self.session_id), 0)
            return
        first = min(count, max(_FIRST_TAIL, window[0] // 64))
        mark = await self._stored_mark(count)
        if mark is not None:
            # read from the newest summary's last covered message on: the prompt goes on
            # after it, however big what followed it is
            first = max(first, count - mark.covered_to)
        newest = await self.storage.tail(self.session_id, first) if first else []
        self._install(newest, count - len(newest))
        self._mark = mark if mark is not None and self._holds(mark) else None
        await self._fit(window)

    async def _stored_mark(self, count: int) -> SummaryMark | None:
        """The stored position of the newest summary, if it is within ``count`` messages."""
        info = await self.storage.get_info(self.session_id)
        mark = info.summary_mark if info is not None else None
        return mark if mark is not None and mark.at < count else None

    def _holds(self, mark: SummaryMark) -> bool:
        """Whether the cache has, at ``mark``, a summary record and the last message it covers
        (a mark goes stale when an undo removed its summary)."""
        messages = self.cache.messages
        at, end = mark.at - self.base, mark.covered_to - self.base
        if not (0 <= end < at < len(messages)):
            return False
        covers = summary_range(messages[at])
        return covers is not None and covers.last_id == messages[end].id

    async def mark_summary(self, record_id: str, last_id: str) -> None:
        """Store where the summary just appended (``record_id``) is, and the last message it
        covers, so a resume finds it without scanning (both must be cached)."""
        from .storage._stored import SummaryMark

        at, end = self.position_of(record_id), self.position_of(last_id)
        if at is None or end is None or not end < at:
            return
        mark = SummaryMark(at, end)
        await self.storage.set_summary_mark(self.session_id, mark)
        self._mark = mark

    def position_of(self, message_id: str) -> int | None:
        """The position in the whole history of a cached message (None: not cached)."""
        messages = self.cache.messages
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].id == message_id:
                return self.base + i
        return None

    async def older_than_cache(self) -> list[ChatMessage]:
        """The stored messages older than the cache (read now; none if all are cached)."""
        if not self.base:
            return []
        return (await self.storage.load(self.session_id))[: self.base]

    async def _newest_is_cached(self, count: int) -> bool:
        if not count:
            return True
        if not self.cache.messages:
            return False
        newest = await self.storage.tail(self.session_id, 1)
        return bool(newest) and newest[0].id == self.cache.messages[-1].id

    async def _read_newer(self, count: int) -> bool:
        """Cache only what was appended elsewhere since, if our newest message is still where
        we left it (so another instance's turn costs its own messages, not the history)."""
        if not self.cache.messages:
            return False
        added = count - len(self)
        newer = await self.storage.tail(self.session_id, added + 1)
        if len(newer) != added + 1 or newer[0].id != self.cache.messages[-1].id:
            return False
        self.cache.extend(newer[1:])
        return True

    def _install(self, messages: Sequence[ChatMessage], base: int) -> None:
        self.cache = PromptHistory(messages)
        self.base = base

    async def load_all(self) -> None:
        """Read the messages older than the cache too (the whole history)."""
        if self.base:
            self._install(await self.storage.load(self.session_id), 0)

    async def _grow(self, n: int) -> None:
        """Cache at least the newest ``n`` messages (as of the last refresh)."""
        total = len(self)
        newest = await self.storage.tail(self.session_id, min(n, total))
        self._install(newest, total - len(newest))

    async def _fit(self, window: Window | None) -> None:
        """Read older messages until the cache fills ``window`` from the start of a turn,
        and drop what is older than that start."""
        while self.base:
            if window is None:
                await self.load_all()
                return
            cut, tokens = self._turn_that_fills(window)
            mark = self._mark
            if (
                cut is not None
                and mark is not None
                and self.base <= mark.covered_to < self.base + cut
            ):
                # never past the newest summary's covered end: its record, and the messages
                # the next compaction must fold in, stay (they are bounded by keep_recent)
                cut = mark.covered_to - self.base
            if cut is not None:
                if cut:
                    messages, wire = self.cache.messages[cut:], self.cache.wire[cut:]
                    self.cache = PromptHistory()
                    self.cache.extend(messages, wire)
                    self.base += cut
                self._window = window
                return
            # read as many more as the messages so far say the window needs, and some
            cached = len(self.cache)
            needed = window[0] * cached // max(tokens, 1) * 3 // 2 if cached else 0
            await self._grow(max(_FIRST_TAIL, 2 * cached, needed))

    def _turn_that_fills(self, window: Window) -> tuple[int | None, int]:
        """The newest cached start of a user turn from which the cache costs more than the
        budget (trimming never reaches past it; None if there is none), and the tokens of the
        messages looked at."""
        budget, counter = window
        tokens = 0
        messages, wire = self.cache.messages, self.cache.wire
        covered_up_to: str | None = None  # the last message the newest summary covers
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if covered_up_to is None and m.role == "system":
                covers = summary_range(m)
                if covers is not None:
                    covered_up_to = covers.last_id
                    continue
            if m.id == covered_up_to:
                # the prompt never reaches past a summary: keep only its last covered message
                return i, tokens
            tokens += self.cache.cost(wire[i], counter)
            if tokens > budget and _is_turn_start(m):
                return i, tokens
        return None, tokens

    async def newest_user_index(self) -> int | None:
        """The index in the whole history of the user's newest message (reading further back
        if the cache has none)."""
        while True:
            index = newest_user_index(self.cache.messages)
            if index is not None:
                return self.base + index
            if not self.base:
                return None
            await self._grow(max(_FIRST_TAIL, 4 * len(self.cache)))

    async def append(
        self, messages: Sequence[ChatMessage], *, usage: Usage | None = None, calls: int = 0
    ) -> None:
        """Store messages and take them into the cache, even if cancelled meanwhile.

        ``usage`` and ``calls`` (what the model calls that wrote them used) are added to the
        session's stored totals in the same write. A storage write that has started may
        complete after its caller is cancelled (it runs in a thread or on a server): waiting
        for it, however often the caller is cancelled meanwhile, keeps the cache equal to what
        is stored. So does a look at the newest stored message after a write that failed: a
        server may commit a write and lose only its reply.
        """
        # usage comes only with model calls: none made, nothing to add (an append's hot path)
        totals = _totals(usage, calls) if usage is not None and calls else None
        write = asyncio.ensure_future(self.storage.append(self.session_id, messages, usage=totals))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            while not write.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.shield(write)
            if not write.cancelled() and (
                write.exception() is None or await self._landed(messages)
            ):
                self.cache.extend(messages)
            raise
        except Exception:
            if await self._landed(messages):
                self.cache.extend(messages)
            raise
        self.cache.extend(messages)

    async def _landed(self, messages: Sequence[ChatMessage]) -> bool:
        """Whether a write of ``messages`` that failed was stored all the same: the history is
        as long as the cache and they, and ends with the last of them (False if unknown)."""
        if not messages:
            return False
        try:
            count = await self.storage.count(self.session_id)
            newest = await self.storage.tail(self.session_id, 1)
        except Exception:
            return False
        expected = len(self) + len(messages)
        return count == expected and bool(newest) and newest[-1].id == messages[-1].id

    async def add_usage(self, usage: Usage, calls: int) -> None:
        """Add what model calls used to the session's stored totals (SessionInfo.usage)."""
        totals = _totals(usage, calls)
        await self.storage.add_usage(
            self.session_id,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            calls=totals.calls,
        )

    async def truncate(self, keep: int) -> list[ChatMessage]:
        """Keep the oldest ``keep`` messages; returns the ones removed."""
        if keep < self.base:
            await self._grow(len(self) - keep)
        await self.storage.truncate(self.session_id, keep)
        removed = self.cache.messages[keep - self.base :]
        self.cache.truncate(keep - self.base)
        if self._mark is not None and keep <= self._mark.at:
            self._mark = None  # its summary is gone (the stored mark is checked when read)
        if self.base:  # fewer messages may no longer fill the window
            await self._fit(self._window)
        return removed

    async def clear(self) -> None:
        """Delete every message."""
        await self.storage.save(self.session_id, [])
        self._install([], 0)
        self._mark = None

    async def answer_dangling_calls(self) -> None:
        """Store interrupted results for tool calls left unanswered at the end."""
        dangling = self.cache.dangling()
        if dangling:
            await self.append(dangling)


def _totals(usage: Usage, calls: int) -> UsageTotals:
    """What model calls used, as stored totals (a server's negative counts taken as 0)."""
    return UsageTotals(max(0, usage.prompt_tokens), max(0, usage.completion_tokens), calls)
