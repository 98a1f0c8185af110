"""Session and the ReAct loop in process, with ScriptedModel (the HTTP tests are elsewhere)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from conversa import (
    ChatMessage,
    ConversaError,
    InMemoryStorage,
    ModelError,
    ModelRequest,
    ModelResponse,
    Session,
    SessionState,
    StorageError,
    TextDelta,
    Tool,
    ToolCall,
    ToolDone,
    ToolRunning,
    ToolsUnsupported,
    TurnDone,
    UsageTotals,
    create_session,
    create_session_sync,
    tool,
)
from conversa._prompt_history import INTERRUPTED_RESULT
from conversa.testing.replies import slow, text, tool_call, tool_calls
from conversa.testing.scripted import ScriptedModel


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(f"kaboom: {reason}")


@tool(requires_approval=True)
def delete_everything(path: str) -> str:
    """A dangerous tool."""
    return f"deleted {path}"


def hanging_tool() -> tuple[Tool, asyncio.Event]:
    """A tool called ``hang`` that never returns, and the event it sets once it runs."""
    started = asyncio.Event()

    @tool
    async def hang() -> str:
        """Never returns."""
        started.set()
        await asyncio.sleep(3600)  # until cancelled
        return "never"

    return hang, started


async def new(model: ScriptedModel, **kw: Any) -> Session:
    kw.setdefault("tools", [add, explode, delete_everything])
    return await create_session("s", InMemoryStorage(), model=model, **kw)


def roles(session: Session) -> list[str]:
    return [m.role for m in session.history]


# -- basic turns ---------------------------------------------------------------------------


async def test_create_session_creates_then_loads() -> None:
    store = InMemoryStorage()
    first = await create_session("alice", store, model=ScriptedModel(["hi"]))
    assert await store.exists("alice")
    assert first.message_count() == 0
    await first.send_message("hello")
    again = await create_session("alice", store, model=ScriptedModel())
    assert [m.text for m in again.history] == ["hello", "hi"]
    assert again.message_count() == 2


async def test_native_tool_call_then_answer() -> None:
    model = ScriptedModel([tool_call("add", {"a": 2, "b": 3}, text="let me add"), text("It is 5.")])
    session = await new(model, system_prompt="You add.")
    result = await session.send_message("2+3?")
    assert result.success and result.stop_reason == "final_answer"
    assert result.result == "It is 5."
    assert result.iterations == 2
    assert [(s.thought, s.action, s.action_input, s.observation) for s in result.steps] == [
        ("let me add", "add", {"a": 2, "b": 3}, "5")
    ]
    assert roles(session) == ["user", "assistant", "tool", "assistant"]
    assert session.message_count() == 4
    assert [m.role for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    first_usage = session.history[1].metadata["usage"]
    second_usage = session.history[3].metadata["usage"]
    assert (
        result.usage.prompt_tokens == first_usage["prompt_tokens"] + second_usage["prompt_tokens"]
    )
    assert session.history[1].metadata["model"] == "scripted-model"
    sent = model.requests[1].messages
    assert sent[0] == {"role": "system", "content": "You add."}
    assert sent[-1]["role"] == "tool" and sent[-1]["content"] == "5"
    assert model.requests[0].tools is not None
    assert {t["function"]["name"] for t in model.requests[0].tools} == {
        "add",
        "explode",
        "delete_everything",
    }


async def test_several_calls_run_concurrently_and_answer_in_order() -> None:
    both_running = asyncio.Event()
    started: list[str] = []

    @tool
    async def wait_for_peer(name: str) -> str:
        """Finishes only once both calls are running at the same time."""
        started.append(name)
        if len(started) == 2:
            both_running.set()
        await asyncio.wait_for(both_running.wait(), timeout=5)
        return f"done {name}"

    model = ScriptedModel(
        [tool_calls(("wait_for_peer", {"name": "one"}), ("wait_for_peer", {"name": "two"})), "ok"]
    )
    session = await new(model, tools=[wait_for_peer])
    result = await session.send_message("go")
    assert result.success
    calls = session.history[1].tool_calls
    results = session.history[2:4]
    assert [r.tool_call_id for r in results] == [c.id for c in calls]
    assert [r.content for r in results] == ["done one", "done two"]


async def test_failures_become_observations() -> None:
    model = ScriptedModel(
        [
            tool_call("nope", {}),
            tool_call("add", {"a": "not a number", "b": 1}),
            ChatMessage.assistant(tool_calls=[ToolCall("c1", "add", "{broken json")]),
            tool_call("explode", {"reason": "test"}),
            tool_call("add", {"a": 1}),
            "recovered",
        ]
    )
    session = await new(model)
    result = await session.send_message("try things")
    assert result.success and result.result == "recovered"
    observations = [s.observation or "" for s in result.steps]
    assert "no tool named 'nope'" in observations[0] and "add" in observations[0]
    assert "a" in observations[1] and "integer" in observations[1]
    assert "not valid JSON" in observations[2]
    assert "kaboom: test" in observations[3] and "RuntimeError" in observations[3]
    assert "b" in observations[4]
    tool_msgs = [m for m in session.history if m.role == "tool"]
    assert [m.metadata["ok"] for m in tool_msgs] == [False] * 5


async def test_tool_receives_session() -> None:
    @tool
    async def remember(value: str, session: Session) -> str:
        """Store a value in the session's state."""
        await session.state.set("remembered", value)
        return "ok"

    session = await new(ScriptedModel([tool_call("remember", {"value": "v1"}), "stored"]))
    session.tools.add(remember)
    await session.send_message("remember v1")
    assert session.state.get("remembered") == "v1"
    schema = next(s for s in session.tools.openai_schemas() if s["function"]["name"] == "remember")
    assert list(schema["function"]["parameters"]["properties"]) == ["value"]


