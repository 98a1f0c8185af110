"""The ReAct loop: one user turn of model calls and tool runs, native or via the text protocol.

A turn is one async generator, ``run_turn``, over a Transcript and a TurnSetup that says
everything else it needs (model, tools, approver, prompt options, limits). Session drains it
for ``send_message`` and hands its events to the caller for ``stream_message``; the loop itself
knows nothing of Session. Every message is appended the moment it exists, so a cancel, a crash
or an error leaves a history that is valid input for the next model call (the repair in
``_prompt_history.repair`` fills anything still missing).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._prompt_history import INTERRUPTED_RESULT
from ._tool_calls import (
    Outcome,
    approved,
    denied,
    execute,
    parse_arguments,
    prepare,
    restore_journaled_result,
    store_result,
)
from .compaction import compact_transcript, compaction_due
from .context import PromptOptions, build_request, prompt_estimate
from .errors import InvalidMessage, ModelError, ToolsUnsupported
from .events import (
    AgentResult,
    Approver,
    OnLimit,
    ReactMode,
    ResponseInterceptor,
    Step,
    StopReason,
    ToolDone,
    ToolRunning,
    TurnDone,
    TurnEvent,
    maybe_await,
)
from .messages import ChatMessage, ToolCall
from .model import INVALID_CALLS_KEY, ChatModel, ModelResponse, TextDelta, Usage
from .state import JOURNAL_KEY, SessionState, StateChanges
from .text_protocol import observation, parse_text_reply

if TYPE_CHECKING:
    from .tools import ToolRegistry
    from .transcript import Transcript

log = logging.getLogger(__name__)

ModelSource = Callable[[], Awaitable[ChatModel]]
"""Gives the model for the next call; called before each one, so it may resolve lazily."""


@dataclass(slots=True)
class CancelFlag:
    """Set by whoever cancels the turn's task on purpose: the turn then ends with a result."""

    requested: bool = False


@dataclass(slots=True)
class ToolProtocol:
    """How the model gets its tools: natively, or through the text protocol.

    Kept across turns: once an "auto" endpoint has rejected ``tools``, it gets text for good.
    """

    text: bool = False


@dataclass(frozen=True, slots=True)
class TurnSetup:
    """Everything a turn needs besides its transcript."""

    model: ModelSource
    tools: ToolRegistry
    prompt: PromptOptions = field(default_factory=PromptOptions)
    approve: Approver | None = None
    react_mode: ReactMode = "auto"
    max_iterations: int = 10
    on_limit: OnLimit = "stop"
    response_interceptors: Sequence[ResponseInterceptor] = ()
    protocol: ToolProtocol = field(default_factory=ToolProtocol)
    cancel: CancelFlag = field(default_factory=CancelFlag)
    context: Any = None
    """Passed to tools that take a ``session`` parameter and to the interceptors, as is."""
    state: SessionState | None = None
    """Where the sync state changes of tools are collected and stored with their results."""
    stamp: Callable[[Sequence[ChatMessage]], Sequence[ChatMessage]] | None = None
    """Gives the messages the turn stores what their metadata should carry (the flow's route
    and step: conversa.flow.Flow.stamp), just before each is stored."""


# -- the loop ------------------------------------------------------------------------------


