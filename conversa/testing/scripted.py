"""ScriptedModel: an in-process ChatModel that answers from a script, for fast agent tests.

    model = ScriptedModel([tool_call("add", {"a": 1, "b": 2}), "The sum is 3."])
    session = await create_session("t", "memory://", model=model, tools=[add])
    ...
    messages, tools = model.requests[1]      # what the agent sent on the second call

Replies use the same vocabulary as FakeOpenAIServer (conversa.testing.replies), plus exceptions
(instances or classes) to raise. HTTP faults raise the ModelError that OpenAIChatModel raises.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, NamedTuple

from ..errors import ModelError, ToolsUnsupported
from ..model import ModelResponse, StreamEvent, TextDelta, ToolCallStarted, Usage, build_response
from .replies import Reply, ReplyLike, Responder, echo, split_text, to_reply

ScriptEntry = ReplyLike | BaseException | type[BaseException]


class ScriptedRequest(NamedTuple):
    """What one model call received: the wire-form messages and tools (shallow copies)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None


class ScriptedModel:
    """A ChatModel answering each call with the next scripted reply, then `default_reply`."""

    def __init__(
        self,
        replies: Iterable[ScriptEntry] = (),
        *,
        name: str = "scripted-model",
        default_reply: Responder | None = echo,
    ) -> None:
        self.name = name
        self.description = f"{name} (scripted)"
        self.default_reply = default_reply
        self.requests: list[ScriptedRequest] = []
        self._script: deque[ScriptEntry] = deque(replies)

    def add_reply(self, *replies: ScriptEntry) -> None:
        """Queue replies for the next calls, in order."""
        self._script.extend(replies)

    @property
    def pending(self) -> int:
        """How many scripted replies are still queued."""
        return len(self._script)

    async def complete(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> ModelResponse:
        """The next scripted reply as a ModelResponse (or its exception raised)."""
        started = time.monotonic()
        reply = await self._next(messages, tools)
        if reply.fault is not None and reply.fault.drop_after_chunks is not None:
            raise ModelError(f"{self.name}: the scripted connection dropped mid-answer")
        return self._response(reply, messages, started)

    async def stream(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamEvent]:
        """The next scripted reply as a few text deltas and tool-call events, then the response."""
        started = time.monotonic()
        reply = await self._next(messages, tools)
        drop_after = reply.fault.drop_after_chunks if reply.fault is not None else None
        for i, piece in enumerate(split_text(reply.text or "")):
            if drop_after is not None and i >= drop_after:
                break
            await asyncio.sleep(0)  # let other tasks run between deltas, as a network would
            yield TextDelta(piece)
        if drop_after is not None:
            raise ModelError(f"{self.name}: the scripted connection dropped mid-answer")
        for index, call in enumerate(reply.tool_calls):
            yield ToolCallStarted(index=index, id=call.id, name=call.name)
        yield self._response(reply, messages, started)

    async def _next(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
    ) -> Reply:
        # Shallow copies: conversa never changes a message dict after sending it, and a deep
        # copy would make every call cost as much as the whole history.
        request = ScriptedRequest(list(messages), list(tools) if tools else None)
        self.requests.append(request)
        if self._script:
            entry = self._script.popleft()
        elif self.default_reply is not None:
            body: dict[str, Any] = {"model": self.name, "messages": request.messages}
            if request.tools:
                body["tools"] = request.tools
            entry = self.default_reply(body)
        else:
            raise ModelError(
                f"{self.name} has no scripted reply left for call {len(self.requests)}; "
                "add more replies (ScriptedModel([...]) or .add_reply)"
            )
        if isinstance(entry, BaseException) or (
            isinstance(entry, type) and issubclass(entry, BaseException)
        ):
            raise entry
        reply = to_reply(entry)
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        if reply.is_error:
            raise self._fault_error(reply, tools)
        return reply

    def _fault_error(self, reply: Reply, tools: Sequence[dict[str, Any]] | None) -> ModelError:
        fault = reply.fault
        assert fault is not None
        said = fault.raw_body or fault.message.replace("{model}", self.name)
        if fault.status == 400 and fault.param == "tools" and tools:
            return ToolsUnsupported(f"{self.name} does not accept the `tools` parameter ({said})")
        return ModelError(f"{self.name}: scripted HTTP {fault.status}: {said}")

    def _response(
        self, reply: Reply, messages: Sequence[dict[str, Any]], started: float
    ) -> ModelResponse:
        if reply.fault is not None and reply.fault.raw_body is not None:
            raise ModelError(f"{self.name}: the scripted answer is invalid JSON")
        # A rough count that costs the same for any history length: a fake needs no more.
        last = str(messages[-1].get("content") or "") if messages else ""
        prompt = 10 * len(messages) + len(last.split())
        completion = len((reply.text or "").split()) + 3 * len(reply.tool_calls)
        return build_response(
            text=reply.text,
            tool_calls=reply.tool_calls,
            model=self.name,
            usage=Usage(prompt, completion),
            finish_reason=reply.resolved_finish_reason,
            started=started,
        )
