"""The ReAct loop: one user turn of model calls and tool runs, native or via the text protocol.

A turn is one async generator, ``run_turn``: ``Session.send_message`` drains it for the result and
``Session.stream_message`` hands its events to the caller. Every message is appended to storage
the moment it exists, so a cancel, a crash or an error leaves a history that is valid input for
the next model call (the repair in ``context.repair`` fills anything still missing).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .context import INTERRUPTED_RESULT
from .errors import InvalidMessage, ModelError, ToolError, ToolsUnsupported
from .messages import ChatMessage, ToolCall
from .model import INVALID_CALLS_KEY, ModelResponse, TextDelta, ToolCallStarted, Usage

if TYPE_CHECKING:
    from .session import Session
    from .tools import Tool

log = logging.getLogger(__name__)

StopReason = Literal["final_answer", "max_iterations", "cancelled", "error"]
ReactMode = Literal["auto", "tools", "text"]
OnLimit = Literal["stop", "generate"]

OBSERVATION_PREFIX = "Observation: "
LIMIT_NOTE = (
    "You have reached the limit of tool use for this turn. Do not call tools; answer the user "
    "now as well as you can with what you have."
)


@dataclass(frozen=True, slots=True)
class Step:
    """One action of the loop: the model's thought, the tool it chose and what came back."""

    thought: str | None
    action: str | None
    action_input: dict[str, Any] | str | None
    observation: str | None


@dataclass(frozen=True, slots=True)
class AgentResult:
    """The outcome of one user turn."""

    result: str
    steps: list[Step]
    success: bool
    iterations: int
    usage: Usage
    stop_reason: StopReason
    error: str | None = None
    messages: list[ChatMessage] = field(default_factory=list)
    """The messages this turn stored, in order."""
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    """The ModelError that ended the turn, for a traceback (``error`` is its message)."""


@dataclass(frozen=True, slots=True)
class ToolRunning:
    """A tool is about to run with these arguments."""

    call: ToolCall


@dataclass(frozen=True, slots=True)
class ToolDone:
    """A tool finished; ``ok`` is False when its output is an error the model will see."""

    call: ToolCall
    output: str
    ok: bool


@dataclass(frozen=True, slots=True)
class TurnDone:
    """The turn is over; always the last event."""

    result: AgentResult


TurnEvent = TextDelta | ToolCallStarted | ToolRunning | ToolDone | TurnDone