# -- limits ---------------------------------------------------------------------------------


async def test_max_iterations_stops_with_valid_history() -> None:
    model = ScriptedModel([tool_call("add", {"a": 1, "b": 1})] * 5)
    session = await new(model)
    result = await session.send_message_with_iterations("loop forever", max_iterations=3)
    assert not result.success
    assert result.stop_reason == "max_iterations"
    assert result.iterations == 3
    assert "max_iterations=3" in (result.error or "")
    assert roles(session) == ["user"] + ["assistant", "tool"] * 3
    model.add_reply("fine")
    assert (await session.send_message("next")).success


async def test_on_limit_generate_makes_one_call_without_tools() -> None:
    model = ScriptedModel([tool_call("add", {"a": 1, "b": 1})] * 2 + ["best effort answer"])
    session = await new(model, on_limit="generate")
    result = await session.send_message_with_iterations("q", max_iterations=2)
    assert result.result == "best effort answer"
    assert not result.success and result.stop_reason == "max_iterations"
    assert result.iterations == 3
    assert model.requests[-1].tools is None
    assert "limit" in model.requests[-1].messages[0]["content"]


# -- the text protocol ---------------------------------------------------------------------


async def test_text_protocol_action_observation_answer() -> None:
    model = ScriptedModel(
        [
            '{"thought": "need to add", "action": "add", "action_input": {"a": 40, "b": 2}}',
            '{"thought": "oops", "action": "add", "action_input": {"a": 4',
            '```json\n{"thought": "t", "action": "nope", "action_input": {}}\n```',
            '{"thought": "done", "final_answer": "42"}',
        ]
    )
    session = await new(model, react_mode="text")
    result = await session.send_message("what is 40+2?")
    assert result.success and result.result == "42"
    assert [s.action for s in result.steps] == ["add", None, "nope", None]
    observations = [m.text for m in session.history if m.metadata.get("observation")]
    assert observations[0] == "Observation: 42"
    assert "not valid JSON" in observations[1]
    assert "no tool named 'nope'" in observations[2]
    first = model.requests[0]
    assert first.tools is None
    assert '"action"' in first.messages[0]["content"] and "add" in first.messages[0]["content"]


async def test_text_protocol_plain_prose_is_an_answer() -> None:
    session = await new(ScriptedModel(["Just a plain answer."]), react_mode="text")
    result = await session.send_message("hi")
    assert result.result == "Just a plain answer."


async def test_auto_mode_falls_back_to_text_when_tools_are_rejected() -> None:
    model = ScriptedModel(
        [ToolsUnsupported("model does not support tools"), '{"final_answer": "ok"}']
    )
    session = await new(model, react_mode="auto")
    result = await session.send_message("hi")
    assert result.success and result.result == "ok"
    assert result.iterations == 1
    assert model.requests[0].tools is not None
    assert model.requests[1].tools is None
    assert "final_answer" in model.requests[1].messages[0]["content"]


