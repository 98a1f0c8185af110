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


class SessionPool:
    """Idle Sessions by thread id, at most ``size`` of them, least recently used dropped first."""

    def __init__(self, size: int = DEFAULT_LIVE_SESSIONS) -> None:
        if size < 0:
            raise ValueError("live_sessions must be 0 or more")
        self.size = size
        self._idle: OrderedDict[str, Session] = OrderedDict()

    def take(self, thread_id: str) -> Session | None:
        """The idle Session of the thread, now lent out (None: there is none)."""
        return self._idle.pop(thread_id, None)

    def give_back(self, session: Session) -> None:
        """Keep ``session`` for the thread's next request (the newest one given back wins)."""
        if not self.size:
            return
        self._idle.pop(session.session_id, None)
        self._idle[session.session_id] = session
        while len(self._idle) > self.size:
            self._idle.popitem(last=False)

    def forget(self, thread_id: str) -> None:
        """Drop the thread's idle Session (the thread was deleted)."""
        self._idle.pop(thread_id, None)

    def __len__(self) -> int:
        return len(self._idle)

    def __contains__(self, thread_id: object) -> bool:
        return thread_id in self._idle
