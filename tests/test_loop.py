"""The ReAct loop on its own: run_turn over a Transcript and a TurnSetup, without a Session."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import pytest

import conversa._tool_calls
import conversa.session
import conversa.text_protocol
from conversa import (
    AgentResult,
    ChatMessage,
    InMemoryStorage,
    ModelRequest,
    ModelResponse,
    Session,
    ToolCall,
    ToolsUnsupported,
    TurnDone,
    TurnEvent,
    tool,
)
from conversa._prompt_history import INTERRUPTED_RESULT
from conversa.agent import CancelFlag, ModelSource, ToolProtocol, TurnSetup, run_turn
from conversa.context import PromptOptions
from conversa.testing.replies import tool_call
from conversa.testing.scripted import ScriptedModel
from conversa.testing.validation import validate_chat_request
from conversa.tools import ToolRegistry
from conversa.transcript import Transcript


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool(requires_approval=True)
def guarded(path: str) -> str:
    """A tool that needs the user's approval."""
    return f"done {path}"


@tool
def whose(session: Any = None) -> str:
    """Name what the loop handed over as the session."""
    return f"context={session!r}"


def valid(messages: list[ChatMessage]) -> bool:
    """Whether the strict API would accept these messages as a prompt."""
    request = {"model": "m", "messages": [m.to_openai() for m in messages]}
    return validate_chat_request(request) is None


def source(model: ScriptedModel) -> ModelSource:
    async def get() -> ScriptedModel:
        return model

    return get


async def new_transcript(session_id: str = "loop") -> Transcript:
    storage = InMemoryStorage()
    await storage.append(session_id, [])
    return Transcript(storage, session_id)


def setup(model: ScriptedModel, **kw: Any) -> TurnSetup:
    kw.setdefault("tools", ToolRegistry([add, guarded, whose]))
    return TurnSetup(model=source(model), **kw)


async def drain(events: AsyncGenerator[TurnEvent, None]) -> AgentResult:
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, TurnDone):
                return event.result
    raise AssertionError("no TurnDone")


async def turn(
    transcript: Transcript, text: str, turn_setup: TurnSetup, *, stream: bool = False
) -> AgentResult:
    return await drain(run_turn(transcript, ChatMessage.user(text), turn_setup, stream=stream))


@pytest.mark.parametrize("stream", [False, True])
async def test_a_turn_with_a_tool_call_runs_without_a_session(stream: bool) -> None:
    transcript = await new_transcript()
    model = ScriptedModel([tool_call("add", {"a": 2, "b": 3}), "It is 5."])
    result = await turn(transcript, "2+3?", setup(model), stream=stream)
    assert result.success and result.result == "It is 5." and result.iterations == 2
    assert [s.observation for s in result.steps] == ["5"]
    stored = await transcript.storage.load("loop")
    assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert [m.id for m in stored] == [m.id for m in transcript.messages]
    assert result.messages == stored
    assert valid(stored)
    assert model.requests[1].messages[-1]["content"] == "5"


async def test_tools_and_interceptors_get_the_context_object_as_is() -> None:
    transcript = await new_transcript()
    seen: list[Any] = []

    def on_request(request: ModelRequest, context: Any) -> None:
        seen.append(("request", context))

    def on_response(response: ModelResponse, context: Any) -> None:
        seen.append(("response", context))

    model = ScriptedModel([tool_call("whose", {}), "ok"])
    marker = object()
    turn_setup = setup(
        model,
        context=marker,
        prompt=PromptOptions(request_interceptors=[on_request]),
        response_interceptors=[on_response],
    )
    result = await turn(transcript, "who?", turn_setup)
    assert result.steps[0].observation == f"context={marker!r}"
    assert seen == [("request", marker), ("response", marker)] * 2


async def test_the_prompt_options_shape_the_request() -> None:
    transcript = await new_transcript()
    model = ScriptedModel(["hi"])
    part = {"type": "text", "text": "attached"}
    options = PromptOptions(system_prompt="Be brief.", user_parts=lambda: [part])
    await turn(transcript, "hello", setup(model, prompt=options))
    messages = model.requests[0].messages
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == [{"type": "text", "text": "hello"}, part]
    assert transcript.messages[0].content == "hello"  # the stored message is unchanged


async def test_text_protocol_through_the_protocol_object() -> None:
    transcript = await new_transcript()
    model = ScriptedModel(
        ['{"action": "add", "action_input": {"a": 1, "b": 1}}', '{"final_answer": "2"}']
    )
    result = await turn(transcript, "1+1?", setup(model, protocol=ToolProtocol(text=True)))
    assert result.success and result.result == "2" and result.iterations == 2
    observation = transcript.messages[2]
    assert observation.role == "user" and observation.text == "Observation: 2"
    assert observation.metadata == {"observation": True, "tool": "add"}
    assert model.requests[0].tools is None


