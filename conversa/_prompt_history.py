"""The prompt's view of a history: its wire form kept incrementally, each message's cost
counted once, compaction summaries followed, and the repair of tool calls left unanswered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .compaction import SummaryRange, summary_range
from .messages import ChatMessage

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