class _Turn:
    """The mutable bookkeeping of one turn."""

    def __init__(self, transcript: Transcript, setup: TurnSetup, stream: bool) -> None:
        self.transcript = transcript
        self.setup = setup
        self.stream = stream
        self.iterations = 0
        self.usage = Usage()
        self.calls = 0  # model calls that answered, the summary call included
        self.recorded = (Usage(), 0)  # what the session's totals already hold of this turn
        self.steps: list[Step] = []
        self.warnings: list[str] = []
        self.compaction_failed = False  # tried and failed this turn: retried next turn
        self._start = len(transcript)

    @property
    def stored(self) -> list[ChatMessage]:
        """The messages stored since the turn began."""
        return self.transcript.since(self._start)

    async def store(self, *messages: ChatMessage) -> None:
        """Store messages, and with them what the turn's model calls used since the last
        record (one write: the reply of a model call carries that call's usage)."""
        usage, calls = self._unrecorded()
        stored, now = len(self.transcript), (self.usage, self.calls)
        try:
            await self.transcript.append(self.stamped(messages), usage=usage, calls=calls)
        finally:
            if len(self.transcript) > stored:  # stored, even if cancelled meanwhile
                self.recorded = now

    def stamped(self, messages: Sequence[ChatMessage]) -> Sequence[ChatMessage]:
        stamp = self.setup.stamp
        return messages if stamp is None else stamp(messages)

    async def store_result(self, result: ChatMessage, changes: StateChanges | None) -> bool:
        """Store a tool's result after its state changes (``_tool_calls.store_result``),
        stamped first: the journal holds it as it is stored. True if a journal was written."""
        (stamped,) = self.stamped([result])
        return await store_result(self.transcript, self.setup.state, stamped, changes)

    async def record_usage(self) -> None:
        """Add what this turn used and no stored message carried to the session's totals."""
        usage, calls = self._unrecorded()
        if calls > 0:
            self.recorded = (self.usage, self.calls)
            await self.transcript.add_usage(usage, calls)

    def _unrecorded(self) -> tuple[Usage, int]:
        done_usage, done_calls = self.recorded
        return self.usage - done_usage, self.calls - done_calls

    def result(
        self,
        text: str,
        reason: StopReason,
        *,
        success: bool,
        error: str | None = None,
        exception: BaseException | None = None,
    ) -> TurnDone:
        return TurnDone(
            AgentResult(
                result=text,
                steps=self.steps,
                success=success,
                iterations=self.iterations,
                usage=self.usage,
                stop_reason=reason,
                error=error,
                messages=self.stored,
                exception=exception,
                warnings=list(self.warnings),
            )
        )


async def run_turn(
    transcript: Transcript,
    user_message: ChatMessage | None,
    setup: TurnSetup,
    *,
    stream: bool,
) -> AsyncGenerator[TurnEvent, None]:
    """Run one turn: store the user message (None: answer the stored one), then model and tools.

    What the turn's model calls used is added to the session's stored totals before its
    result is given (or as it fails).
    """
    if setup.max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    turn = _Turn(transcript, setup, stream)
    try:
        async with aclosing(_run(turn, user_message)) as events:
            async for event in events:
                if isinstance(event, TurnDone):
                    await turn.record_usage()
                yield event
    except Exception:
        await turn.record_usage()
        raise


async def _run(turn: _Turn, user_message: ChatMessage | None) -> AsyncGenerator[TurnEvent, None]:
    setup = turn.setup
    if user_message is not None:
        await turn.store(user_message)
    try:
        while turn.iterations < setup.max_iterations:
            text_mode = setup.protocol.text
            try:
                response = None
                async with aclosing(_call_model(turn, tools=True)) as calls:
                    async for event in calls:
                        if isinstance(event, ModelResponse):
                            response = event
                        elif not text_mode:
                            yield event
            except ToolsUnsupported:
                if setup.react_mode != "auto" or text_mode:
                    raise
                setup.protocol.text = True  # this endpoint takes no `tools`: fall back for good
                continue
            assert response is not None
            message = response.message
            if text_mode:
                done = False
                async with aclosing(_text_step(turn, message)) as steps:
                    async for event in steps:
                        done = done or isinstance(event, TurnDone)
                        yield event
                if done:
                    return
            elif message.tool_calls:
                async with aclosing(_run_tool_calls(turn, message)) as runs:
                    async for event in runs:
                        yield event
            else:
                yield turn.result(message.text, "final_answer", success=True)
                return
        async with aclosing(_limit_reached(turn)) as ends:
            async for event in ends:
                yield event
    except ModelError as exc:
        yield turn.result("", "error", success=False, error=str(exc), exception=exc)
    except asyncio.CancelledError:
        if not setup.cancel.requested:
            raise
        # The owner cancelled on purpose: end the turn with a result instead of an error.
        setup.cancel.requested = False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        last = turn.stored[-1] if turn.stored else None
        partial = last.text if last is not None and last.role == "assistant" else ""
        yield turn.result(partial, "cancelled", success=False, error="the turn was cancelled")