@dataclass(slots=True)
class ModelRequest:
    """What goes to the model; request interceptors may change any of it."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    extra_system: list[str] = field(default_factory=list)
    """Lines appended to the system prompt for this call only."""


RequestInterceptor = Callable[
    [ModelRequest, "Session"], ModelRequest | Awaitable[ModelRequest | None] | None
]
ResponseInterceptor = Callable[
    [ModelResponse, "Session"], ModelResponse | Awaitable[ModelResponse | None] | None
]
Approver = Callable[[str, dict[str, Any]], bool | Awaitable[bool]]


async def maybe_await(value: Any) -> Any:
    """The value, awaited first if it is awaitable (callbacks may be sync or async)."""
    return await value if inspect.isawaitable(value) else value


# -- the text protocol ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextReply:
    """A parsed text-protocol reply: a final answer, an action, or what was wrong with it."""

    thought: str | None = None
    final_answer: str | None = None
    action: str | None = None
    action_input: dict[str, Any] | None = None
    problem: str | None = None


def parse_text_reply(text: str) -> TextReply:
    """Read a reply of the JSON text protocol; prose that is not JSON counts as an answer.

    Linear in the reply's length: a model's output is untrusted, and the turn runs on the loop.
    """
    fenced = _fenced_object(text)
    candidate = fenced if fenced is not None else text.strip()
    if not candidate.startswith("{"):
        # Models often wrap the JSON in a sentence: use an embedded object if there is one.
        start, end = candidate.find("{"), candidate.rfind("}")
        embedded = _json_object(candidate[start : end + 1]) if 0 <= start < end else None
        if embedded is None or not ({"action", "final_answer"} & embedded.keys()):
            return TextReply(final_answer=text.strip())
        candidate = candidate[start : end + 1]
    try:
        data = _json_value(candidate)
    except ValueError as exc:
        return TextReply(problem=f"your reply was not valid JSON ({exc})")
    if not isinstance(data, dict):
        return TextReply(problem="your reply must be one JSON object")
    thought = data.get("thought")
    thought = str(thought) if thought is not None else None
    if "final_answer" in data:
        answer = data["final_answer"]
        return TextReply(
            thought, final_answer=answer if isinstance(answer, str) else json.dumps(answer)
        )
    if "action" in data:
        action = data["action"]
        if not isinstance(action, str) or not action.strip():
            return TextReply(thought, problem='"action" must be the name of a tool')
        raw = data.get("action_input", {})
        if isinstance(raw, str):
            try:
                raw = _json_value(raw) if raw.strip() else {}
            except ValueError:
                return TextReply(thought, problem="action_input must be a JSON object")
        if not isinstance(raw, dict):
            return TextReply(thought, problem="action_input must be a JSON object")
        return TextReply(thought, action=action, action_input=raw)
    return TextReply(thought, problem='the JSON needs either "action" or "final_answer"')


_FENCE = "```"


def _fenced_object(text: str) -> str | None:
    r"""The object in the reply's first ``` (or ```json) fence that a later fence closes.

    What the regex ```(?:json)?\s*(\{.*\})\s*``` (DOTALL) finds: from the "{" of the first
    opening fence to the last "}" before a closing fence. That regex backtracks quadratically on
    replies full of fences; these scans move one way each, so every character is looked at a
    bounded number of times.
    """
    close = _last_closing_brace(text)
    if close < 0:
        return None
    start = 0
    while (fence := text.find(_FENCE, start, close)) >= 0:
        # only the first "{" after a fence can open it (or one of the fences in between)
        brace = text.find("{", fence + len(_FENCE), close)
        if brace < 0:
            return None
        if _opens_fence(text, brace):
            return text[brace : close + 1]
        start = brace + 1
    return None


def _last_closing_brace(text: str) -> int:
    """The index of the last "}" followed by only whitespace and a ``` fence, else -1."""
    end = len(text)
    while (fence := text.rfind(_FENCE, 0, end)) >= 0:
        # only the last "}" before a fence can close it (or one of the fences in between)
        brace = text.rfind("}", 0, fence)
        if brace < 0:
            return -1
        after = brace + 1
        while after < fence and text[after].isspace():
            after += 1
        if text.startswith(_FENCE, after):
            return brace
        end = brace
    return -1


def _opens_fence(text: str, brace: int) -> bool:
    """Whether only whitespace and an optional "json" lie between a ``` fence and this "{"."""
    before = brace
    while before > 0 and text[before - 1].isspace():
        before -= 1
    if text.endswith(_FENCE, 0, before):
        return True
    return text.endswith("json", 0, before) and text.endswith(_FENCE, 0, before - 4)


def _json_value(text: str) -> Any:
    """json.loads; ValueError for nesting too deep to decode as well as for invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("it is nested too deeply") from exc


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = _json_value(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- running tools -------------------------------------------------------------------------


async def _execute(
    session: Session, tool: Tool | None, call: ToolCall, problem: str | None = None
) -> tuple[str, bool]:
    """Run one approved call; every failure (or the call's own ``problem``) is an observation."""
    if tool is None:
        names = ", ".join(session.tools.names()) or "none"
        problem = problem or f"there is no tool named {call.name!r}"
        return f"Error: {problem}. Available tools: {names}.", False
    try:
        arguments = _json_value(call.arguments or "{}")
    except ValueError as exc:
        return f"Error: the arguments for {call.name} are not valid JSON ({exc}).", False
    if not isinstance(arguments, dict):
        return f"Error: the arguments for {call.name} must be a JSON object.", False
    try:
        return await tool.run(arguments, session=session), True
    except ToolError as exc:
        return f"Error: {exc}", False
    except Exception as exc:
        return f"Error: {call.name} failed: {type(exc).__name__}: {exc}", False


async def _approved(session: Session, tool: Tool | None, call: ToolCall) -> bool:
    if tool is None or not tool.requires_approval:
        return True
    if session.approve is None:
        return False
    try:
        arguments = _json_value(call.arguments or "{}")
    except ValueError:
        arguments = {"_raw": call.arguments}
    try:
        return bool(await maybe_await(session.approve(call.name, arguments)))
    except Exception:
        log.warning("the approve callback failed for %s; treating it as denied", call.name)
        return False


def _denied(call: ToolCall) -> str:
    return (
        f"The user did not approve running {call.name}. Do not call it again for this request; "
        "continue without it or ask the user."
    )


# -- the loop ------------------------------------------------------------------------------


class _Turn:
    """The mutable bookkeeping of one turn."""

    def __init__(self, session: Session, max_iterations: int, stream: bool, on_limit: OnLimit):
        self.session = session
        self.max_iterations = max_iterations
        self.stream = stream
        self.on_limit = on_limit
        self.iterations = 0
        self.usage = Usage()
        self.steps: list[Step] = []
        self._start = session.message_count()

    @property
    def stored(self) -> list[ChatMessage]:
        """The messages stored since the turn began (the session's cache holds them)."""
        return self.session._history.messages[self._start :]

    async def store(self, *messages: ChatMessage) -> None:
        await self.session._append(messages)

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
            )
        )


async def run_turn(
    session: Session,
    user_message: ChatMessage | None,
    *,
    max_iterations: int,
    stream: bool,
    on_limit: OnLimit = "stop",
) -> AsyncGenerator[TurnEvent, None]:
    """Run one turn: store the user message (unless retrying), then call model and tools."""
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    turn = _Turn(session, max_iterations, stream, on_limit)
    if user_message is not None:
        await turn.store(user_message)
    try:
        while turn.iterations < max_iterations:
            text_mode = session._protocol == "text"
            try:
                response = None
                async with aclosing(_call_model(turn, tools=True)) as calls:
                    async for event in calls:
                        if isinstance(event, ModelResponse):
                            response = event
                        elif not text_mode:
                            yield event
            except ToolsUnsupported:
                if session.react_mode != "auto":
                    raise
                session._protocol = "text"  # this endpoint takes no `tools`: fall back for good
                turn.iterations -= 1
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
        if not session._cancel_requested:
            raise
        # Session.cancel() asked for this: end the turn with a result instead of an error.
        session._cancel_requested = False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        last = turn.stored[-1] if turn.stored else None
        partial = last.text if last is not None and last.role == "assistant" else ""
        yield turn.result(partial, "cancelled", success=False, error="the turn was cancelled")


