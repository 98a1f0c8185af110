"""Session: one conversation kept in storage, with the ReAct loop around every user message."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager
from os import PathLike
from typing import TYPE_CHECKING, Any, Unpack

from ._interceptors import adapt_request_interceptors, adapt_response_interceptors
from ._session_options import SessionOptions, check_options, shows_options_of
from ._state_views import KeyValueAccess
from ._tool_calls import restore_journaled_result
from ._user_parts import USER_PART_PREFIX as USER_PART_PREFIX
from ._user_parts import UserPartAccess, user_parts
from .agent import CancelFlag, ToolProtocol, TurnSetup, run_turn
from .compaction import Compaction, CompactionResult, compact_transcript, compaction_option
from .context import (
    Calibration,
    ContextStatus,
    PromptOptions,
    TokenCounter,
    context_status,
    estimate_tokens,
)
from .errors import ConversaError
from .events import (
    AgentResult,
    Approver,
    OnLimit,
    ReactMode,
    RequestInterceptor,
    ResponseInterceptor,
    TurnDone,
    TurnEvent,
)
from .flow import Flow
from .messages import ChatMessage, Content
from .model import ChatModel, resolve_model
from .state import SessionState
from .storage import ConversationStorage, open_storage, validate_session_id
from .storage._lease import DEFAULT_WAIT, check_wait
from .transcript import Transcript, Window

if TYPE_CHECKING:
    from .tools import Tool, ToolRegistry

DEFAULT_TURN_WAIT = DEFAULT_WAIT
"""Seconds a change waits for another process's turn on the session (then SessionBusy)."""


