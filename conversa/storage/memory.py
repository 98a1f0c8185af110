"""InMemoryStorage: sessions in a dict, for tests and ephemeral chats."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..messages import ChatMessage
from .base import (
    _UNSET,
    ConversationStorage,
    SessionInfo,
    StateEntry,
    copy_json,
    from_ts,
    info_fields,
    info_matches,
    live_entries,
    live_raw,
    state_entries,
    title_from,
    ts,
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
    order: int = 0
    messages: list[ChatMessage] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)


class InMemoryStorage(ConversationStorage):
    """Sessions kept in this process only; nothing survives it. URL: ``memory://``."""

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._clock = itertools.count(1)

    @classmethod
    def from_url(cls, url: str) -> InMemoryStorage:
        """Open ``memory://``: a new, empty store."""
        return cls()

    # Every method runs without awaiting, so each is atomic under asyncio.

    def _touch(self, session_id: str) -> _Session:
        now = time.time()
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions[session_id] = _Session(created_at=now)
        s.updated_at = now
        s.order = next(self._clock)
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
        return [
            sid
            for sid, _ in sorted(self._sessions.items(), key=lambda kv: kv[1].order, reverse=True)
        ]

    async def exists(self, session_id: str) -> bool:
        """Whether the session exists."""
        return session_id in self._sessions

    async def append(self, session_id: str, messages: Sequence[ChatMessage]) -> None:
        """Add messages to the end."""
        added = [_detached(m) for m in messages]
        self._touch(session_id).messages.extend(added)

    async def count(self, session_id: str) -> int:
        """The number of stored messages."""
        s = self._sessions.get(session_id)
        return len(s.messages) if s else 0

    async def tail(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """The newest ``n`` messages, as copies."""
        if n < 0:
            raise ValueError("n must be >= 0")
        s = self._sessions.get(session_id)
        return [_detached(m) for m in s.messages[max(0, len(s.messages) - n) :]] if s and n else []

    async def truncate(self, session_id: str, keep: int) -> None:
        """Keep the oldest ``keep`` messages."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        s = self._sessions.get(session_id)
        if s and keep < len(s.messages):
            del self._touch(session_id).messages[keep:]

    async def pop(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """Remove and return the newest ``n`` messages."""
        if n < 0:
            raise ValueError("n must be >= 0")
        s = self._sessions.get(session_id)
        if not s or n == 0 or not s.messages:
            return []
        keep = max(0, len(s.messages) - n)
        popped = s.messages[keep:]
        del self._touch(session_id).messages[keep:]
        return popped

    def _info(self, session_id: str, s: _Session) -> SessionInfo:
        return SessionInfo(
            session_id=session_id,
            created_at=from_ts(s.created_at),
            updated_at=from_ts(s.updated_at),
            message_count=len(s.messages),
            title=s.info.get("title") or title_from(s.messages),
            user_id=s.info.get("user_id"),
            status=s.info.get("status", "active"),
            metadata=copy_json(s.info.get("metadata", {})),
        )

    async def get_info(self, session_id: str) -> SessionInfo | None:
        """The session's info, or None."""
        s = self._sessions.get(session_id)
        return self._info(session_id, s) if s else None

    async def update_info(
        self,
        session_id: str,
        *,
        title: str | None = _UNSET,
        user_id: str | None = _UNSET,
        status: str = _UNSET,
        metadata: Mapping[str, Any] = _UNSET,
    ) -> SessionInfo:
        """Set info fields and return the info."""
        fields = info_fields(title=title, user_id=user_id, status=status, metadata=metadata)
        s = self._touch(session_id)
        s.info.update(copy_json(fields))
        return self._info(session_id, s)

    async def find_sessions(
        self,
        *,
        user_id: str | None = None,
        status: str | None = None,
        updated_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[SessionInfo]:
        """Matching infos, newest first."""
        found = []
        for sid in await self.list_sessions():
            info = self._info(sid, self._sessions[sid])
            if info_matches(info, user_id, status, updated_before):
                found.append(info)
                if limit is not None and len(found) >= limit:
                    break
        return found

    async def get_state_entries(self, session_id: str) -> dict[str, StateEntry]:
        """Unexpired state entries, their values as copies."""
        s = self._sessions.get(session_id)
        return live_entries(copy_json(s.state)) if s else {}

    async def set_state(
        self,
        session_id: str,
        values: Mapping[str, Any],
        *,
        ttl: float | None = None,
        expires_at: datetime | None = None,
    ) -> None:
        """Set state keys, to expire after ``ttl`` seconds or at ``expires_at``."""
        entries = copy_json(state_entries(values, ttl, expires_at))
        s = self._touch(session_id)
        s.state = {**live_raw(s.state), **entries}

    async def set_times(
        self, session_id: str, *, created_at: datetime, updated_at: datetime
    ) -> None:
        """Set the creation and last-update times."""
        s = self._touch(session_id)
        s.created_at, s.updated_at = ts(created_at), ts(updated_at)

    async def delete_state(self, session_id: str, keys: Iterable[str]) -> None:
        """Remove state keys."""
        s = self._sessions.get(session_id)
        keys = [k for k in keys if s and k in s.state]
        if s and keys:
            for k in keys:
                del s.state[k]
            self._touch(session_id)

    async def clear_state(self, session_id: str) -> None:
        """Remove all state keys."""
        s = self._sessions.get(session_id)
        if s and s.state:
            s.state.clear()
            self._touch(session_id)
