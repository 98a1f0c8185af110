"""Building the prompt: repairing dangling tool calls and trimming history to a token budget."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .messages import ChatMessage

TokenCounter = Callable[[dict[str, Any]], int]
"""Counts the tokens of one message in wire form."""

INTERRUPTED_RESULT = "[interrupted: this tool call did not complete, its result is unknown]"
_IMAGE_TOKENS = 765  # what a high-detail 512x512 tile costs; a fair guess for any image part
_MESSAGE_OVERHEAD = 4


def estimate_tokens(message: dict[str, Any]) -> int:
    """An offline estimate of a wire message's tokens: about four characters per token."""
    chars = 0
    images = 0
    content = message.get("content")
    if isinstance(content, str):
        chars += len(content)
    elif isinstance(content, list):
        for part in content:
            if part.get("type") == "text":
                chars += len(str(part.get("text", "")))
            else:
                images += 1
    for call in message.get("tool_calls") or ():
        fn = call.get("function", {})
        chars += len(fn.get("name", "")) + len(fn.get("arguments", ""))
    return _MESSAGE_OVERHEAD + (chars + 3) // 4 + images * _IMAGE_TOKENS


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
        self._counter: TokenCounter | None = None
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

    def cost(self, message: dict[str, Any], counter: TokenCounter) -> int:
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
        """The wire messages the model may see (a fresh list, repaired if needed), and the
        index among them of the user's newest message (observations do not count)."""
        if not self._damaged and not self._pending:
            return list(self.wire), newest_user_index(self.messages)
        fixed = repair(self.messages).messages
        return [m.to_openai() for m in fixed], newest_user_index(fixed)


def newest_user_index(messages: Sequence[ChatMessage]) -> int | None:
    """The index of the newest message the user wrote (not a text-protocol observation)."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role == "user" and not m.metadata.get("observation"):
            return i
    return None


def _units(messages: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """Split into [start, end) units that must stay together: a tool call with its results."""
    units: list[tuple[int, int]] = []
    i = 0
    while i < len(messages):
        j = i + 1
        if messages[i].get("tool_calls"):
            while j < len(messages) and messages[j].get("role") == "tool":
                j += 1
        units.append((i, j))
        i = j
    return units


def trim(
    system: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    budget: int | None,
    count: TokenCounter = estimate_tokens,
    *,
    keep: int | None = None,
) -> list[dict[str, Any]]:
    """The system messages plus the newest messages that fit in ``budget`` tokens.

    Tool calls are never split from their results, and the message at index ``keep`` (by
    default the newest user message) is always kept, even when it alone exceeds the budget.
    """
    if budget is None:
        return system + messages
    left = budget - sum(count(m) for m in system)
    units = _units(messages)
    cost = [sum(count(messages[k]) for k in range(a, b)) for a, b in units]
    if keep is None:
        keep = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    newest_user = None  # the unit that holds message `keep`
    if keep is not None:
        newest_user = next(u for u, (a, b) in enumerate(units) if a <= keep < b)
    chosen: set[int] = set()
    u = len(units) - 1
    while u >= 0 and u != newest_user and cost[u] <= left:
        chosen.add(u)
        left -= cost[u]
        u -= 1
    if newest_user is not None:
        chosen.add(newest_user)
        left -= cost[newest_user]
        if u == newest_user:  # everything newer fitted: go on into older history
            u -= 1
            while u >= 0 and cost[u] <= left:
                chosen.add(u)
                left -= cost[u]
                u -= 1
    kept = [messages[k] for u, (a, b) in enumerate(units) if u in chosen for k in range(a, b)]
    return system + kept


def describe_tools_for_text_protocol(schemas: Sequence[dict[str, Any]]) -> str:
    """The system prompt section that teaches the JSON text protocol to a model."""
    lines = [
        "You can use tools. Reply with exactly one JSON object and nothing else.",
        'To use a tool: {"thought": "...", "action": "<tool name>", "action_input": {...}}',
        'To answer the user: {"thought": "...", "final_answer": "..."}',
        "After a tool runs you get a message starting with 'Observation:' holding its result.",
        "Tools:",
    ]
    for schema in schemas:
        fn = schema["function"]
        params = json.dumps(fn.get("parameters", {}), ensure_ascii=False)
        lines.append(f"- {fn['name']}: {fn.get('description', '')} Arguments schema: {params}")
    return "\n".join(lines)