class Session(KeyValueAccess, UserPartAccess):
    """A conversation: its stored history, its state, and the agent that answers in it.

    ``session.get/set/delete/has/update`` and ``session["k"]`` are DCAF's sync shape of
    ``session.state`` (see SessionState for when such changes are stored); the
    ``set_user_part_*`` methods attach content to every user message the model gets.
    """

    def __init__(
        self,
        session_id: str,
        storage: ConversationStorage,
        *,
        model: str | ChatModel | None = None,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        system_prompt: str | None = None,
        max_iterations: int = 10,
        react_mode: ReactMode = "auto",
        context_window: int | None = None,
        approve: Approver | None = None,
        user_id: str | None = None,
        on_limit: OnLimit = "stop",
        token_counter: TokenCounter = estimate_tokens,
        request_interceptors: Sequence[RequestInterceptor] = (),
        response_interceptors: Sequence[ResponseInterceptor] = (),
        turn_wait: float | None = DEFAULT_TURN_WAIT,
        compaction: Compaction | bool | None = None,
    ) -> None:
        from .tools._registry import ToolRegistry

        check_options(react_mode=react_mode, max_iterations=max_iterations, on_limit=on_limit)
        self.session_id = validate_session_id(session_id)
        self.storage = storage
        self.tools: ToolRegistry = ToolRegistry(tools)
        self.system_prompt = system_prompt
        self.max_iterations = max_iterations
        self.react_mode: ReactMode = react_mode
        self.context_window = context_window
        self.approve = approve
        self.user_id = user_id
        self.on_limit: OnLimit = on_limit
        self.token_counter = token_counter
        self.request_interceptors = list(request_interceptors)
        self.response_interceptors = list(response_interceptors)
        self.turn_wait = check_wait(turn_wait)
        self.compaction: Compaction | None = compaction_option(compaction)
        """When to summarize the oldest messages (needs a context_window; None: trim only)."""
        self.state = SessionState(storage, session_id)
        self._flow = Flow(storage, self.session_id)
        self._model_spec = model
        self._model: ChatModel | None = model if not isinstance(model, (str, type(None))) else None
        self._protocol = ToolProtocol(text=react_mode == "text")
        self._transcript = Transcript(storage, self.session_id)
        self._lock = asyncio.Lock()
        self._waiting = False
        self._owns_storage = False
        self._turn_task: asyncio.Task[Any] | None = None
        self._cancel = CancelFlag()
        self._calibration = Calibration()

    @property
    def flow(self) -> Flow:
        """Where the session is in its flow (falai's routes and steps), kept with its info."""
        return self._flow

    # -- model ------------------------------------------------------------------------

    def _target(self) -> SessionState:
        return self.state  # the state that session.get/set/... reach

    @property
    def model(self) -> ChatModel:
        """The chat model, resolved on first use (raises ModelNotConfigured when there is none)."""
        if self._model is None:
            self._model = resolve_model(self._model_spec)
        return self._model

    @model.setter
    def model(self, value: str | ChatModel | None) -> None:
        self._model_spec = value
        self._model = value if not isinstance(value, (str, type(None))) else None
        self._protocol = ToolProtocol(text=self.react_mode == "text")

    async def _chat_model(self) -> ChatModel:
        """``model`` for a turn: resolved in a thread, as resolving may probe local servers."""
        if self._model is None:
            spec = self._model_spec
            model = await asyncio.to_thread(resolve_model, spec)
            if self._model is None and self._model_spec is spec:  # not replaced meanwhile
                self._model = model
            return model
        return self._model

    # -- history ----------------------------------------------------------------------

    @property
    def history(self) -> list[ChatMessage]:
        """The stored history as of the last sync (a copy).

        A session opened with a context_window reads only the newest messages its prompt can
        hold; until ``load_history()`` has read the rest, this raises ConversaError rather
        than give a part as the whole.
        """
        if self._transcript.base:
            raise ConversaError(
                f"session {self.session_id!r}: only its newest messages are loaded (a "
                "context_window bounds what is read); `await session.load_history()` reads "
                "them all"
            )
        return list(self._transcript.messages)

    async def load_history(self) -> list[ChatMessage]:
        """The whole stored history, read from storage if only its newest part was (a copy)."""
        async with self._lock:
            await self._transcript.refresh(self._window())
            await self._transcript.load_all()
            return list(self._transcript.messages)

    def message_count(self) -> int:
        """Every stored message: system, user, assistant and tool."""
        return len(self._transcript)

    def _window(self) -> Window | None:
        """What the prompt can hold: the budget and how tokens are counted (None: no limit)."""
        return None if self.context_window is None else (self.context_window, self.token_counter)

    async def refresh(self) -> None:
        """Catch up with what other processes stored; loads the history only if it changed."""
        async with self._lock:
            await self._transcript.refresh(self._window())

    async def _reload_state(self) -> None:
        """Read state and flow position again in one read (pending sync changes stored first)."""
        await self.state.flush()
        entries, position = await self.storage.get_state_and_flow(self.session_id)
        self.state.use(entries)
        self._flow.use(position)

    async def clear_history(self) -> None:
        """Delete every message of this session (its state and info stay)."""
        async with self._lock, self._leased():
            await self._transcript.clear()

    async def undo(self) -> list[ChatMessage]:
        """Remove the last user message and everything after it; returns what was removed."""
        async with self._lock, self._leased():
            await self._transcript.refresh(self._window())
            index = await self._transcript.newest_user_index()
            if index is None:
                return []
            return await self._transcript.truncate(index)

    # -- the lease: one change of the history at a time, across processes --------------

    @property
    def waiting_for_lease(self) -> bool:
        """Whether a change is waiting for another turn on this session (elsewhere) to end."""
        return self._waiting

    @asynccontextmanager
    async def _leased(self) -> AsyncIterator[None]:
        """Hold the session's lease, waiting up to ``turn_wait`` (then SessionBusy)."""
        self._waiting = True
        try:
            async with self.storage.lease(self.session_id, wait=self.turn_wait):
                self._waiting = False
                yield
        finally:
            self._waiting = False

    # -- turns ------------------------------------------------------------------------

    async def send_message(
        self, content: Content | ChatMessage, *, max_iterations: int | None = None
    ) -> AgentResult:
        """Send a user message and run the agent until it answers or hits the limit."""
        return await _drain(self._turn(content, max_iterations, stream=False))

    async def send_message_with_iterations(
        self, content: Content | ChatMessage, max_iterations: int
    ) -> AgentResult:
        """send_message with a one-off iteration limit."""
        return await self.send_message(content, max_iterations=max_iterations)

    def stream_message(
        self, content: Content | ChatMessage, *, max_iterations: int | None = None
    ) -> AsyncGenerator[TurnEvent, None]:
        """Send a user message and get text deltas, tool events and finally TurnDone."""
        return self._turn(content, max_iterations, stream=True)

    async def retry(self, *, max_iterations: int | None = None) -> AgentResult:
        """Answer the last user message again, dropping the answer it got."""
        return await _drain(self._turn(None, max_iterations, stream=False))

    def stream_retry(self, *, max_iterations: int | None = None) -> AsyncGenerator[TurnEvent, None]:
        """retry(), streamed."""
        return self._turn(None, max_iterations, stream=True)

    async def resume(self, *, max_iterations: int | None = None) -> AgentResult:
        """Run the agent on from the stored history, without a new user message: after tool
        results were stored by other means (an approval answered out of band, as DCAF's
        clients do), the model sees them and goes on."""
        return await _drain(self._turn(None, max_iterations, stream=False, resume=True))

    def stream_resume(
        self, *, max_iterations: int | None = None
    ) -> AsyncGenerator[TurnEvent, None]:
        """resume(), streamed."""
        return self._turn(None, max_iterations, stream=True, resume=True)

    async def _turn(
        self,
        content: Content | ChatMessage | None,
        max_iterations: int | None,
        *,
        stream: bool,
        resume: bool = False,
    ) -> AsyncGenerator[TurnEvent, None]:
        message = None
        if content is not None:
            message = content if isinstance(content, ChatMessage) else ChatMessage.user(content)
            if message.role != "user":
                raise ValueError(f"send a user message, not a {message.role} message")
        async with self._lock, self._leased():
            transcript = self._transcript
            await transcript.refresh(self._window())
            await self._reload_state()
            await restore_journaled_result(transcript, self.state)
            # A crash may have left tool calls unanswered at the end: answer them for good
            # now, before the new user message makes them a gap in the middle.
            await transcript.answer_dangling_calls()
            if message is None and not resume:
                index = await transcript.newest_user_index()
                if index is None:
                    raise ConversaError("there is no user message to retry; send one first")
                await transcript.truncate(index + 1)
            self._turn_task, self._cancel.requested = asyncio.current_task(), False
            turn = run_turn(transcript, message, self._setup(max_iterations), stream=stream)
            try:
                async with aclosing(turn) as events:
                    async for event in events:
                        yield event
            finally:
                self._turn_task = None

    # -- compaction and what the model sees ---------------------------------------------

    async def compact(self) -> CompactionResult:
        """Summarize the oldest part of the conversation now, whatever the threshold says.

        The summary is appended to the history (nothing is removed); the result says what
        was done, or why nothing was (too little to summarize, a failed summary call, or a
        summary that would not make the prompt smaller).
        """
        async with self._lock, self._leased():
            transcript = self._transcript
            await transcript.refresh(self._window())
            await transcript.answer_dangling_calls()
            options = self._setup(None).prompt
            model = await self._chat_model()
            result = await compact_transcript(transcript, options, model, force=True)
            if result.calls:
                await transcript.add_usage(result.usage, result.calls)
            return result

    async def context_status(self) -> ContextStatus:
        """How much of the history the model sees now: summarized, sent, and the tokens."""
        async with self._lock:
            await self._transcript.refresh(self._window())
            return context_status(
                self._transcript, self._setup(None).prompt, compaction=self.compaction
            )

    def cancel(self) -> bool:
        """Stop the turn in progress; it ends with stop_reason "cancelled", its partial answer
        stored (marked interrupted) and the history valid. False if no turn is running.

        send_message and retry then return that result. A stream ends with it when the cancel
        reaches the turn itself, or raises CancelledError if the consumer was awaiting
        something else at that moment.
        """
        task = self._turn_task
        if task is None or task.done():
            return False
        self._cancel.requested = True
        task.cancel()
        return True

    def _setup(self, max_iterations: int | None) -> TurnSetup:
        """What the loop needs for one turn, from this session's current settings."""
        return TurnSetup(
            model=self._chat_model,
            tools=self.tools,
            prompt=PromptOptions(
                system_prompt=self.system_prompt,
                context_window=self.context_window,
                token_counter=self.token_counter,
                request_interceptors=adapt_request_interceptors(
                    self.request_interceptors, self.state
                ),
                user_parts=functools.partial(user_parts, self.state),
                calibration=self._calibration,
                compaction=self.compaction,
            ),
            approve=self.approve,
            react_mode=self.react_mode,
            max_iterations=self.max_iterations if max_iterations is None else max_iterations,
            on_limit=self.on_limit,
            response_interceptors=adapt_response_interceptors(
                self.response_interceptors, self.state
            ),
            protocol=self._protocol,
            cancel=self._cancel,
            context=self,
            state=self.state,
            stamp=self._flow.stamp,
        )

    async def close(self) -> None:
        """Store pending sync state changes; close the storage if create_session opened it."""
        try:
            await self.state.flush()
        finally:
            if self._owns_storage:
                await self.storage.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Session {self.session_id!r}: {len(self._transcript)} messages>"


