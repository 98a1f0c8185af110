"""The state's sync API: from sync tools (in their threads) and outside turns, stored when the
call returns, before its result, in one write with a journal of that result."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from _wait import wait_until

from conversa import ChatMessage, OpenAIChatModel, Session, SessionState, create_session, tool
from conversa._prompt_history import INTERRUPTED_RESULT
from conversa.errors import StateValueError
from conversa.state import JOURNAL_KEY
from conversa.storage import ConversationStorage, InMemoryStorage, open_storage
from conversa.testing import FakeOpenAIServer, text, tool_call, tool_calls
from conversa.tools import Tool

HERE = Path(__file__).resolve().parent


def model(server: FakeOpenAIServer) -> OpenAIChatModel:
    return OpenAIChatModel("fake-model", base_url=server.base_url, api_key="test", max_retries=0)


async def open_session(
    server: FakeOpenAIServer, storage: ConversationStorage, **kw: Any
) -> Session:
    return await create_session("s", storage, model=model(server), **kw)


def sqlite(tmp_path: Path) -> ConversationStorage:
    return open_storage(f"sqlite:///{tmp_path / 's.db'}")


# -- outside a turn --------------------------------------------------------------------------


async def test_dict_style_and_sync_methods_apply_at_once_and_flush_stores_them() -> None:
    storage = InMemoryStorage()
    state = SessionState(storage, "s")
    state["a"] = 1
    state.sync.set("b", {"x": [1]})
    state.sync.update({"c": 3, "d": 4})
    del state["a"]
    state.sync.delete("c")
    state.sync.delete("never-set")  # absent keys are ignored, as by the async delete
    assert state.to_dict() == {"b": {"x": [1]}, "d": 4} and state["b"] == {"x": [1]}
    with pytest.raises(KeyError):
        state["a"]
    with pytest.raises(KeyError):
        del state["a"]
    assert state.has_pending and await storage.get_state("s") == {}
    await state.flush()
    assert not state.has_pending
    assert await storage.get_state("s") == {"b": {"x": [1]}, "d": 4}
    state.sync.clear()
    await state.flush()
    assert await storage.get_state("s") == {}


async def test_pending_sync_changes_go_before_async_writes_and_survive_a_reload() -> None:
    storage = InMemoryStorage()
    state = SessionState(storage, "s")
    state["k"] = "sync"
    await state.set("other", 1)  # stores the pending change first: program order
    assert await storage.get_state("s") == {"k": "sync", "other": 1}
    state["k"] = "later"
    await state.set("k", "async")  # the async write is the later one and wins
    assert await storage.get_state("s") == {"k": "async", "other": 1}
    state["r"] = 1
    await state.reload()
    assert state["r"] == 1 and (await storage.get_state("s"))["r"] == 1


async def test_a_bad_value_fails_in_the_caller_and_nothing_is_pending() -> None:
    state = SessionState(InMemoryStorage(), "s")
    with pytest.raises(StateValueError):
        state["x"] = object()
    with pytest.raises(StateValueError):
        state.sync.set("", 1)
    assert not state.has_pending and state.to_dict() == {}


async def test_sync_clear_leaves_internal_keys() -> None:
    state = SessionState(InMemoryStorage(), "s")
    await state.set("__user_part_x", {"type": "text", "text": "t"})
    state["a"] = 1
    state.sync.clear()
    await state.flush()
    assert state.keys(internal=True) == ["__user_part_x"]


async def test_close_stores_pending_sync_changes(server: FakeOpenAIServer, tmp_path: Path) -> None:
    session = await open_session(server, sqlite(tmp_path))
    session["theme"] = "dark"
    session.set("count", 1)
    await session.close()
    reopened = await open_session(server, sqlite(tmp_path))
    assert reopened.state.to_dict() == {"theme": "dark", "count": 1}
    await reopened.storage.close()
    await session.storage.close()


# -- in a turn ----------------------------------------------------------------------------------


def recording(storage: ConversationStorage) -> list[str]:
    """Record the order of the storage writes a turn makes (state changes, appends)."""
    log: list[str] = []
    change, append = storage.change_state, storage.append

    async def change_state(session_id: str, changes: Any) -> None:
        log.append("state:" + ",".join(sorted(changes)))
        await change(session_id, changes)

    async def appended(session_id: str, messages: Sequence[ChatMessage], **kw: Any) -> None:
        await append(session_id, messages, **kw)
        log.extend(f"append:{m.role}" for m in messages)

    storage.change_state = change_state  # type: ignore[method-assign]
    storage.append = appended  # type: ignore[method-assign]
    return log


@tool
def add_to_cart(item: str, quantity: int, session: Session) -> str:
    """Add an item to the cart."""
    cart = session.get("cart", [])
    cart.append({"item": item, "quantity": quantity})
    session.set("cart", cart)
    session.state["last"] = item
    assert session.get("cart") == cart  # the tool reads its own change back
    return f"{sum(i['quantity'] for i in cart)} items"


async def test_a_sync_tools_change_is_stored_before_its_result_in_one_write(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    storage = sqlite(tmp_path)
    session = await open_session(server, storage, tools=[add_to_cart])
    log = recording(storage)
    server.add_reply(tool_call("add_to_cart", {"item": "Widget", "quantity": 2}), text("done"))
    result = await session.send_message("add 2 widgets")
    assert result.steps[0].observation == "2 items"
    # one write: the tool's keys and the journal of its result, then the result itself
    assert log == [
        "append:user",
        "append:assistant",
        f"state:{JOURNAL_KEY},cart,last",
        "append:tool",
        "append:assistant",
    ]
    fresh = await open_session(server, sqlite(tmp_path))
    assert fresh.state.to_dict() == {"cart": [{"item": "Widget", "quantity": 2}], "last": "Widget"}
    assert JOURNAL_KEY not in fresh.state.keys(internal=True)
    await fresh.storage.close()
    await storage.close()


@tool
def bump(session: Session) -> str:
    """Count, dict-style."""
    session.state["n"] = session.state.get("n", 0) + 1
    return str(session.state["n"])


async def test_sync_tools_in_one_message_each_see_their_own_changes(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    storage = sqlite(tmp_path)
    session = await open_session(server, storage, tools=[add_to_cart, bump])
    server.add_reply(
        tool_calls(("add_to_cart", {"item": "A", "quantity": 1}), ("bump", {})),
        tool_call("bump", {}),
        text("done"),
    )
    result = await session.send_message("go")
    assert [s.observation for s in result.steps] == ["1 items", "1", "2"]
    assert await storage.get_state("s") == {
        "cart": [{"item": "A", "quantity": 1}],
        "last": "A",
        "n": 2,
    }
    await storage.close()


@tool
def set_then_fail(session: Session) -> str:
    """Changes the session, then fails."""
    session.set("half", "done")
    raise RuntimeError("broken")


async def test_a_failing_tool_keeps_no_state_change(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    storage = sqlite(tmp_path)
    session = await open_session(server, storage, tools=[set_then_fail])
    server.add_reply(tool_call("set_then_fail", {}), text("sorry"))
    result = await session.send_message("go")
    assert "broken" in (result.steps[0].observation or "")
    assert not session.state.has("half") and await storage.get_state("s") == {}
    await storage.close()


async def test_a_timed_out_tool_keeps_no_state_change_not_even_later(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    release = threading.Event()
    late: list[BaseException] = []

    def slow_writer(session: Session) -> str:
        """Waits, then writes."""
        release.wait(10)
        try:
            session.set("late", True)
        except BaseException as exc:
            late.append(exc)
        return "finished too late"

    storage = sqlite(tmp_path)
    slow = Tool(slow_writer, timeout=0.2)
    session = await open_session(server, storage, tools=[slow])
    server.add_reply(tool_call("slow_writer", {}), text("it timed out"))
    result = await session.send_message("go")
    assert "timed out" in (result.steps[0].observation or "")
    release.set()  # the abandoned thread now tries to write: it is told, not stored
    wait_until(lambda: late, "the abandoned tool's write")
    assert isinstance(late[0], StateValueError)
    assert not session.state.has("late") and await storage.get_state("s") == {}
    await storage.close()


async def test_async_and_sync_writes_in_one_tool_keep_program_order(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    @tool
    async def mixed(session: Session) -> str:
        """Writes both ways."""
        session.state["a"] = "sync"
        await session.state.set("a", "async")  # later: wins
        await session.state.set("b", "async")
        session.state["b"] = "sync"  # later: wins, stored with the result
        return "ok"

    storage = sqlite(tmp_path)
    session = await open_session(server, storage, tools=[mixed])
    server.add_reply(tool_call("mixed", {}), text("done"))
    await session.send_message("go")
    assert await storage.get_state("s") == {"a": "async", "b": "sync"}
    await storage.close()


async def test_sync_changes_in_the_text_protocol_are_stored_with_the_observation(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    storage = sqlite(tmp_path)
    session = await open_session(server, storage, tools=[bump], react_mode="text")
    server.add_reply(
        text(json.dumps({"thought": "count", "action": "bump", "action_input": {}})),
        text(json.dumps({"final_answer": "counted"})),
    )
    result = await session.send_message("go")
    assert result.result == "counted"
    assert await storage.get_state("s") == {"n": 1}
    await storage.close()


# -- a crash between the two writes ---------------------------------------------------------


async def crash_then_turn(
    server: FakeOpenAIServer, tmp_path: Path, where: str
) -> tuple[ConversationStorage, Session, list[str]]:
    """A child process adds to the cart and is killed at ``where``; then one turn here.

    Returns the storage, the session and the roles stored when the child died.
    """
    url = f"sqlite:///{tmp_path / 's.db'}"
    server.add_reply(tool_call("add_to_cart", {"item": "Widget", "quantity": 2}))
    out = subprocess.run(
        [sys.executable, str(HERE / "cart_crash_child.py"), url, "s", server.base_url, where],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 3, out.stdout + out.stderr
    storage = open_storage(url)
    roles = [m.role for m in await storage.load("s")]
    server.add_reply(text("next answer"))
    session = await open_session(server, storage)
    await session.send_message("and now?")
    return storage, session, roles


def tool_results(session: Session) -> list[str]:
    return [m.text for m in session.history if m.role == "tool"]


async def test_killed_after_the_state_write_the_result_is_stored_on_the_next_turn(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    storage, session, roles = await crash_then_turn(server, tmp_path, "after-state")
    assert roles == ["user", "assistant"]
    # the result that went with the stored state change, not "interrupted"
    assert tool_results(session) == ["Added 2x Widget."]
    assert session.state.to_dict() == {"cart": [{"item": "Widget", "quantity": 2}]}
    assert JOURNAL_KEY not in session.state.keys(internal=True)
    sent = server.requests[-1]["messages"]
    assert any(m.get("content") == "Added 2x Widget." for m in sent)
    await storage.close()


async def test_killed_inside_the_tool_neither_its_change_nor_a_result_is_kept(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    storage, session, _ = await crash_then_turn(server, tmp_path, "in-tool")
    assert tool_results(session) == [INTERRUPTED_RESULT]
    assert session.state.keys(internal=True) == []
    await storage.close()


async def test_a_journal_that_does_not_fit_the_history_is_dropped(tmp_path: Path) -> None:
    """The state is anyone's to edit: a stale or forged journal stores nothing."""
    from conversa.agent import restore_journaled_result
    from conversa.transcript import Transcript

    storage = sqlite(tmp_path)
    await storage.append("s", [ChatMessage.user("hi"), ChatMessage.assistant("hello")])
    transcript = Transcript(storage, "s")
    await transcript.refresh()
    state = SessionState(storage, "s")
    for journal in [
        {"after": "someone-else", "message": ChatMessage.tool("c1", "x").to_dict()},
        {"after": transcript.messages[-1].id, "message": {"role": "nonsense"}},
        "not a dict",
    ]:
        await state.set(JOURNAL_KEY, journal)
        await restore_journaled_result(transcript, state)
        assert len(await storage.load("s")) == 2 and not state.has(JOURNAL_KEY)
    await storage.close()