async def test_the_fallback_to_text_is_kept_in_the_protocol_object() -> None:
    transcript = await new_transcript()
    protocol = ToolProtocol()
    model = ScriptedModel([ToolsUnsupported("no tools"), '{"final_answer": "a"}', "b"])
    first = await turn(transcript, "one", setup(model, protocol=protocol))
    assert first.result == "a" and first.iterations == 1  # the refused call is no iteration
    assert protocol.text
    second = await turn(transcript, "two", setup(model, protocol=protocol))
    assert second.result == "b" and model.requests[2].tools is None


async def test_a_model_that_refuses_tools_even_in_text_mode_ends_the_turn() -> None:
    transcript = await new_transcript()
    model = ScriptedModel([ToolsUnsupported("no"), ToolsUnsupported("still no"), "never read"])
    result = await turn(transcript, "q", setup(model))
    assert result.stop_reason == "error" and "still no" in (result.error or "")
    assert model.pending == 1  # it did not go round again


async def test_a_failed_model_call_is_not_counted_as_an_iteration() -> None:
    transcript = await new_transcript()
    model = ScriptedModel([conversa.ModelError("down")])
    result = await turn(transcript, "q", setup(model))
    assert result.stop_reason == "error" and result.iterations == 0


async def test_a_tool_calls_arguments_are_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    original = conversa.text_protocol.json_value

    def counting(text: str) -> Any:
        parsed.append(text)
        return original(text)

    monkeypatch.setattr(conversa._tool_calls, "json_value", counting)
    transcript = await new_transcript()
    model = ScriptedModel([tool_call("guarded", {"path": "/x"}), "ok"])
    asked: list[dict[str, Any]] = []

    def approve(name: str, arguments: dict[str, Any]) -> bool:
        asked.append(arguments)
        return True

    result = await turn(transcript, "go", setup(model, approve=approve))
    assert result.steps[0].observation == "done /x"
    assert result.steps[0].action_input == {"path": "/x"}
    assert asked == [{"path": "/x"}]
    assert parsed == ['{"path": "/x"}']


async def test_a_call_that_cannot_run_is_answered_without_asking_for_approval() -> None:
    transcript = await new_transcript()
    model = ScriptedModel([[ToolCall("c1", "guarded", "{not json")], "ok"])
    asked: list[str] = []

    def approve(name: str, arguments: dict[str, Any]) -> bool:
        asked.append(name)
        return True

    result = await turn(transcript, "go", setup(model, approve=approve))
    assert asked == []
    assert "not valid JSON" in (result.steps[0].observation or "")
    assert result.steps[0].action_input == "{not json"


def hanging() -> tuple[asyncio.Event, Any]:
    started = asyncio.Event()

    @tool
    async def hang() -> str:
        """Never finishes."""
        started.set()
        await asyncio.Event().wait()
        return "unreachable"

    return started, hang


@pytest.mark.parametrize("asked", [True, False])
async def test_a_cancel_ends_the_turn_with_a_result_only_if_the_flag_asked(asked: bool) -> None:
    transcript = await new_transcript()
    started, hang = hanging()
    cancel = CancelFlag()
    model = ScriptedModel([tool_call("hang", {})])
    turn_setup = setup(model, tools=ToolRegistry([hang]), cancel=cancel)
    task = asyncio.create_task(turn(transcript, "wait", turn_setup))
    await asyncio.wait_for(started.wait(), 10)
    cancel.requested = asked
    task.cancel()
    if asked:
        result = await asyncio.wait_for(task, 10)
        assert result.stop_reason == "cancelled" and not cancel.requested
    else:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    stored = await transcript.storage.load("loop")
    assert stored[-1].role == "tool" and stored[-1].text == INTERRUPTED_RESULT
    assert valid(stored)


# -- the model is resolved off the event loop ------------------------------------------


async def test_session_resolves_its_model_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    scripted = ScriptedModel(["hello"])

    def resolve(spec: Any) -> ScriptedModel:
        threads.append(threading.get_ident())  # a blocking probe here must not stall the loop
        assert spec == "some-model"
        return scripted

    monkeypatch.setattr(conversa.session, "resolve_model", resolve)
    session = Session("s", InMemoryStorage(), model="some-model")
    result = await session.send_message("hi")
    assert result.result == "hello"
    await session.send_message("again")
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert session.model is scripted


def test_the_model_property_resolves_for_sync_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = ScriptedModel()
    monkeypatch.setattr(conversa.session, "resolve_model", lambda spec: scripted)
    assert Session("s", InMemoryStorage(), model="x").model is scripted
