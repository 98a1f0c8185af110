"""The live Sessions a server keeps between requests, so a turn does not reload its thread.

A Session caches its thread's history; every turn, undo and retry first catches up with
storage under the thread's lease (``Transcript.refresh``: a count and the newest message,
the history read again only if another instance changed it), so a kept Session stays
consistent with other instances on the same storage. Each Session is lent to one request at
a time: a second request on a busy thread gets a Session of its own, and a turn's cancel can
only ever reach the request that owns it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..session import Session

DEFAULT_LIVE_SESSIONS = 64
"""Idle Sessions kept per server (least recently used dropped first); 0 keeps none."""
DEFAULT_LIVE_MESSAGES = 200_000
"""Cached messages the idle Sessions may hold in all (a bound on the memory they take)."""


class SessionPool:
    """Idle Sessions by thread id, least recently used dropped first: at most ``size`` of
    them, holding at most ``messages`` cached messages in all."""

    def __init__(
        self, size: int = DEFAULT_LIVE_SESSIONS, messages: int = DEFAULT_LIVE_MESSAGES
    ) -> None:
        if size < 0 or messages < 0:
            raise ValueError("live_sessions and live_messages must be 0 or more")
        self.size = size
        self.messages = messages
        self._idle: OrderedDict[str, tuple[Session, int]] = OrderedDict()
        self._held = 0  # the cached messages of the idle Sessions

    def take(self, thread_id: str) -> Session | None:
        """The idle Session of the thread, now lent out (None: there is none)."""
        kept = self._idle.pop(thread_id, None)
        if kept is None:
            return None
        self._held -= kept[1]
        return kept[0]

    def give_back(self, session: Session) -> None:
        """Keep ``session`` for the thread's next request (the newest one given back wins)."""
        self.forget(session.session_id)
        held = session.message_count()
        if not self.size or held > self.messages:
            return  # a thread too long to keep is read again by its next request
        self._idle[session.session_id] = (session, held)
        self._held += held
        while len(self._idle) > self.size or self._held > self.messages:
            _, (_, dropped) = self._idle.popitem(last=False)
            self._held -= dropped

    def forget(self, thread_id: str) -> None:
        """Drop the thread's idle Session (the thread was deleted)."""
        kept = self._idle.pop(thread_id, None)
        if kept is not None:
            self._held -= kept[1]

    def __len__(self) -> int:
        return len(self._idle)

    def __contains__(self, thread_id: object) -> bool:
        return thread_id in self._idle