async def test_tools_mode_does_not_fall_back() -> None:
    session = await new(ScriptedModel([ToolsUnsupported("no tools here")]), react_mode="tools")
    result = await session.send_message("hi")
    assert not result.success and result.stop_reason == "error"
    assert "no tools here" in (result.error or "")


# -- approval -------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "ran"), [(True, True), (False, False), (None, False)])
async def test_approval(answer: bool | None, ran: bool) -> None:
    asked: list[tuple[str, dict[str, Any]]] = []

    async def approve(name: str, args: dict[str, Any]) -> bool:
        asked.append((name, args))
        return bool(answer)

    model = ScriptedModel([tool_call("delete_everything", {"path": "/tmp/x"}), "done"])
    session = await new(model, approve=approve if answer is not None else None)
    result = await session.send_message("clean up")
    observation = result.steps[0].observation or ""
    assert ("deleted /tmp/x" in observation) is ran
    if not ran:
        assert "did not approve" in observation
    assert asked == ([("delete_everything", {"path": "/tmp/x"})] if answer is not None else [])


# -- errors, undo, retry ------------------------------------------------------------------


async def test_model_error_keeps_user_message_and_retry_does_not_duplicate() -> None:
    model = ScriptedModel([ModelError("server exploded"), "second time lucky"])
    session = await new(model)
    result = await session.send_message("question")
    assert not result.success and result.stop_reason == "error"
    assert "server exploded" in (result.error or "")
    assert [m.text for m in session.history] == ["question"]
    retried = await session.retry()
    assert retried.success
    assert [m.text for m in session.history] == ["question", "second time lucky"]


async def test_retry_replaces_the_last_answer() -> None:
    session = await new(ScriptedModel(["first", "a", "b"]))
    await session.send_message("one")
    await session.send_message("two")
    await session.retry()
    assert [m.text for m in session.history] == ["one", "first", "two", "b"]
    assert [m.text for m in await session.storage.load("s")] == ["one", "first", "two", "b"]


async def test_resume_answers_tool_results_stored_out_of_band() -> None:
    model = ScriptedModel(["it is 3", "still 3"])
    session = await new(model)
    call = ChatMessage.assistant("", [ToolCall("c1", "add", '{"a": 1, "b": 2}')])
    await session.storage.append("s", [ChatMessage.user("1+2?"), call])
    await session.storage.append("s", [ChatMessage.tool("c1", "3", name="add")])
    result = await session.resume()
    assert result.result == "it is 3"
    # the model saw the stored results, and no new user message was added or dropped
    assert [m["role"] for m in model.requests[0].messages][-3:] == ["user", "assistant", "tool"]
    assert roles(session) == ["user", "assistant", "tool", "assistant"]
    events = [e async for e in session.stream_resume()]
    assert events[-1].result.result == "still 3"
    assert roles(session) == ["user", "assistant", "tool", "assistant", "assistant"]


async def test_undo_removes_last_exchange() -> None:
    session = await new(ScriptedModel([tool_call("add", {"a": 1, "b": 2}), "3", "x"]))
    await session.send_message("first")
    await session.send_message("second")
    removed = await session.undo()
    assert [m.text for m in removed] == ["second", "x"]
    assert roles(session) == ["user", "assistant", "tool", "assistant"]
    assert await session.storage.count("s") == 4
    await session.undo()
    assert await session.undo() == []
    assert session.history == []
    with pytest.raises(ConversaError, match="no user message to retry"):
        await session.retry()


async def test_clear_history_keeps_state() -> None:
    session = await new(ScriptedModel(["a"]))
    await session.state.set("k", 1)
    await session.send_message("hi")
    await session.clear_history()
    assert session.message_count() == 0
    assert await session.storage.load("s") == []
    assert session.state.get("k") == 1


# -- the history invariants -----------------------------------------------------------------


async def test_dangling_call_at_the_end_gets_a_stored_interrupted_result() -> None:
    store = InMemoryStorage()
    call = ToolCall("call_crashed", "add", '{"a": 1, "b": 2}')
    await store.append("s", [ChatMessage.user("q"), ChatMessage.assistant(tool_calls=[call])])
    model = ScriptedModel(["answer"])
    session = await create_session("s", store, model=model, tools=[add])
    assert (await session.send_message("next")).success
    stored = await store.load("s")
    assert [m.role for m in stored] == ["user", "assistant", "tool", "user", "assistant"]
    assert stored[2].tool_call_id == "call_crashed"
    assert stored[2].metadata["interrupted"] is True
    sent = model.requests[0].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user"]