async def _call_model(turn: _Turn, *, tools: bool) -> AsyncGenerator[Any, None]:
    """One model call: build the prompt, call, store the assistant message.

    The call counts as an iteration once the model has answered.
    """
    setup = turn.setup
    await _compact_if_due(turn)
    history = turn.transcript.cache
    request = await build_request(
        history,
        setup.prompt,
        setup.tools.openai_schemas() if len(setup.tools) else [],
        text_protocol=setup.protocol.text,
        with_tools=tools,
        limit_note=not tools,
        context=setup.context,
    )
    options = setup.prompt
    sent = None
    if options.context_window is not None:
        sent = prompt_estimate(request.messages, history, options.token_counter)
    partial: list[str] = []
    model = await setup.model()
    try:
        if turn.stream:
            response = None
            async for event in model.stream(request.messages, tools=request.tools):
                if isinstance(event, ModelResponse):
                    response = event
                else:
                    if isinstance(event, TextDelta):
                        partial.append(event.text)
                    yield event
            if response is None:
                raise ModelError("the model's stream ended without a final response")
        else:
            response = await model.complete(request.messages, tools=request.tools)
    except InvalidMessage as exc:
        # a ChatModel built an assistant message that cannot be stored: its answer is unusable
        raise ModelError(f"the model's answer is not a valid message: {exc}") from exc
    except (asyncio.CancelledError, GeneratorExit):
        if partial:
            await turn.store(
                ChatMessage.assistant("".join(partial), metadata={"interrupted": True})
            )
        raise
    except ModelError as exc:
        if partial and not isinstance(exc, ToolsUnsupported):
            meta = {"interrupted": True, "error": str(exc)}
            await turn.store(ChatMessage.assistant("".join(partial), metadata=meta))
        raise
    turn.iterations += 1
    turn.calls += 1
    if sent is not None:
        unreported = options.calibration.unreported
        options.calibration.observe(sent, response.usage.prompt_tokens)
        if options.calibration.unreported and not unreported:
            log.warning("the server reports no token usage: prompt sizes are estimates only")
    for interceptor in setup.response_interceptors:
        changed = await maybe_await(interceptor(response, setup.context))
        response = changed if changed is not None else response
    turn.usage = turn.usage + response.usage
    await turn.store(response.message)
    yield response


async def _compact_if_due(turn: _Turn) -> None:
    """Summarize the oldest messages first if the prompt would exceed the threshold.

    A failure is a warning: this turn goes on with trimming and tries no more; the next
    turn tries again.
    """
    options = turn.setup.prompt
    if turn.compaction_failed or not compaction_due(turn.transcript.cache, options):
        return
    outcome = await compact_transcript(turn.transcript, options, await turn.setup.model())
    turn.usage = turn.usage + outcome.usage
    turn.calls += outcome.calls
    if outcome.failed:
        turn.compaction_failed = True
        warning = f"compaction failed, the prompt was trimmed instead: {outcome.reason}"
        turn.warnings.append(warning)
        log.warning("%s", warning)