async def _call_model(turn: _Turn, *, tools: bool) -> AsyncGenerator[Any, None]:
    """One model call (one iteration): build the prompt, call, store the assistant message."""
    session = turn.session
    turn.iterations += 1
    request = await session._build_request(with_tools=tools, limit_note=not tools)
    partial: list[str] = []
    model = session.model
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
    for interceptor in session.response_interceptors:
        changed = await maybe_await(interceptor(response, session))
        response = changed if changed is not None else response
    turn.usage = turn.usage + response.usage
    await turn.store(response.message)
    yield response


async def _run_tool_calls(turn: _Turn, message: ChatMessage) -> AsyncGenerator[TurnEvent, None]:
    """Run every call of one assistant message, concurrently, and store results in order."""
    session = turn.session
    calls = message.tool_calls
    thought = message.text or None
    # calls the model got wrong (no name, ...) run nothing and are answered with the problem
    invalid = message.metadata.get(INVALID_CALLS_KEY)
    if not isinstance(invalid, dict):
        invalid = {}
    tools = [None if c.id in invalid else session.tools.get(c.name) for c in calls]
    tasks: list[asyncio.Task[tuple[str, bool]] | None] = []
    try:
        # Approvals are asked one at a time, in order, before anything runs.
        approvals = [await _approved(session, t, c) for t, c in zip(tools, calls, strict=True)]
        for tool, call, ok in zip(tools, calls, approvals, strict=True):
            if ok:
                yield ToolRunning(call)
                problem = invalid.get(call.id)
                tasks.append(asyncio.create_task(_execute(session, tool, call, problem)))
            else:
                tasks.append(None)
        for call, task in zip(calls, tasks, strict=True):
            output, ok = (await task) if task is not None else (_denied(call), False)
            result = ChatMessage.tool(call.id, output, metadata={"tool": call.name, "ok": ok})
            await turn.store(result)
            turn.steps.append(Step(thought, call.name, _arguments(call), output))
            yield ToolDone(call, output, ok)
    except BaseException:
        # Cancelled, closed or failed half-way: stop what still runs and answer every call
        # that has no stored result yet, so the history stays valid model input.
        for task in tasks:
            if task is not None:
                task.cancel()
        await session._answer_dangling_calls()
        raise


def _arguments(call: ToolCall) -> dict[str, Any] | str:
    try:
        value = _json_value(call.arguments or "{}")
    except ValueError:
        return call.arguments
    return value if isinstance(value, dict) else call.arguments


async def _text_step(turn: _Turn, message: ChatMessage) -> AsyncGenerator[TurnEvent, None]:
    """Act on one text-protocol reply: answer, run its action, or explain what was wrong."""
    session = turn.session
    reply = parse_text_reply(message.text)
    if reply.final_answer is not None:
        yield TextDelta(reply.final_answer)
        if reply.thought is not None:
            turn.steps.append(Step(reply.thought, None, None, None))
        yield turn.result(reply.final_answer, "final_answer", success=True)
        return
    if reply.action is not None:
        call = ToolCall(f"text_{turn.iterations}", reply.action, json.dumps(reply.action_input))
        tool = session.tools.get(reply.action)
        try:
            if await _approved(session, tool, call):
                yield ToolRunning(call)
                output, ok = await _execute(session, tool, call)
            else:
                output, ok = _denied(call), False
        except BaseException:
            # the action never finished: say so, as the native protocol's repair does
            meta = {"observation": True, "tool": reply.action, "interrupted": True}
            await turn.store(
                ChatMessage.user(OBSERVATION_PREFIX + INTERRUPTED_RESULT, metadata=meta)
            )
            raise
        turn.steps.append(Step(reply.thought, reply.action, reply.action_input, output))
        yield ToolDone(call, output, ok)
    else:
        output = f"Error: {reply.problem}. Reply with one JSON object as described."
        turn.steps.append(Step(reply.thought, None, None, output))
    meta = {"observation": True, **({"tool": reply.action} if reply.action else {})}
    await turn.store(ChatMessage.user(OBSERVATION_PREFIX + output, metadata=meta))


async def _limit_reached(turn: _Turn) -> AsyncGenerator[TurnEvent, None]:
    """End a turn that used all its iterations, optionally with one last answer without tools."""
    error = f"stopped after {turn.iterations} model calls (max_iterations={turn.max_iterations})"
    last = ""
    if turn.on_limit == "generate":
        text_mode = turn.session._protocol == "text"
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
