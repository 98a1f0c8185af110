"""DCAF's HelpDesk chat protocol: POST /api/chat and /api/chat-stream (NDJSON).

Stateless, as in DCAF: every request carries the conversation, its last message is the new
user turn, and ``data.session`` of the latest message that has one is the session state the
tools and interceptors see; the answer carries the updated state back. Nothing is stored.

A tool that needs approval is not run: the turn stops before its next model call and the
call comes back in ``data.tool_calls`` with ``"execute": false``. The client sends the calls
back on its next user message, with ``"execute": true`` to run them (they appear in
``data.executed_tool_calls`` and the loop goes on) or with a ``"rejection_reason"``, which the
model is told.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ToolError
from ..events import AgentResult, ModelRequest, ToolDone, TurnDone, maybe_await
from ..messages import ChatMessage, ToolCall
from ..model import TextDelta
from ..session import Session
from ..state import is_internal
from ..storage import InMemoryStorage
from ._body import body_schema, read_model
from ._deps import CallerDep
from ._errors import ApiError
from ._streaming import EventStream, TurnRun, ndjson

if TYPE_CHECKING:
    from ..events import TurnEvent
    from ..tools import Tool
    from ._service import Service

SESSION_ID = "dcaf"
APPROVAL_REQUIRED = "approval_required"


class DcafData(BaseModel):
    """A message's ``data``: the session, and tool calls to approve or reject."""

    model_config = ConfigDict(extra="allow")
    session: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class DcafMessage(BaseModel):
    """One message of the conversation the client sends."""

    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: str | None = ""
    data: DcafData | None = None


class DcafRequest(BaseModel):
    """The body of /api/chat and /api/chat-stream."""

    model_config = ConfigDict(extra="allow")
    messages: list[DcafMessage] = Field(min_length=1, max_length=10_000)