async def test_dangling_call_in_the_middle_is_filled_in_the_prompt_only() -> None:
    store = InMemoryStorage()
    call = ToolCall("call_lost", "add", "{}")
    orphan = ChatMessage.tool("call_unknown", "orphan result")
    history = [
        ChatMessage.user("q"),
        ChatMessage.assistant(tool_calls=[call]),
        ChatMessage.user("q2"),
        orphan,
        ChatMessage.assistant("a2"),
    ]
    await store.save("s", history)
    model = ScriptedModel(["fine"])
    session = await create_session("s", store, model=model)
    await session.send_message("q3")
    assert (await store.load("s"))[:5] == history
    sent = model.requests[0].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user", "assistant", "user"]
    assert sent[2] == {"role": "tool", "content": INTERRUPTED_RESULT, "tool_call_id": "call_lost"}
    assert all(m.get("tool_call_id") != "call_unknown" for m in sent)


async def test_cancel_during_tool_leaves_valid_history() -> None:
    hang, started = hanging_tool()
    model = ScriptedModel([tool_calls(("hang", {}), ("add", {"a": 1, "b": 1})), "after"])
    session = await new(model, tools=[hang, add])
    task = asyncio.create_task(session.send_message("go"))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = await session.storage.load("s")
    assert [m.role for m in stored] == ["user", "assistant", "tool", "tool"]
    assert all(m.metadata.get("interrupted") for m in stored[2:])
    assert (await session.send_message("again")).result == "after"


# -- context window -------------------------------------------------------------------------


async def test_context_window_trims_oldest_but_keeps_units_and_newest_user() -> None:
    store = InMemoryStorage()
    old = [ChatMessage.user("old " * 200), ChatMessage.assistant("old answer " * 100)]
    call = ToolCall("c1", "add", '{"a": 1, "b": 2}')
    pair = [ChatMessage.assistant(tool_calls=[call]), ChatMessage.tool("c1", "3")]
    await store.save("s", [*old, ChatMessage.user("mid"), *pair, ChatMessage.assistant("3")])
    model = ScriptedModel(["ok", "ok"])
    session = await create_session("s", store, model=model, context_window=120, system_prompt="S")
    await session.send_message("newest question")
    sent = model.requests[0].messages
    assert sent[0]["content"] == "S"
    assert sent[-1]["content"] == "newest question"
    assert all("old" not in str(m.get("content")) for m in sent)
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
    # A huge newest user message is kept even though it alone exceeds the window.
    await session.send_message("huge " * 2000)
    sent = model.requests[1].messages
    assert [m["role"] for m in sent] == ["system", "user"]
    assert len(await store.load("s")) == 10


def test_trim_never_splits_a_call_from_its_results() -> None:
    from conversa.context import trim

    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {}}]}
    messages = [
        {"role": "user", "content": "u"},
        call,
        {"role": "tool", "content": "r" * 400, "tool_call_id": "c"},
        {"role": "assistant", "content": "a"},
    ]
    kept = trim([], messages, budget=40)
    assert kept == [messages[0], messages[3]]
    assert trim([], messages, budget=None) == messages


# -- state and user parts --------------------------------------------------------------------


