"""The native API: threads (conversa sessions), their messages, turns, undo, retry, search."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..events import AgentResult, ToolDone, ToolRunning, TurnDone
from ..messages import ChatMessage, ToolCall
from ..model import TextDelta
from ..storage.base import UNSET
from ._body import body_schema, read_model
from ._deps import CallerDep
from ._errors import ApiError
from ._streaming import EventStream, TurnRun, sse

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from ..events import TurnEvent
    from ..session import Session
    from ..storage import SessionInfo
    from ._service import Service

Limit = Annotated[int, Query(ge=0, le=1000)]
Offset = Annotated[int, Query(ge=0)]


class NewThread(BaseModel):
    """The body of POST /v1/threads."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    title: str | None = None
    metadata: dict[str, Any] | None = None


class ThreadChange(BaseModel):
    """The body of PATCH / PUT /v1/threads/{id}: the fields to change."""

    model_config = ConfigDict(extra="forbid")
    title: str | None = None
    status: Literal["active", "completed", "abandoned"] | None = None
    metadata: dict[str, Any] | None = None


class NewMessage(BaseModel):
    """The body of POST /v1/threads/{id}/messages: one user turn."""

    model_config = ConfigDict(extra="forbid")
    content: str | list[dict[str, Any]]
    max_iterations: int | None = Field(default=None, ge=1, le=1000)
    stream: bool = False


class RetryTurn(BaseModel):
    """The body of POST /v1/threads/{id}/retry (optional)."""

    model_config = ConfigDict(extra="forbid")
    max_iterations: int | None = Field(default=None, ge=1, le=1000)
    stream: bool = False


def summary(info: SessionInfo) -> dict[str, Any]:
    """A thread as the API shows it."""
    return {
        "id": info.session_id,
        "title": info.title,
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
        "message_count": info.message_count,
        "user_id": info.user_id,
        "status": info.status,
        "metadata": info.metadata,
        "usage": info.usage.to_dict(),
    }


def turn_object(result: AgentResult) -> dict[str, Any]:
    """A turn's result as the API shows it."""
    return {
        "result": result.result,
        "success": result.success,
        "stop_reason": result.stop_reason,
        "iterations": result.iterations,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "total_tokens": result.usage.total,
        },
        "error": result.error,
        "messages": [m.to_dict() for m in result.messages],
    }


def arguments_of(call: ToolCall) -> Any:
    """A call's arguments as JSON data when they parse, else the text the model sent."""
    try:
        return json.loads(call.arguments or "{}")
    except ValueError:
        return call.arguments


def tool_call_data(call: ToolCall) -> dict[str, Any]:
    """The ``tool_call`` event's data."""
    return {"id": call.id, "name": call.name, "arguments": arguments_of(call)}


def wants_stream(request: Request, flag: bool) -> bool:
    """Streamed when the body says so or the client accepts only an event stream."""
    return flag or "text/event-stream" in request.headers.get("accept", "")