class _Call(BaseModel):
    """A tool call the client sends back, approved or rejected."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any] = Field(default_factory=dict)
    execute: bool = False
    rejection_reason: str | None = None


class DcafTurn:
    """One request's turn: the session it runs in and what it collects for the answer."""

    def __init__(self, service: Service, body: DcafRequest) -> None:
        self.service = service
        self.body = body
        self.pending: list[dict[str, Any]] = []
        self.executed: list[dict[str, Any]] = []
        self._asked: deque[str] = deque()  # tools sent to the client, in the order asked
        self.session: Session | None = None
        self._prelude: list[dict[str, Any]] = []  # streamed first: the approved calls' results

    # -- setting up ---------------------------------------------------------------------

    async def start(self) -> AsyncGenerator[TurnEvent, None]:
        """Build the session from the request, run the approved calls; the turn's events."""
        messages = self.body.messages
        last = messages[-1]
        if last.role != "user":
            raise ApiError(400, "the last message must be the user's new message")
        state = next(
            (m.data.session for m in reversed(messages) if m.data and m.data.session is not None),
            {},
        )
        if any(is_internal(k) for k in state):
            raise ApiError(400, 'data.session keys must not start with "__"')
        storage = InMemoryStorage()
        service = self.service
        session = Session(
            SESSION_ID,
            storage,
            model=await service.chat_model(),
            tools=service.tools,
            system_prompt=service.system_prompt,
            max_iterations=service.max_iterations,
            approve=self._approve,
            request_interceptors=[self._stop_for_approval],
            turn_wait=None,
        )
        self.session = session
        await session.state.update(state)
        history = [
            ChatMessage.user(m.content) if m.role == "user" else ChatMessage.assistant(m.content)
            for m in messages[:-1]
            if m.content
        ]
        answers = self._answers(last)
        if not answers:
            if not last.content:
                raise ApiError(400, "the last message needs content (or tool calls to answer)")
            await storage.append(SESSION_ID, history)
            return session.stream_message(last.content)
        if last.content:
            history.append(ChatMessage.user(last.content))
        calls = [ToolCall(c.id, c.name, json.dumps(c.input)) for c in answers]
        history.append(ChatMessage.assistant("", calls))
        await storage.append(SESSION_ID, history)
        results = [await self._answer(session, c) for c in answers]
        await storage.append(SESSION_ID, results)
        return session.stream_resume()

    def _answers(self, last: DcafMessage) -> list[_Call]:
        """The calls the client sent back, checked."""
        from pydantic import ValidationError

        raw = last.data.tool_calls if last.data else []
        try:
            calls = [_Call.model_validate(c) for c in raw]
        except ValidationError as exc:
            raise ApiError(400, "data.tool_calls: each needs an id, a name and an input") from exc
        if len({c.id for c in calls}) != len(calls):
            raise ApiError(400, "data.tool_calls: the ids must differ")
        return calls

    async def _answer(self, session: Session, call: _Call) -> ChatMessage:
        """Run an approved call or tell the model it was rejected: the tool message."""
        meta: dict[str, Any] = {"tool": call.name}
        if not call.execute or call.rejection_reason is not None:
            reason = call.rejection_reason or "not approved"
            output = (
                f"The user rejected running {call.name}: {reason}. Do not call it again for "
                "this request; continue without it or ask the user."
            )
            return ChatMessage.tool(call.id, output, metadata={**meta, "ok": False})
        tool = session.tools.get(call.name)
        ok = False
        if tool is None:
            output = f"Error: there is no tool named {call.name!r}."
        else:
            try:
                output, ok = await tool.run(call.input, session=session), True
            except ToolError as exc:
                output = f"Error: {exc}"
            except Exception as exc:
                output = f"Error: {call.name} failed: {type(exc).__name__}: {exc}"
        self.executed.append(
            {"id": call.id, "name": call.name, "input": call.input, "output": output}
        )
        return ChatMessage.tool(call.id, output, metadata={**meta, "ok": ok})

    # -- during the turn ----------------------------------------------------------------

    async def _approve(self, name: str, arguments: dict[str, Any]) -> bool:
        policy = self.service.approve
        if policy is not None and await maybe_await(policy(name, arguments)):
            return True
        self._asked.append(name)  # the client decides: the call comes back in tool_calls
        return False

    async def _stop_for_approval(self, request: ModelRequest, session: Session) -> None:
        """Before the next model call: stop the turn if the client has calls to approve."""
        # _asked is filled by the approver in the turn's task; pending may be filled later,
        # by a stream's consumer
        if (self._asked or self.pending) and session.cancel():
            await asyncio.sleep(0)  # the cancel lands here; the turn ends as cancelled

    def observe(self, event: TurnEvent) -> list[dict[str, Any]]:
        """The NDJSON objects (if any) one event of the turn becomes."""
        if isinstance(event, TextDelta):
            return [{"type": "text_delta", "text": event.text}] if event.text else []
        if isinstance(event, ToolDone):
            call = event.call
            if self._asked and not event.ok and self._asked[0] == call.name:
                self._asked.popleft()
                self.pending.append(self._approval(call))
                return []
            done = {
                "id": call.id,
                "name": call.name,
                "input": _input(call),
                "output": event.output,
            }
            self.executed.append(done)
            return [{"type": "executed_tool_calls", "executed_tool_calls": [done]}]
        return []

    def _approval(self, call: ToolCall) -> dict[str, Any]:
        assert self.session is not None
        tool: Tool | None = self.session.tools.get(call.name)
        return {
            "id": call.id,
            "name": call.name,
            "input": _input(call),
            "execute": False,
            "tool_description": tool.description if tool is not None else "",
            "input_description": tool.parameters.get("properties", {}) if tool else {},
        }

    # -- the answer ---------------------------------------------------------------------

    def stop_reason(self, result: AgentResult) -> str:
        """The turn's stop reason; waiting for the client's approval is its own."""
        return APPROVAL_REQUIRED if self.pending else result.stop_reason

    def meta_data(self, result: AgentResult) -> dict[str, Any]:
        """What the answer's ``meta_data`` says about the turn."""
        return {
            "stop_reason": self.stop_reason(result),
            "success": result.success or bool(self.pending),
            "iterations": result.iterations,
            "usage": {
                "prompt_tokens": result.usage.prompt_tokens,
                "completion_tokens": result.usage.completion_tokens,
            },
            "error": None if self.pending else result.error,
        }

    def content(self, result: AgentResult) -> str:
        """The answer's text (the model's words with the calls, when it waits for approval)."""
        if result.result or not self.pending:
            return result.result
        said = [m.text for m in result.messages if m.role == "assistant" and m.text]
        return said[-1] if said else ""

    def state(self) -> dict[str, Any]:
        """The session state to send back."""
        assert self.session is not None
        return self.session.state.to_dict()

    def answer(self, result: AgentResult) -> dict[str, Any]:
        """The whole answer of /api/chat."""
        return {
            "role": "assistant",
            "content": self.content(result),
            "data": {
                "session": self.state(),
                "tool_calls": self.pending,
                "executed_tool_calls": self.executed,
                "cmds": [],
                "executed_cmds": [],
            },
            "meta_data": self.meta_data(result),
        }

    async def ndjson(self, event: TurnEvent | Exception) -> AsyncIterator[bytes]:
        """The NDJSON lines of one event (the approved calls' results come first)."""
        if self._prelude:
            yield ndjson({"type": "executed_tool_calls", "executed_tool_calls": self._prelude})
            self._prelude = []
        if isinstance(event, TurnDone):
            result = event.result
            if self.pending:
                yield ndjson({"type": "tool_calls", "tool_calls": self.pending})
            yield ndjson(
                {
                    "type": "done",
                    "stop_reason": self.stop_reason(result),
                    "meta_data": self.meta_data(result),
                    "session": self.state(),
                }
            )
        elif not isinstance(event, Exception):
            for line in self.observe(event):
                yield ndjson(line)


def _input(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments or "{}")
    except ValueError:
        return call.arguments


def router(service: Service) -> APIRouter:
    """The /api/chat and /api/chat-stream endpoints."""
    api = APIRouter(tags=["DCAF HelpDesk"])

    @api.post("/api/chat", openapi_extra=body_schema(DcafRequest))
    async def chat(request: Request, caller: CallerDep) -> JSONResponse:
        """One turn; the answer is an assistant message with the updated session."""
        body = await read_model(request, DcafRequest, service.max_body)
        turn = DcafTurn(service, body)
        events = await turn.start()
        result = None
        async with aclosing(events) as stream:
            async for event in stream:
                turn.observe(event)
                if isinstance(event, TurnDone):
                    result = event.result
        assert result is not None
        return JSONResponse(turn.answer(result))

    @api.post("/api/chat-stream", openapi_extra=body_schema(DcafRequest))
    async def chat_stream(request: Request, caller: CallerDep) -> Response:
        """The same turn as NDJSON, one object per line."""
        body = await read_model(request, DcafRequest, service.max_body)
        turn = DcafTurn(service, body)
        events = await turn.start()
        turn._prelude = list(turn.executed)
        assert turn.session is not None
        run = TurnRun(turn.session, events)
        return EventStream(
            run,
            turn.ndjson,
            media_type="application/x-ndjson",
            error=lambda message: ndjson({"type": "error", "error": message}),
        )

    return api
