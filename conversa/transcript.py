"""A session's transcript: the stored history, its cached wire form, and the repair of tool calls
left unanswered, kept equal to what storage holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .compaction import SummaryRange, is_turn_start, summary_range
from .messages import ChatMessage

if TYPE_CHECKING:
    from .model import Usage
    from .storage import ConversationStorage
    from .storage._stored import SummaryMark

INTERRUPTED_RESULT = "[interrupted: this tool call did not complete, its result is unknown]"


def interrupted_result(tool_call_id: str) -> ChatMessage:
    """The synthetic result that stands in for a tool call that never completed."""
    return ChatMessage.tool(
        tool_call_id, INTERRUPTED_RESULT, metadata={"interrupted": True, "synthetic": True}
    )


@dataclass(frozen=True, slots=True)
class Repair:
    """What a history needs before it is valid model input (stored messages stay as they are)."""

    messages: list[ChatMessage]
    """The history as the model must see it: missing results filled in, orphans left out."""
    to_store: list[ChatMessage]
    """Synthetic results for calls dangling at the very end: the caller appends these."""


def repair(history: Sequence[ChatMessage]) -> Repair:
    """Pair every tool call with exactly one result, the way the chat API demands."""
    out: list[ChatMessage] = []
    pending: dict[str, None] = {}  # ordered set of call ids still owed a result
    changed = False
    for m in history:
        if m.role == "tool":
            if m.tool_call_id in pending:
                del pending[m.tool_call_id]
                out.append(m)
            else:
                changed = True  # an orphan or a duplicate: the API would reject it
            continue
        if pending:
            out.extend(interrupted_result(cid) for cid in pending)
            pending.clear()
            changed = True
        out.append(m)
        if m.tool_calls:
            pending = {c.id: None for c in m.tool_calls}
    tail = [interrupted_result(cid) for cid in pending]
    if not changed and not tail:
        return Repair(list(history), [])
    return Repair(out + tail, tail)


class PromptHistory:
    """The history in wire form, kept in step with the stored one message by message.

    It also tracks, incrementally, whether the history needs ``repair``: so a turn on a long,
    healthy history costs the same as on a short one.
    """

    def __init__(self, messages: Sequence[ChatMessage] = ()) -> None:
        self.messages: list[ChatMessage] = []
        self.wire: list[dict[str, Any]] = []
        self.summary: ChatMessage | None = None
        """The newest summary record whose covered messages are known (None: none)."""
        self.start = 0
        """The index of the first message after what ``summary`` covers."""
        self.live: list[ChatMessage] = []
        """The messages the model may see: after the summary, without summary records."""
        self.live_wire: list[dict[str, Any]] = []
        """Their wire form (the same dicts as in ``wire``)."""
        self._pending: dict[str, None] = {}  # call ids of the newest assistant still unanswered
        self._damaged = False  # a gap or an orphan somewhere: only a full repair helps
        self._ours: set[int] = set()  # ids of the dicts in self.wire, which never change
        self._costs: dict[int, int] = {}  # their token counts, by the counter below
        self._counter: Callable[[dict[str, Any]], int] | None = None
        self.extend(messages)

    def extend(
        self, messages: Sequence[ChatMessage], wire: Sequence[dict[str, Any]] | None = None
    ) -> None:
        """Take in messages just appended to storage (with their wire form, if known)."""
        for i, m in enumerate(messages):
            self.messages.append(m)
            self.wire.append(wire[i] if wire is not None else m.to_openai())
            self._ours.add(id(self.wire[-1]))
            covers = summary_range(m) if m.role == "system" else None
            if covers is None:
                self.live.append(m)
                self.live_wire.append(self.wire[-1])
                self._track(m)
            else:
                self._summarized(m, covers)

    def _track(self, m: ChatMessage) -> None:
        """Follow the pairing of tool calls and results of the live part, one message on."""
        if m.role == "tool":
            if m.tool_call_id in self._pending:
                del self._pending[m.tool_call_id]
            else:
                self._damaged = True
            return
        if self._pending:
            self._damaged = True
        self._pending = {c.id: None for c in m.tool_calls}

    def _summarized(self, record: ChatMessage, covers: SummaryRange) -> None:
        """Take in a summary record: the live part starts after the last message it covers.

        A summary whose last message is not among these (damaged, or edited away) is ignored.
        """
        for i in range(len(self.messages) - 2, -1, -1):
            if self.messages[i].id == covers.last_id:
                self.summary, self.start = record, i + 1
                kept = [
                    (m, w)
                    for m, w in zip(self.messages[i + 1 :], self.wire[i + 1 :], strict=True)
                    if summary_range(m) is None
                ]
                self.live = [m for m, _ in kept]
                self.live_wire = [w for _, w in kept]
                # what the summary covers is never sent: only the live part must pair up
                self._pending, self._damaged = {}, False
                for m in self.live:
                    self._track(m)
                return

    def truncate(self, keep: int) -> None:
        """Keep the oldest ``keep`` messages."""
        messages, wire = self.messages[:keep], self.wire[:keep]
        self.messages, self.wire, self._pending, self._damaged = [], [], {}, False
        self.summary, self.start, self.live, self.live_wire = None, 0, [], []
        self._ours = set()
        self.extend(messages, wire)
        self._costs = {k: v for k, v in self._costs.items() if k in self._ours}

    def cost(self, message: dict[str, Any], counter: Callable[[dict[str, Any]], int]) -> int:
        """``counter(message)``, remembered for this history's own wire messages.

        So a prompt trimmed to a context window counts each stored message once, not on
        every model call. Other dicts (a system prompt, a copy with user parts) are counted
        afresh each time.
        """
        if counter is not self._counter:
            self._counter, self._costs = counter, {}
        key = id(message)
        known = self._costs.get(key)
        if known is None:
            known = counter(message)
            if key in self._ours:
                self._costs[key] = known
        return known

    def __len__(self) -> int:
        return len(self.messages)

    def dangling(self) -> list[ChatMessage]:
        """Interrupted results for tool calls left unanswered at the very end."""
        if self._damaged:
            return repair(self.live).to_store
        return [interrupted_result(cid) for cid in self._pending]

    def prompt(self) -> tuple[list[dict[str, Any]], int | None]:
        """The wire messages the model may see (repaired if needed), and the index among them
        of the user's newest message (observations do not count).

        A healthy history gives its own list, not a copy: so a turn costs the same on a long
        history. Callers must not change it (copy it first, as the request interceptors get).
        """
        if not self._damaged and not self._pending:
            return self.live_wire, newest_user_index(self.live)
        fixed = repair(self.live).messages
        return [m.to_openai() for m in fixed], newest_user_index(fixed)

    @property
    def summary_text(self) -> str | None:
        """The text of the newest summary (None: the prompt has none)."""
        return self.summary.text if self.summary is not None else None


def newest_user_index(messages: Sequence[ChatMessage]) -> int | None:
    """The index of the newest message the user wrote (not a text-protocol observation)."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role == "user" and not m.metadata.get("observation"):
            return i
    return None


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
        from .storage._stored import SUMMARY_KEYS, SummaryMark

        at, end = self.position_of(record_id), self.position_of(last_id)
        if at is None or end is None or not end < at:
            return
        await self.storage._change_reserved(
            self.session_id, {}, dict(zip(SUMMARY_KEYS, (at, end), strict=True))
        )
        self._mark = SummaryMark(at, end)

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

    async def append(self, messages: Sequence[ChatMessage]) -> None:
        """Store messages and take them into the cache, even if cancelled meanwhile.

        A storage write that has started may complete after its caller is cancelled (it runs
        in a thread or on a server): waiting for it keeps the cache equal to what is stored.
        """
        write = asyncio.ensure_future(self.storage.append(self.session_id, messages))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await write
            if write.done() and not write.cancelled() and write.exception() is None:
                self.cache.extend(messages)
            raise
        self.cache.extend(messages)

    async def add_usage(self, usage: Usage, calls: int) -> None:
        """Add what model calls used to the session's stored totals (SessionInfo.usage)."""
        await self.storage.add_usage(
            self.session_id,
            prompt_tokens=max(0, usage.prompt_tokens),
            completion_tokens=max(0, usage.completion_tokens),
            calls=calls,
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