async def _run_tool_calls(turn: _Turn, message: ChatMessage) -> AsyncGenerator[TurnEvent, None]:
    """Run every call of one assistant message, concurrently, and store results in order."""
    setup = turn.setup
    thought = message.text or None
    # calls the model got wrong (no name, ...) run nothing and are answered with the problem
    invalid = message.metadata.get(INVALID_CALLS_KEY)
    if not isinstance(invalid, dict):
        invalid = {}
    actions = [
        prepare(setup.tools, c, parse_arguments(c), invalid.get(c.id)) for c in message.tool_calls
    ]
    tasks: list[asyncio.Task[Outcome] | None] = []
    journaled = False
    try:
        # Approvals are asked one at a time, in order, before anything runs.
        approvals = [await approved(action, setup.approve) for action in actions]
        for action, ok in zip(actions, approvals, strict=True):
            if ok:
                yield ToolRunning(action.call)
                run = execute(action, state=setup.state, context=setup.context)
                tasks.append(asyncio.create_task(run))
            else:
                tasks.append(None)
        for action, task in zip(actions, tasks, strict=True):
            call = action.call
            output, ok, changes = (await task) if task is not None else (denied(call), False, None)
            result = ChatMessage.tool(call.id, output, metadata={"tool": call.name, "ok": ok})
            journaled = await turn.store_result(result, changes) or journaled
            turn.steps.append(Step(thought, call.name, action.action_input, output))
            yield ToolDone(call, output, ok)
        if journaled and setup.state is not None:
            await setup.state.delete(JOURNAL_KEY)  # every result is stored: none to restore
    except BaseException:
        # Cancelled, closed or failed half-way: stop what still runs and answer every call
        # that has no stored result yet, so the history stays valid model input.
        for task in tasks:
            if task is not None:
                task.cancel()
        if setup.state is not None:
            await restore_journaled_result(turn.transcript, setup.state)
        await turn.transcript.answer_dangling_calls()
        raise


async def _text_step(turn: _Turn, message: ChatMessage) -> AsyncGenerator[TurnEvent, None]:
    """Act on one text-protocol reply: answer, run its action, or explain what was wrong."""
    setup = turn.setup
    reply = parse_text_reply(message.text)
    if reply.final_answer is not None:
        yield TextDelta(reply.final_answer)
        if reply.thought is not None:
            turn.steps.append(Step(reply.thought, None, None, None))
        yield turn.result(reply.final_answer, "final_answer", success=True)
        return
    if reply.action is not None:
        call = ToolCall(f"text_{turn.iterations}", reply.action, json.dumps(reply.action_input))
        action = prepare(setup.tools, call, reply.action_input)
        changes = None
        try:
            if await approved(action, setup.approve):
                yield ToolRunning(call)
                output, ok, changes = await execute(
                    action, state=setup.state, context=setup.context
                )
            else:
                output, ok = denied(call), False
        except BaseException:
            # the action never finished: say so, as the native protocol's repair does
            await turn.store(observation(INTERRUPTED_RESULT, tool=reply.action, interrupted=True))
            raise
        turn.steps.append(Step(reply.thought, reply.action, reply.action_input, output))
        yield ToolDone(call, output, ok)
        if await turn.store_result(observation(output, tool=reply.action), changes):
            assert setup.state is not None
            await setup.state.delete(JOURNAL_KEY)
        return
    output = f"Error: {reply.problem}. Reply with one JSON object as described."
    turn.steps.append(Step(reply.thought, None, None, output))
    await turn.store(observation(output, tool=reply.action))


async def _limit_reached(turn: _Turn) -> AsyncGenerator[TurnEvent, None]:
    """End a turn that used all its iterations, optionally with one last answer without tools."""
    max_iterations = turn.setup.max_iterations
    error = f"stopped after {turn.iterations} model calls (max_iterations={max_iterations})"
    last = ""
    if turn.setup.on_limit == "generate":
        text_mode = turn.setup.protocol.text
        async with aclosing(_call_model(turn, tools=False)) as calls:
            async for event in calls:
                if isinstance(event, ModelResponse):
                    last = event.message.text
                    if text_mode:
                        last = parse_text_reply(last).final_answer or last
                        yield TextDelta(last)
                elif not text_mode:
                    yield event
    yield turn.result(last, "max_iterations", success=False, error=error)