class Prefs(BaseModel):
    theme: str
    size: int = 12


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def test_state_api_and_persistence() -> None:
    store = InMemoryStorage()
    session = await create_session("s", store, model=ScriptedModel())
    state = session.state
    assert state.is_empty and not state.is_modified
    await state.set("prefs", Prefs(theme="dark"))
    await state.set("point", Point(1, 2))
    await state.update({"a": 1, "b": [1, 2]})
    await state.set("temp", "soon gone", expires_at=datetime.now(UTC) + timedelta(seconds=60))
    assert state.get("prefs", as_type=Prefs) == Prefs(theme="dark")
    assert state.get("point", as_type=Point) == Point(1, 2)
    assert state.get("missing", "default") == "default"
    assert state.has("a") and "b" in state and not state.has("zzz")
    assert sorted(state.keys()) == ["a", "b", "point", "prefs", "temp"]
    assert state.is_modified and not state.is_empty
    await state.delete("temp")
    await state.delete("a")
    reopened = await create_session("s", store, model=ScriptedModel())
    assert reopened.state.to_dict() == {
        "prefs": {"theme": "dark", "size": 12},
        "point": {"x": 1, "y": 2},
        "b": [1, 2],
    }
    assert dict(reopened.state.items()) == reopened.state.to_dict()
    await reopened.state.from_dict({"only": True})
    assert (await store.get_state("s")) == {"only": True}
    await reopened.state.clear()
    assert reopened.state.is_empty


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_expiry_holds_in_a_state_loaded_before_the_key_expired() -> None:
    store = InMemoryStorage()
    clock = FakeClock()
    writer = SessionState(store, "s", clock=clock)
    await writer.set("token", "abc", ttl=60)
    await writer.update({"a": 1, "b": 2}, expires_at=datetime.now(UTC) + timedelta(seconds=30))
    await writer.set("kept", True)
    # another process loads the state while every key is live
    reader = SessionState(store, "s", clock=clock)
    await reader.reload()
    assert reader.to_dict() == {"token": "abc", "a": 1, "b": 2, "kept": True}
    clock.now += 31
    assert reader.get("a") is None and "b" not in reader
    assert reader.get("token") == "abc"
    clock.now += 30
    for state in (reader, writer):
        assert not state.has("token") and state.get("token", "gone") == "gone"
        assert state.to_dict() == {"kept": True}
        assert state.keys() == ["kept"] and len(state) == 1


