"""A session's transcript: the stored history, its cached wire form, and the repair of tool calls
left unanswered, kept equal to what storage holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .messages import ChatMessage

if TYPE_CHECKING:
    from .storage import ConversationStorage

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
            if m.role == "tool":
                if m.tool_call_id in self._pending:
                    del self._pending[m.tool_call_id]
                else:
                    self._damaged = True
                continue
            if self._pending:
                self._damaged = True
            self._pending = {c.id: None for c in m.tool_calls}

    def truncate(self, keep: int) -> None:
        """Keep the oldest ``keep`` messages."""
        messages, wire = self.messages[:keep], self.wire[:keep]
        self.messages, self.wire, self._pending, self._damaged = [], [], {}, False
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
            return repair(self.messages).to_store
        return [interrupted_result(cid) for cid in self._pending]

    def prompt(self) -> tuple[list[dict[str, Any]], int | None]:
        """The wire messages the model may see (repaired if needed), and the index among them
        of the user's newest message (observations do not count).

        A healthy history gives its own list, not a copy: so a turn costs the same on a long
        history. Callers must not change it (copy it first, as the request interceptors get).
        """
        if not self._damaged and not self._pending:
            return self.wire, newest_user_index(self.messages)
        fixed = repair(self.messages).messages
        return [m.to_openai() for m in fixed], newest_user_index(fixed)


def newest_user_index(messages: Sequence[ChatMessage]) -> int | None:
    """The index of the newest message the user wrote (not a text-protocol observation)."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role == "user" and not m.metadata.get("observation"):
            return i
    return None


class Transcript:
    """One session's history as stored, with the cache a turn works from.

    Every change goes to storage first and to the cache only once storage has it, so the cache
    is always what storage holds (as of the last ``refresh``).
    """

    def __init__(self, storage: ConversationStorage, session_id: str) -> None:
        self.storage = storage
        self.session_id = session_id
        self.cache = PromptHistory()
        """The cached history in wire form; read it, change it only through the transcript."""

    @property
    def messages(self) -> list[ChatMessage]:
        """The cached messages (the cache's own list: do not change it)."""
        return self.cache.messages

    def __len__(self) -> int:
        return len(self.cache)

    async def refresh(self) -> None:
        """Catch up with what other processes stored; loads the history only if it changed."""
        count = await self.storage.count(self.session_id)
        if count == len(self.cache):
            newest = await self.storage.tail(self.session_id, 1) if count else []
            if not newest or newest[0].id == self.cache.messages[-1].id:
                return
        self.cache = PromptHistory(await self.storage.load(self.session_id))

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

    async def truncate(self, keep: int) -> list[ChatMessage]:
        """Keep the oldest ``keep`` messages; returns the ones removed."""
        await self.storage.truncate(self.session_id, keep)
        removed = self.cache.messages[keep:]
        self.cache.truncate(keep)
        return removed

    async def clear(self) -> None:
        """Delete every message."""
        await self.storage.save(self.session_id, [])
        self.cache = PromptHistory()

    async def answer_dangling_calls(self) -> None:
        """Store interrupted results for tool calls left unanswered at the end."""
        dangling = self.cache.dangling()
        if dangling:
            await self.append(dangling)