def router(service: Service) -> APIRouter:
    """The /v1/threads and /v1/search endpoints."""
    api = APIRouter(tags=["threads"])
    limit_body = service.max_body

    @api.post("/v1/threads", status_code=201, openapi_extra=body_schema(NewThread))
    async def create_thread(request: Request, caller: CallerDep) -> JSONResponse:
        """Create a thread (an id is generated when absent)."""
        body = await read_model(request, NewThread, limit_body)
        thread_id = body.id if body.id is not None else uuid.uuid4().hex
        if await service.visible(thread_id, caller) is not None:
            raise ApiError(409, f"thread {thread_id!r} already exists; PATCH it to change it")
        info = await service.storage.update_info(
            thread_id,
            title=body.title if body.title is not None else UNSET,
            user_id=caller.user_id if caller.user_id is not None else UNSET,
            metadata=body.metadata if body.metadata is not None else UNSET,
        )
        return JSONResponse(summary(info), status_code=201)

    @api.get("/v1/threads")
    async def list_threads(
        caller: CallerDep,
        user_id: str | None = None,
        status: Literal["active", "completed", "abandoned"] | None = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        """Threads newest first, with the total that match."""
        if not caller.admin:
            if user_id is not None and user_id != caller.user_id:
                return {"threads": [], "total": 0}
            user_id = caller.user_id
        infos = await service.storage.find_sessions(user_id=user_id, status=status)
        return {
            "threads": [summary(i) for i in infos[offset : offset + limit]],
            "total": len(infos),
        }

    @api.get("/v1/threads/{thread_id}")
    async def get_thread(thread_id: str, caller: CallerDep) -> dict[str, Any]:
        """One thread's summary."""
        return summary(await service.existing(thread_id, caller))

    async def change(thread_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
        body = await read_model(request, ThreadChange, limit_body)
        await service.existing(thread_id, caller)
        given = body.model_fields_set
        info = await service.storage.update_info(
            thread_id,
            title=body.title if "title" in given else UNSET,
            status=body.status if "status" in given and body.status is not None else UNSET,
            metadata=(body.metadata or {}) if "metadata" in given else UNSET,
        )
        return summary(info)

    @api.patch("/v1/threads/{thread_id}", openapi_extra=body_schema(ThreadChange))
    async def patch_thread(thread_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
        """Change a thread's title, status or metadata."""
        return await change(thread_id, request, caller)

    @api.put("/v1/threads/{thread_id}", openapi_extra=body_schema(ThreadChange))
    async def put_thread(thread_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
        """The same as PATCH."""
        return await change(thread_id, request, caller)

    @api.delete("/v1/threads/{thread_id}", status_code=204)
    async def delete_thread(thread_id: str, caller: CallerDep) -> Response:
        """Delete a thread: its history, values and info (waits for a turn in progress)."""
        await service.existing(thread_id, caller)
        async with service.storage.lease(thread_id, wait=service.turn_wait):
            await service.storage.delete(thread_id)
        service.forget(thread_id)
        return Response(status_code=204)

    @api.get("/v1/threads/{thread_id}/messages")
    async def list_messages(
        thread_id: str, caller: CallerDep, limit: Limit = 100, offset: Offset = 0
    ) -> dict[str, Any]:
        """The stored messages, oldest first, in conversa's stored form (a page of them:
        only the page is read, however long the thread)."""
        info = await service.existing(thread_id, caller)
        page = await service.storage.read(thread_id, offset, limit)
        return {"messages": [m.to_dict() for m in page], "total": info.message_count}

    @api.post("/v1/threads/{thread_id}/messages", openapi_extra=body_schema(NewMessage))
    async def send(thread_id: str, request: Request, caller: CallerDep) -> Response:
        """Run one turn (creating the thread if needed); streamed as SSE on request."""
        body = await read_model(request, NewMessage, limit_body)
        message = ChatMessage.user(body.content)
        await service.admit(thread_id, caller)
        limit = body.max_iterations
        if wants_stream(request, body.stream):
            session = await service.session(thread_id)
            events = session.stream_message(message, max_iterations=limit)
            return await stream_turn(service, session, events)
        async with service.lent(thread_id) as session:
            # a client that goes away does not stop this turn: it is stored complete
            result = await service.finish(session.send_message(message, max_iterations=limit))
        return JSONResponse(turn_object(result))

    @api.post("/v1/threads/{thread_id}/undo")
    async def undo(thread_id: str, caller: CallerDep) -> dict[str, Any]:
        """Remove the last user message and everything after it."""
        await service.existing(thread_id, caller)
        async with service.lent(thread_id) as session:
            removed = await service.finish(session.undo())
        return {"removed": [m.to_dict() for m in removed]}

    @api.post("/v1/threads/{thread_id}/retry", openapi_extra=body_schema(RetryTurn))
    async def retry(thread_id: str, request: Request, caller: CallerDep) -> Response:
        """Answer the last user message again (streamed as SSE on request)."""
        has_body = request.headers.get("content-length", "0") != "0"
        chunked = "chunked" in request.headers.get("transfer-encoding", "")
        body = (
            await read_model(request, RetryTurn, limit_body) if has_body or chunked else RetryTurn()
        )
        await service.existing(thread_id, caller)
        limit = body.max_iterations
        if wants_stream(request, body.stream):
            session = await service.session(thread_id)
            return await stream_turn(service, session, session.stream_retry(max_iterations=limit))
        async with service.lent(thread_id) as session:
            result = await service.finish(session.retry(max_iterations=limit))
        return JSONResponse(turn_object(result))

    @api.get("/v1/search", tags=["search"])
    async def search(caller: CallerDep, q: str, limit: Limit = 50) -> dict[str, Any]:
        """Messages that match ``q``, in the threads the caller may see."""
        storage = service.storage
        hits = await storage.search(q, limit=limit if caller.admin else None)
        owners: dict[str, bool] = {}
        shown = []
        for hit in hits:
            if hit.session_id not in owners:
                info = await storage.get_info(hit.session_id)
                owners[hit.session_id] = info is not None and caller.sees(info.user_id)
            if owners[hit.session_id]:
                shown.append(
                    {
                        "thread_id": hit.session_id,
                        "position": hit.position,
                        "message": hit.message.to_dict(),
                    }
                )
            if len(shown) >= limit:
                break
        return {"hits": shown}

    return api


async def stream_turn(
    service: Service, session: Session, events: AsyncGenerator[TurnEvent, None]
) -> Response:
    """The turn as Server-Sent Events; an error before the first event is a plain error.

    The session goes back to the service once the turn has run to its end (not cancelled).
    """
    run = TurnRun(session, events, release=service.give_back)
    try:
        await run.first()
    except BaseException:
        await run.cancel()
        raise
    return EventStream(
        run,
        SseEvents(),
        media_type="text/event-stream",
        error=lambda message: sse("error", {"error": message}),
    )


class SseEvents:
    """Turn events as SSE; a call that was not run (denied) gets its tool_call before its result."""

    def __init__(self) -> None:
        self._announced: set[str] = set()

    async def __call__(self, event: TurnEvent | Exception) -> AsyncIterator[bytes]:
        """The SSE events one turn event becomes."""
        if isinstance(event, TextDelta):
            if event.text:
                yield sse("text_delta", {"text": event.text})
        elif isinstance(event, ToolRunning):
            self._announced.add(event.call.id)
            yield sse("tool_call", tool_call_data(event.call))
        elif isinstance(event, ToolDone):
            call = event.call
            if call.id not in self._announced:
                yield sse("tool_call", tool_call_data(call))
            result = {"id": call.id, "name": call.name, "output": event.output, "ok": event.ok}
            yield sse("tool_result", result)
        elif isinstance(event, TurnDone):
            yield sse("done", turn_object(event.result))
