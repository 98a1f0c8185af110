"""Blocking counterparts of create_session and Session, for scripts that do not use asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from datetime import datetime
from os import PathLike
from typing import Any, TypeVar, Unpack

from ._session_options import SessionOptions, shows_options_of
from ._state_views import StateView
from .compaction import CompactionResult
from .context import ContextStatus
from .errors import ConversaError
from .events import AgentResult
from .messages import ChatMessage, Content
from .session import Session, create_session
from .storage import ConversationStorage

T = TypeVar("T")


class SyncSession:
    """A Session whose methods block; it runs its own event loop."""

    def __init__(self, runner: asyncio.Runner, session: Session) -> None:
        self._runner = runner
        self.session = session
        """The underlying async Session."""

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self.session.session_id

    @property
    def history(self) -> list[ChatMessage]:
        """The whole stored history (read from storage if only its newest part was loaded)."""
        return self._run(self.session.load_history())

    @property
    def state(self) -> SyncState:
        """The session's state, with blocking writes."""
        return SyncState(self)

    def message_count(self) -> int:
        """Every stored message."""
        return self.session.message_count()

    def send_message(
        self, content: Content | ChatMessage, *, max_iterations: int | None = None
    ) -> AgentResult:
        """Send a user message and block until the agent answers."""
        return self._run(self.session.send_message(content, max_iterations=max_iterations))

    def send_message_with_iterations(
        self, content: Content | ChatMessage, max_iterations: int
    ) -> AgentResult:
        """send_message with a one-off iteration limit."""
        return self.send_message(content, max_iterations=max_iterations)

    def retry(self) -> AgentResult:
        """Answer the last user message again."""
        return self._run(self.session.retry())

    def undo(self) -> list[ChatMessage]:
        """Remove the last user message and everything after it."""
        return self._run(self.session.undo())

    def clear_history(self) -> None:
        """Delete every message of this session."""
        self._run(self.session.clear_history())

    def compact(self) -> CompactionResult:
        """Summarize the oldest messages now (see Session.compact)."""
        return self._run(self.session.compact())

    def context_status(self) -> ContextStatus:
        """How much of the history the model sees now."""
        return self._run(self.session.context_status())

    def set_user_part_text(self, name: str, text: str) -> None:
        """Attach a text part to the user's messages until it is deleted."""
        self._run(self.session.set_user_part_text(name, text))

    def set_user_part_image(
        self, name: str, image: bytes | str, mime_type: str = "image/png"
    ) -> None:
        """Attach an image to the user's messages until it is deleted."""
        self._run(self.session.set_user_part_image(name, image, mime_type))

    def delete_user_part(self, name: str) -> None:
        """Stop attaching the part called ``name``."""
        self._run(self.session.delete_user_part(name))

    def clear_user_parts(self) -> None:
        """Stop attaching any user part."""
        self._run(self.session.clear_user_parts())

    def close(self) -> None:
        """Close the storage and the event loop."""
        try:
            self._run(self.session.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncState(StateView):
    """SessionState with blocking writes: each is stored before it returns."""

    __slots__ = ("_owner",)

    def __init__(self, owner: SyncSession) -> None:
        super().__init__(owner.session.state)
        self._owner = owner

    def _store(
        self, values: Mapping[str, Any], ttl: float | None, expires_at: datetime | None
    ) -> None:
        self._owner._run(self._state.update(values, ttl=ttl, expires_at=expires_at))

    def _remove(self, keys: list[str]) -> None:
        for key in keys:
            self._owner._run(self._state.delete(key))

    def clear(self) -> None:
        """Remove every key that is not internal."""
        self._owner._run(self._state.clear())

    def from_dict(self, values: Mapping[str, Any]) -> None:
        """Replace the state (but its internal keys) with ``values``."""
        self._owner._run(self._state.from_dict(values))

    @property
    def is_modified(self) -> bool:
        """Whether this session wrote to the state since it was loaded."""
        return self._state.is_modified

    @property
    def is_empty(self) -> bool:
        """Whether no live key is set."""
        return self._state.is_empty


@shows_options_of(Session)
def create_session_sync(
    session_id: str,
    storage: str | PathLike[str] | ConversationStorage = "sessions",
    **options: Unpack[SessionOptions],
) -> SyncSession:
    """create_session for code without an event loop (same arguments); close() it when done."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise ConversaError(
            "create_session_sync() cannot run inside an event loop; use `await create_session()`"
        )
    runner = asyncio.Runner()
    try:
        session = runner.run(create_session(session_id, storage, **options))
    except BaseException:
        runner.close()
        raise
    return SyncSession(runner, session)