async def _drain(events: AsyncGenerator[TurnEvent, None]) -> AgentResult:
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, TurnDone):
                return event.result
    raise ConversaError("the turn ended without a result")  # pragma: no cover


@shows_options_of(Session)
async def create_session(
    session_id: str,
    storage: str | PathLike[str] | ConversationStorage = "sessions",
    **options: Unpack[SessionOptions],
) -> Session:
    """Open the session ``session_id`` in ``storage`` (a URL, a path or a storage object).

    It is created if it does not exist, else its history and state are loaded. The keyword
    arguments are Session's: ``model`` a name or a ChatModel (None: from the environment),
    ``tools`` the callable tools, ``system_prompt``, ``max_iterations`` per turn,
    ``react_mode`` ("auto", "tools" or "text"), ``context_window`` (tokens; None: no trimming),
    ``approve(name, arguments)`` for tools that need approval, ``user_id`` recorded in the
    session's info, ``on_limit`` ("stop" or "generate"), ``token_counter``, the request and
    response interceptors, and ``turn_wait``: seconds a change of the history (a turn, undo,
    clear) waits while another turn on the session holds its lease, then SessionBusy (None:
    no limit), and ``compaction`` (a Compaction, or True for its defaults): summarize the
    oldest messages when the prompt nears ``context_window``, instead of only trimming.
    """
    store = open_storage(storage)
    try:
        session = Session(session_id, store, **options)
        session._owns_storage = store is not storage
        if not await store.exists(session_id):
            async with session._leased():
                await store.append(session_id, [])  # unlike save, never erases another's
        await session.refresh()
        await session._reload_state()
        if session.user_id is not None:
            info = await store.get_info(session_id)
            if info is None or info.user_id != session.user_id:
                await store.update_info(session_id, user_id=session.user_id)
    except BaseException:
        if store is not storage:  # nothing else holds it: its threads and connections end
            await store.close()
        raise
    return session