async def test_state_expires_at_and_ttl() -> None:
    store = InMemoryStorage()
    state = SessionState(store, "s")
    moment = datetime(2999, 1, 1, 12, tzinfo=UTC)
    await state.set("naive", 1, expires_at=moment.replace(tzinfo=None))
    await state.set("past", 2, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    entries = await store.get_state_entries("s")
    assert entries["naive"].expires_at == moment
    assert "past" not in entries and not state.has("past")
    with pytest.raises(ValueError, match="ttl or expires_at"):
        await state.set("both", 3, ttl=5, expires_at=moment)
    with pytest.raises(ValueError, match="ttl must be a positive"):
        await state.update({"x": 1}, ttl=0)
    assert await store.get_state("s") == {"naive": 1}


async def test_state_values_are_never_shared_with_the_caller() -> None:
    store = InMemoryStorage()
    state = SessionState(store, "s")
    mine = {"items": [1, 2], "nested": {"k": "v"}}
    await state.set("cart", mine)
    mine["items"].append(3)
    mine["nested"]["k"] = "changed"
    got = state.get("cart")
    assert got == {"items": [1, 2], "nested": {"k": "v"}}
    got["items"].append(99)
    state.to_dict()["cart"]["items"].append(98)
    dict(state.items())["cart"]["nested"]["k"] = "x"
    assert state.get("cart", as_type=dict) == {"items": [1, 2], "nested": {"k": "v"}}
    await state.update({"pair": (1, [2])})
    assert state.get("pair") == [1, [2]]
    reloaded = SessionState(store, "s")
    await reloaded.reload()
    assert reloaded.to_dict() == state.to_dict()


async def test_user_parts_are_attached_to_the_newest_user_message_only_in_the_prompt() -> None:
    model = ScriptedModel(["a", "b", "c"])
    session = await new(model)
    await session.set_user_part_text("note", "user is on mobile")
    await session.set_user_part_image("shot", b"\x89PNG fake", "image/png")
    await session.send_message("first")
    content = model.requests[0].messages[-1]["content"]
    assert content[0] == {"type": "text", "text": "first"}
    assert content[1] == {"type": "text", "text": "user is on mobile"}
    assert content[2]["image_url"]["url"].startswith("data:image/png;base64,")
    assert session.history[0].content == "first"
    await session.delete_user_part("note")
    await session.send_message("second")
    sent = model.requests[1].messages
    assert sent[0]["content"] == "first"
    assert [p["type"] for p in sent[-1]["content"]] == ["text", "image_url"]
    await session.clear_user_parts()
    await session.send_message("third")
    assert model.requests[2].messages[-1]["content"] == "third"


# -- interceptors -----------------------------------------------------------------------------


async def test_request_and_response_interceptors() -> None:
    seen: list[str] = []

    def add_context(request: ModelRequest, session: Session) -> None:
        request.extra_system.append(f"Session id: {session.session_id}")
        request.messages[-1] = {**request.messages[-1], "content": "rewritten"}

    async def shout(response: ModelResponse, session: Session) -> ModelResponse:
        seen.append(response.text)
        return dataclasses.replace(response, message=response.message.replace(content="LOUD"))

    model = ScriptedModel(["quiet"])
    session = await new(
        model, request_interceptors=[add_context], response_interceptors=[shout], system_prompt="S"
    )
    result = await session.send_message("original")
    assert model.requests[0].messages[0]["content"] == "S\n\nSession id: s"
    assert model.requests[0].messages[-1]["content"] == "rewritten"
    assert seen == ["quiet"]
    assert result.result == "LOUD"
    assert session.history[-1].content == "LOUD"
    assert session.history[0].content == "original"


# -- streaming, concurrency, other processes ----------------------------------------------------


async def test_stream_events_in_order() -> None:
    model = ScriptedModel([tool_call("add", {"a": 1, "b": 2}), "the answer is three"])
    session = await new(model)
    events = [e async for e in session.stream_message("1+2")]
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("ToolRunning") < kinds.index("ToolDone") < kinds.index("TextDelta")
    assert isinstance(events[-1], TurnDone)
    deltas = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert deltas == "the answer is three"
    assert isinstance(next(e for e in events if isinstance(e, ToolRunning)).call, ToolCall)
    done = next(e for e in events if isinstance(e, ToolDone))
    assert done.ok and done.output == "3"


async def test_concurrent_turns_on_one_session_are_serialised() -> None:
    def answer(request: dict[str, Any]) -> Any:  # slow, so unserialised turns would interleave
        return slow(0.05, "re: " + request["messages"][-1]["content"])

    session = await new(ScriptedModel(default_reply=answer))
    await asyncio.gather(session.send_message("one"), session.send_message("two"))
    texts = [m.text for m in session.history]
    assert texts in (["one", "re: one", "two", "re: two"], ["two", "re: two", "one", "re: one"])


async def test_two_sessions_on_one_store_see_each_other() -> None:
    store = InMemoryStorage()
    model_a, model_b = ScriptedModel(["from a"]), ScriptedModel(["from b"])
    a = await create_session("shared", store, model=model_a)
    b = await create_session("shared", store, model=model_b)
    await a.send_message("hello from a")
    await b.send_message("hello from b")
    assert [m["content"] for m in model_b.requests[0].messages] == [
        "hello from a",
        "from a",
        "hello from b",
    ]
    await a.undo()  # b's exchange goes; a must notice even though the count is the same again
    await b.send_message("replaced")
    assert [m.text for m in b.history] == ["hello from a", "from a", "replaced", "echo: replaced"]


def test_sync_api() -> None:
    with create_session_sync("sync", "memory://", model=ScriptedModel(["pong"])) as session:
        result = session.send_message("ping")
        assert result.result == "pong"
        session.state.set("k", "v")
        assert session.state.get("k") == "v"
        session.state.update({"a": 1, "b": 2})
        assert dict(session.state.items()) == {"k": "v", "a": 1, "b": 2}
        session.state.from_dict({"only": True})
        assert session.state.to_dict() == {"only": True} and session.state.is_modified
        session.set_user_part_text("hint", "be brief")
        session.state.clear()
        assert session.state.is_empty and session.state.keys() == []
        assert session.message_count() == 2
        assert session.undo()[0].text == "ping"


async def test_sync_api_refuses_inside_an_event_loop() -> None:
    with pytest.raises(ConversaError, match="await create_session"):
        create_session_sync("x", "memory://")


async def test_bad_options_are_rejected() -> None:
    for kw in ({"react_mode": "smart"}, {"max_iterations": 0}, {"on_limit": "explode"}):
        with pytest.raises(ValueError):
            await create_session("x", "memory://", **kw)


# -- cancel, failures half-way, and what the model may not touch -------------------------------


async def test_cancel_ends_the_turn_with_a_cancelled_result() -> None:
    hang, started = hanging_tool()
    model = ScriptedModel([tool_call("hang", {}), "after"])
    session = await new(model, tools=[hang])
    assert not session.cancel()  # nothing runs yet
    turn = asyncio.create_task(session.send_message("go"))
    await asyncio.wait_for(started.wait(), 5)
    assert session.cancel()
    result = await turn
    assert (result.stop_reason, result.success) == ("cancelled", False)
    assert [m.role for m in session.history] == ["user", "assistant", "tool"]
    assert session.history[-1].metadata["interrupted"] is True
    assert (await session.send_message("again")).result == "after"


async def test_cancel_while_streaming_keeps_the_partial_answer() -> None:
    session = await new(ScriptedModel([slow(0.0, "one two three four five six")]))
    events: list[Any] = []
    async for event in session.stream_message("talk"):
        events.append(event)
        if isinstance(event, TextDelta) and len(events) == 2:
            session.cancel()
    done = events[-1]
    assert isinstance(done, TurnDone) and done.result.stop_reason == "cancelled"
    stored = session.history[-1]
    assert stored.role == "assistant" and stored.metadata["interrupted"] is True
    assert done.result.result == stored.text and stored.text.startswith("one")


class SlowAcknowledgement(InMemoryStorage):
    """Stores at once but answers late, like a server whose reply is still on its way."""

    def __init__(self) -> None:
        super().__init__()
        self.stored = asyncio.Event()

    async def append(self, session_id: str, messages: Any, **kw: Any) -> None:
        await super().append(session_id, messages, **kw)
        if any(m.role == "tool" for m in messages):
            self.stored.set()
            await asyncio.sleep(0.2)


async def test_a_cancel_during_a_write_never_answers_a_call_twice() -> None:
    store = SlowAcknowledgement()
    model = ScriptedModel([tool_call("add", {"a": 1, "b": 2}), "after"])
    session = await create_session("s", store, model=model, tools=[add])
    turn = asyncio.create_task(session.send_message("add"))
    await asyncio.wait_for(store.stored.wait(), 5)
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    stored = await store.load("s")
    assert [m.role for m in stored] == ["user", "assistant", "tool"]
    assert stored[2].content == "3"
    assert session.history == stored
    assert (await session.send_message("next")).success


async def test_a_failing_approver_counts_as_denied() -> None:
    def approve(name: str, args: dict[str, Any]) -> bool:
        raise RuntimeError("approval UI crashed")

    model = ScriptedModel([tool_call("delete_everything", {"path": "/"}), "ok"])
    session = await new(model, approve=approve)
    result = await session.send_message("go")
    assert result.success and "did not approve" in (result.steps[0].observation or "")


async def test_a_storage_failure_mid_tools_still_leaves_valid_history() -> None:
    class FailsOnce(InMemoryStorage):
        failed = False

        async def append(self, session_id: str, messages: Any, **kw: Any) -> None:
            if not self.failed and any(m.role == "tool" for m in messages):
                self.failed = True
                raise OSError("disk full")
            await super().append(session_id, messages, **kw)

    model = ScriptedModel([tool_calls(("add", {"a": 1, "b": 1}), ("add", {"a": 2, "b": 2})), "ok"])
    session = await create_session("s", FailsOnce(), model=model, tools=[add])
    with pytest.raises(OSError):
        await session.send_message("go")
    stored = await session.storage.load("s")
    assert [m.role for m in stored] == ["user", "assistant", "tool", "tool"]
    assert all(m.metadata.get("interrupted") for m in stored[2:])


async def test_refresh_waits_for_the_running_turn() -> None:
    class SlowUserAck(InMemoryStorage):
        stored = asyncio.Event()
        acknowledge = asyncio.Event()

        async def append(self, session_id: str, messages: Any, **kw: Any) -> None:
            await super().append(session_id, messages, **kw)
            if messages and messages[0].role == "user":
                self.stored.set()
                await self.acknowledge.wait()

    store = SlowUserAck()
    session = await create_session("s", store, model=ScriptedModel(["answer"]))
    turn = asyncio.create_task(session.send_message("q"))
    await asyncio.wait_for(store.stored.wait(), 5)
    # the message is stored but not yet acknowledged to the turn
    refresh = asyncio.create_task(session.refresh())
    await asyncio.sleep(0)
    assert not refresh.done()
    store.acknowledge.set()
    await asyncio.wait_for(refresh, 5)
    await turn
    assert [m.text for m in session.history] == ["q", "answer"]
    assert session.history == await store.load("s")


async def test_close_only_closes_a_storage_it_opened(tmp_path: Any) -> None:
    class Tracking(InMemoryStorage):
        closed = False

        async def close(self) -> None:
            self.closed = True

    given = Tracking()
    await (await create_session("a", given, model=ScriptedModel())).close()
    assert not given.closed
    owned = await create_session("b", f"sqlite:///{tmp_path}/s.db", model=ScriptedModel())
    await owned.close()
    with pytest.raises(StorageError, match="closed"):
        await owned.storage.count("b")


async def test_max_iterations_zero_is_rejected() -> None:
    session = await new(ScriptedModel(["x"]))
    with pytest.raises(ValueError, match="at least 1"):
        await session.send_message("q", max_iterations=0)


async def test_text_mode_keeps_the_users_question_and_parts_on_it() -> None:
    model = ScriptedModel(
        ['{"action": "add", "action_input": {"a": 1, "b": 2}}', '{"final_answer": "3"}']
    )
    store = InMemoryStorage()
    await store.save("s", [ChatMessage.user("old " * 400), ChatMessage.assistant("old")])
    session = await create_session(
        "s", store, model=model, tools=[add], react_mode="text", context_window=150
    )
    await session.set_user_part_text("note", "on mobile")
    await session.send_message("what is 1+2?")
    sent = model.requests[1].messages
    user_parts = [m for m in sent if isinstance(m["content"], list)]
    assert len(user_parts) == 1
    assert user_parts[0]["content"][0]["text"] == "what is 1+2?"
    assert sent[-1]["content"] == "Observation: 3"
    assert all("old" not in str(m["content"]) for m in sent[1:])


async def test_internal_state_keys_are_hidden_from_listing_and_clearing() -> None:
    session = await new(ScriptedModel())
    await session.set_user_part_text("note", "kept")
    await session.state.set("__app.secret", 1)
    await session.state.set("visible", 2)
    assert session.state.keys() == ["visible"]
    assert session.state.to_dict() == {"visible": 2}
    assert session.state.get("__app.secret") == 1
    await session.state.clear()
    assert session.state.is_empty
    assert set(await session.storage.get_state("s")) == {"__user_part_note", "__app.secret"}


async def test_a_context_window_counts_each_stored_message_once() -> None:
    counted: list[str] = []

    def counter(message: dict[str, Any]) -> int:
        counted.append(str(message.get("content")))
        return 10

    store = InMemoryStorage()
    await store.save("s", [ChatMessage.user(f"old {i}") for i in range(50)])
    model = ScriptedModel()
    session = await create_session(
        "s", store, model=model, context_window=10_000, token_counter=counter
    )
    await session.send_message("first")
    assert len(model.requests[0].messages) == 51
    counted.clear()
    await session.send_message("second")
    # only what is new since the last call: the answer and the next question
    assert sorted(counted) == sorted(["echo: first", "second"])


async def test_a_turn_stores_its_usage_with_its_replies_in_no_write_of_its_own() -> None:
    store = InMemoryStorage()
    separate: list[Any] = []
    add_usage = store.add_usage

    async def counted(session_id: str, **amounts: int) -> None:
        separate.append(amounts)
        await add_usage(session_id, **amounts)

    store.add_usage = counted  # type: ignore[method-assign]
    model = ScriptedModel([tool_call("add", {"a": 1, "b": 2}), "three"])
    session = await create_session("s", store, model=model, tools=[add])
    result = await session.send_message("add")
    info = await store.get_info("s")
    assert info is not None and result.usage.prompt_tokens > 0
    assert info.usage == UsageTotals(result.usage.prompt_tokens, result.usage.completion_tokens, 2)
    assert separate == []  # each model call's usage went with the append of its reply


async def test_a_write_cancelled_twice_still_leaves_the_cache_as_stored() -> None:
    class SlowReplyAck(InMemoryStorage):
        def __init__(self) -> None:
            super().__init__()
            self.stored, self.acknowledge = asyncio.Event(), asyncio.Event()

        async def append(self, session_id: str, messages: Any, **kw: Any) -> None:
            await super().append(session_id, messages, **kw)
            if messages and messages[-1].role == "assistant":
                self.stored.set()
                await self.acknowledge.wait()  # stored, the answer still on its way

    store = SlowReplyAck()
    session = await create_session("s", store, model=ScriptedModel(["the answer"]))
    turn = asyncio.create_task(session.send_message("q"))
    await asyncio.wait_for(store.stored.wait(), 5)
    turn.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    turn.cancel()  # a second cancel while the turn waits for its write
    for _ in range(3):
        await asyncio.sleep(0)
    store.acknowledge.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(turn, 5)
    stored = await store.load("s")
    assert [m.text for m in stored] == ["q", "the answer"]
    assert session.history == stored
    info = await store.get_info("s")
    assert info is not None and info.usage.calls == 1
