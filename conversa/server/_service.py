"""What every endpoint shares: the storage, the agent settings, and who may see which thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..session import USER_PART_PREFIX, Session
from ..state import is_internal
from ..storage import validate_session_id
from ._auth import Caller
from ._errors import ApiError
from ._sessions import DEFAULT_LIVE_MESSAGES, DEFAULT_LIVE_SESSIONS, SessionPool

if TYPE_CHECKING:
    from ..events import Approver
    from ..model import ChatModel
    from ..storage import ConversationStorage, SessionInfo
    from ..tools import Tool

T = TypeVar("T")


@dataclass
class Service:
    """The server's settings and the storage it serves."""

    storage: ConversationStorage
    model: str | ChatModel | None = None
    tools: Iterable[Tool | Callable[..., Any]] = ()
    system_prompt: str | None = None
    max_iterations: int = 10
    approve: Approver | None = None
    turn_wait: float | None = 30.0
    max_body: int = 10 * 1024 * 1024
    live_sessions: int = DEFAULT_LIVE_SESSIONS
    live_messages: int = DEFAULT_LIVE_MESSAGES
    _resolved: ChatModel | None = field(default=None, init=False)
    _resolving: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _pool: SessionPool = field(init=False)
    _finishing: set[asyncio.Task[Any]] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        from ..tools._registry import ToolRegistry

        self.tools = list(ToolRegistry(self.tools))  # checked once, at start-up
        self._pool = SessionPool(self.live_sessions, self.live_messages)

    async def chat_model(self) -> ChatModel:
        """The model, resolved once (in a thread: resolving may probe local servers)."""
        from ..model import ChatModel, resolve_model

        if isinstance(self.model, ChatModel):
            return self.model
        async with self._resolving:
            if self._resolved is None:
                self._resolved = await asyncio.to_thread(resolve_model, self.model)
            return self._resolved

    async def session(self, session_id: str) -> Session:
        """A Session on the thread lent to one request: the kept one, or a new one.

        Give it back with ``give_back`` once the request is done with it (a turn that
        failed or was cancelled does not: the next request starts afresh).
        """
        kept = self._pool.take(session_id)
        if kept is not None:
            return kept
        return Session(
            session_id,
            self.storage,
            model=await self.chat_model(),
            tools=self.tools,
            system_prompt=self.system_prompt,
            max_iterations=self.max_iterations,
            approve=self.approve,
            turn_wait=self.turn_wait,
        )

    def give_back(self, session: Session) -> None:
        """Keep ``session`` for its thread's next request."""
        self._pool.give_back(session)

    def forget(self, session_id: str) -> None:
        """Drop the kept Session of a deleted thread."""
        self._pool.forget(session_id)

    @asynccontextmanager
    async def lent(self, session_id: str) -> AsyncIterator[Session]:
        """``session`` for the block, given back when the block ends without an error."""
        session = await self.session(session_id)
        yield session
        self.give_back(session)

    async def finish(self, work: Awaitable[T]) -> T:
        """Run ``work`` to its end even if the request is cancelled (its client went away).

        A plain (not streamed) turn is completed and stored whatever the client does, as
        DCAF's and Distri's clients expect: the answer can be read from the thread later.
        """
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self._finishing.add(task)  # a strong reference: the loop keeps only weak ones
        task.add_done_callback(self._settled)
        return await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._finishing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a request that went away cannot answer it anyway

    # -- who may see what ---------------------------------------------------------------

    async def visible(self, session_id: str, caller: Caller) -> SessionInfo | None:
        """The thread's info, None if it does not exist; 404 if it is another user's."""
        validate_session_id(session_id)
        info = await self.storage.get_info(session_id)
        if info is not None and not caller.sees(info.user_id):
            raise not_found(session_id)
        return info

    async def existing(self, session_id: str, caller: Caller) -> SessionInfo:
        """The thread's info; 404 if it does not exist or is another user's."""
        info = await self.visible(session_id, caller)
        if info is None:
            raise not_found(session_id)
        return info

    async def admit(self, session_id: str, caller: Caller) -> None:
        """Let ``caller`` run a turn on the thread (``claim``): an administrator sees every
        thread, so nothing is looked up for one (the turn itself creates a new thread)."""
        if caller.admin:
            validate_session_id(session_id)
            return
        await self.claim(session_id, caller)

    async def claim(self, session_id: str, caller: Caller) -> SessionInfo:
        """The thread's info, creating the thread for ``caller`` if it does not exist."""
        info = await self.visible(session_id, caller)
        if info is None:
            info = await self.storage.update_info(session_id, user_id=caller.user_id)
        return info


def not_found(session_id: str) -> ApiError:
    """The 404 for a thread that does not exist or that the caller may not see."""
    return ApiError(404, f"no thread {session_id!r}; create it first (or check the token)")


def shown_key(key: str) -> bool:
    """Whether a state key is a value of the API: the app's keys and the user parts."""
    return not is_internal(key) or key.startswith(USER_PART_PREFIX)
