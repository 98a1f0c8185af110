"""InMemoryStorage: sessions in a dict, for tests and ephemeral chats."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..messages import ChatMessage
from ._stored import (
    NO_FLOW,
    RESERVED_FIELD,
    SessionFlow,
    decode_flow,
    decode_info,
    first_user,
    merge_reserved,
)
from .base import (
    ConversationStorage,
    SessionInfo,
    SessionQuery,
    StateEntry,
    copy_json,
    from_ts,
    kept,
    live_entries,
    merge_state,
    remove_state,
)


def _detached(message: ChatMessage) -> ChatMessage:
    """A message that shares no mutable object with ``message``."""
    if not (isinstance(message.content, list) or message.metadata):
        return message
    copied = object.__new__(ChatMessage)
    for name in _FIELDS:
        object.__setattr__(copied, name, getattr(message, name))
    object.__setattr__(copied, "content", copy_json(message.content))
    object.__setattr__(copied, "metadata", copy_json(message.metadata))
    return copied


_FIELDS = tuple(ChatMessage.__dataclass_fields__)


@dataclass
class _Session:
    created_at: float
    updated_at: float = 0.0
    messages: list[ChatMessage] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)


class InMemoryStorage(ConversationStorage):
    """Sessions kept in this process only; nothing survives it. URL: ``memory://``."""

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}

    @classmethod
    def from_url(cls, url: str) -> InMemoryStorage:
        """Open ``memory://``: a new, empty store."""
        return cls()

    # Every method runs without awaiting, so each is atomic under asyncio.

    def _touch(self, session_id: str) -> _Session:
        now = time.time()
        # Re-inserted last: the dict's order is the order of writes, so listings need no sort.
        s = self._sessions.pop(session_id, None) or _Session(created_at=now)
        self._sessions[session_id] = s
        s.updated_at = now
        return s

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Replace the whole history."""
        messages = [_detached(m) for m in history]
        self._touch(session_id).messages = messages

    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history, as copies."""
        s = self._sessions.get(session_id)
        return [_detached(m) for m in s.messages] if s else []

    async def delete(self, session_id: str) -> None:
        """Remove everything of the session."""
        self._sessions.pop(session_id, None)

    async def list_sessions(self) -> list[str]:
        """Session ids, most recently updated first."""
        return list(reversed(self._sessions))

    async def exists(self, session_id: str) -> bool:
        """Whether the session exists."""
        return session_id in self._sessions

    async def _append(
        self, session_id: str, messages: Sequence[ChatMessage], add: dict[str, int]
    ) -> None:
        added = [_detached(m) for m in messages]
        s = self._touch(session_id)
        s.messages.extend(added)
        if add:
            s.info[RESERVED_FIELD] = merge_reserved(s.info.get(RESERVED_FIELD) or {}, add, {})

    async def _count(self, session_id: str) -> int:
        s = self._sessions.get(session_id)
        return len(s.messages) if s else 0

    async def _tail(self, session_id: str, n: int) -> list[ChatMessage]:
        s = self._sessions.get(session_id)
        return [_detached(m) for m in s.messages[-n:]] if s else []

    async def _read(self, session_id: str, offset: int, limit: int | None) -> list[ChatMessage]:
        s = self._sessions.get(session_id)
        end = None if limit is None else offset + limit
        return [_detached(m) for m in s.messages[offset:end]] if s else []

    async def _cut(self, session_id: str, n: int, *, pop: bool) -> list[ChatMessage]:
        s = self._sessions.get(session_id)
        keep = kept(len(s.messages), n, pop=pop) if s else 0
        if not s or keep >= len(s.messages):
            return []
        removed = s.messages[keep:]
        del self._touch(session_id).messages[keep:]
        return removed if pop else []

    def _info(self, session_id: str, s: _Session) -> SessionInfo:
        first = first_user(s.messages)
        return decode_info(
            session_id,
            s.info,
            created_at=from_ts(s.created_at),
            updated_at=from_ts(s.updated_at),
            message_count=len(s.messages),
            default_title=first[1] if first else None,
            where="memory",
        )

    async def _get_info(self, session_id: str) -> SessionInfo | None:
        s = self._sessions.get(session_id)
        return self._info(session_id, s) if s else None

    async def _update_info(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        s = self._touch(session_id)
        s.info.update(fields)
        return self._info(session_id, s)

    async def _change_reserved(
        self, session_id: str, add: dict[str, int], put: dict[str, Any]
    ) -> None:
        s = self._touch(session_id)
        s.info[RESERVED_FIELD] = merge_reserved(s.info.get(RESERVED_FIELD) or {}, add, put)

    async def _find(self, query: SessionQuery) -> list[SessionInfo]:
        found = []
        for sid, s in reversed(self._sessions.items()):
            info = self._info(sid, s)
            if query.matches(info):
                found.append(info)
                if len(found) == query.limit:
                    break
        return found

    async def _state_entries(self, session_id: str) -> dict[str, StateEntry]:
        s = self._sessions.get(session_id)
        return live_entries(copy_json(s.state)) if s else {}

    async def _state_and_flow(self, session_id: str) -> tuple[dict[str, StateEntry], SessionFlow]:
        s = self._sessions.get(session_id)
        if s is None:
            return {}, NO_FLOW
        flow = decode_flow(session_id, s.info.get(RESERVED_FIELD), "memory")
        return live_entries(copy_json(s.state)), flow

    async def _set_state(self, session_id: str, entries: dict[str, dict[str, Any]]) -> None:
        s = self._touch(session_id)
        s.state = merge_state(s.state, entries)

    async def _drop_state(self, session_id: str, keys: Collection[str] | None) -> None:
        s = self._sessions.get(session_id)
        state = remove_state(s.state, keys) if s else None
        if s and state is not None:
            s.state = state
            self._touch(session_id)

    async def _set_times(self, session_id: str, created_at: datetime, updated_at: datetime) -> None:
        s = self._touch(session_id)
        s.created_at, s.updated_at = created_at.timestamp(), updated_at.timestamp()
