"""session.flow: falai's route, step, route history and collected data, kept with the info."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conversa import (
    ChatMessage,
    FlowError,
    InMemoryStorage,
    RouteVisit,
    SessionFlow,
    create_session,
    open_storage,
    tool,
)
from conversa.cli._app import cli
from conversa.flow import Flow, info_lines
from conversa.storage import ConversationStorage
from conversa.storage.base import FLOW_HISTORY_LIMIT
from conversa.testing.replies import tool_call
from conversa.testing.scripted import ScriptedModel

T0 = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)


class Clock:
    """A clock the test moves: each reading is a minute after the last."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture(params=["memory", "file", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return {
        "memory": "memory://",
        "file": str(tmp_path / "sessions"),
        "sqlite": f"sqlite:///{tmp_path / 'sessions.db'}",
    }[request.param]


async def test_enter_step_collect_complete() -> None:
    storage = InMemoryStorage()
    clock = Clock()
    flow = Flow(storage, "s", clock=clock)
    assert flow.current is None and flow.history == () and flow.data() == {}
    await flow.enter("greet")
    await flow.complete()
    await flow.enter("book", step="ask_destination")
    await flow.collect({"destination": "Paris"})
    await flow.step("ask_date")
    await flow.collect({"date": "2024-06-01"})
    current = flow.current
    assert current is not None
    assert (current.route, current.step) == ("book", "ask_date")
    assert current.entered_at == T0 + timedelta(minutes=3)
    assert current.step_entered_at == T0 + timedelta(minutes=5)
    assert flow.data() == {"destination": "Paris", "date": "2024-06-01"}
    assert flow.data("greet") == {}
    assert flow.history == (
        RouteVisit("greet", T0 + timedelta(minutes=1), T0 + timedelta(minutes=2), True),
        RouteVisit("book", T0 + timedelta(minutes=3)),
    )
    # what is stored is what the flow says, read without the history
    info = await storage.get_info("s")
    assert info is not None and info.flow == flow.position and info.message_count == 0
    assert info.flow.current_data == flow.data()
    # entering another route leaves this one uncompleted; coming back resumes its data
    await flow.enter("faq")
    await flow.enter("book")
    assert flow.data() == {"destination": "Paris", "date": "2024-06-01"}
    assert flow.current is not None and flow.current.step is None
    assert [(v.route, v.completed, v.exited_at is None) for v in flow.history] == [
        ("greet", True, False),
        ("book", False, False),
        ("faq", False, False),
        ("book", False, True),
    ]
    await flow.set_data({"destination": "Rome"})
    assert flow.data() == {"destination": "Rome"}
    await flow.leave()
    assert flow.current is None and flow.route is None
    assert flow.history[-1].exited_at is not None and not flow.history[-1].completed
    assert flow.data("book") == {"destination": "Rome"}  # kept after leaving
    copy = flow.data("book")
    copy["destination"] = "changed"
    assert flow.data("book") == {"destination": "Rome"}
    await flow.reset()
    info = await storage.get_info("s")
    assert info is not None and info.flow == SessionFlow()


async def test_misuse_is_refused_and_nothing_is_stored() -> None:
    storage = InMemoryStorage()
    flow = Flow(storage, "s")
    for change in (flow.step("x"), flow.complete(), flow.leave(), flow.collect({"a": 1})):
        with pytest.raises(FlowError, match="in no route"):
            await change
    assert not await storage.exists("s")
    with pytest.raises(ValueError):
        await flow.enter("")
    with pytest.raises(ValueError):
        await flow.enter("r", step="bad\x1b[31m")
    await flow.enter("r")
    with pytest.raises(ValueError):
        await flow.collect({"x": object()})
    with pytest.raises(FlowError):
        await flow.collect({1: "x"})  # type: ignore[dict-item]
    with pytest.raises(FlowError):
        await flow.collect(["x"])  # type: ignore[arg-type]
    assert flow.data() == {}
    await flow.collect({"x": 1}, route="other")  # another route's data, by name
    assert flow.data("other") == {"x": 1} and flow.route == "r"


async def test_the_history_keeps_the_newest_visits() -> None:
    flow = Flow(InMemoryStorage(), "s", clock=Clock())
    for i in range(FLOW_HISTORY_LIMIT + 5):
        await flow.enter(f"r{i}")
    assert len(flow.history) == FLOW_HISTORY_LIMIT
    assert flow.history[0].route == "r5" and flow.history[-1].route == f"r{FLOW_HISTORY_LIMIT + 4}"


async def test_a_turns_messages_carry_the_route_and_step(url: str) -> None:
    """Every message a turn stores names the route and step it was stored in, as falai's
    message rows do; a tool that moves the flow moves the messages after it."""

    @tool
    async def choose_destination(destination: str, session: Any) -> str:
        """Record the destination and go on to the date."""
        await session.flow.collect({"destination": destination})
        await session.flow.step("ask_date")
        return f"going to {destination}"

    model = ScriptedModel(
        ["Hi!", tool_call("choose_destination", {"destination": "Paris"}), "When do you fly?"]
    )
    session = await create_session("s", url, model=model, tools=[choose_destination])
    plain = await session.send_message("hello")  # in no route: nothing added
    assert all("route" not in m.metadata for m in plain.messages)
    await session.flow.enter("book", step="ask_destination")
    result = await session.send_message("Paris please")
    stamps = [(m.role, m.metadata.get("route"), m.metadata.get("step")) for m in result.messages]
    assert stamps == [
        ("user", "book", "ask_destination"),
        ("assistant", "book", "ask_destination"),
        ("tool", "book", "ask_date"),
        ("assistant", "book", "ask_date"),
    ]
    stored = (await session.storage.load("s"))[-4:]
    assert [m.to_dict() for m in stored] == [m.to_dict() for m in result.messages]
    assert result.messages[2].metadata["tool"] == "choose_destination"  # its own metadata kept
    info = await session.storage.get_info("s")
    assert info is not None and info.flow.step == "ask_date"
    assert info.flow.data == {"book": {"destination": "Paris"}}
    # a message that names its own route keeps it
    own = ChatMessage.user("x", metadata={"route": "mine"})
    again = await session.send_message(own)
    assert again.messages[0].metadata == {"route": "mine"}
    assert again.messages[1].metadata.get("route") == "book"
    await session.close()


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_the_flow_survives_a_restart_and_another_process_sees_it(
    kind: str, tmp_path: Path
) -> None:
    url = str(tmp_path / "sessions") if kind == "file" else f"sqlite:///{tmp_path / 's.db'}"
    first = await create_session("s", url, model=ScriptedModel(["ok"]), user_id="ann")
    await first.flow.enter("book", step="ask_date")
    await first.flow.collect({"destination": "Paris"})
    await first.close()
    # a new Session (as after a restart) reads the stored position when it opens
    second = await create_session("s", url, model=ScriptedModel(["ok"]))
    assert second.flow.current is not None and second.flow.current.step == "ask_date"
    assert second.flow.data() == {"destination": "Paris"}
    # a change made elsewhere is read before the next turn, and stamps its messages
    async with open_storage(url) as other:
        await Flow(other, "s").step("confirm")
        assert [i.session_id for i in await other.find_sessions(route="book")] == ["s"]
    result = await second.send_message("yes")
    assert result.messages[0].metadata == {"route": "book", "step": "confirm"}
    await second.close()


class NoHistoryStorage(InMemoryStorage):
    """Memory storage that fails any read of the history: the info must not need one."""

    reading = True

    async def load(self, session_id: str) -> list[ChatMessage]:
        assert self.reading, "the history was read"
        return await super().load(session_id)

    async def _tail(self, session_id: str, n: int) -> list[ChatMessage]:
        assert self.reading, "the history was read"
        return await super()._tail(session_id, n)


async def test_the_flow_is_read_without_the_history() -> None:
    storage = NoHistoryStorage()
    await storage.append("s", [ChatMessage.user(f"m{i}") for i in range(50)])
    storage.reading = False
    flow = Flow(storage, "s")
    await flow.enter("book")
    await flow.collect({"a": 1})
    assert (await flow.reload()).route == "book"
    found = await storage.find_sessions(route="book")
    assert [i.flow.data for i in found] == [{"book": {"a": 1}}]


async def test_falai_lifecycle_recipes(url: str) -> None:
    async with open_storage(url) as storage:
        await storage.update_info("old", user_id="ann", status="completed")
        await storage.update_info("new", user_id="ann")
        # "the active session of a user"
        (active,) = await storage.find_sessions(user_id="ann", status="active", limit=1)
        assert active.session_id == "new" and active.completed_at is None
        # "complete / abandon a session"
        done = await storage.update_info("new", status="abandoned")
        assert done.completed_at is not None
        assert await storage.find_sessions(user_id="ann", status="active", limit=1) == []


def test_sessions_show_prints_the_flow_and_status(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"

    async def fill(storage: ConversationStorage) -> None:
        await storage.append("trip", [ChatMessage.user("book me a flight")])
        flow = Flow(storage, "trip", clock=Clock())
        await flow.enter("greet")
        await flow.complete()
        await flow.enter("book", step="ask_date")
        await flow.collect({"destination": "Paris"})
        await storage.update_info("trip", status="completed")

    async def main() -> None:
        async with open_storage(url) as storage:
            await fill(storage)

    asyncio.run(main())
    shown = CliRunner().invoke(cli, ["sessions", "show", "trip"], env={"CONVERSA_STORAGE": url})
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert "flow: route 'book', step 'ask_date' (entered 2024-05-01 09:33 UTC)" in out
    assert "routes: greet (completed), book (current)" in out
    assert 'collected: {"book": {"destination": "Paris"}}' in out
    assert "status: completed at " in out
    assert "Traceback" not in out


def test_info_lines_for_a_session_without_a_flow() -> None:
    from conversa.storage._stored import SessionInfo

    plain = SessionInfo("s", T0, T0, 0)
    assert list(info_lines(plain)) == []
    many = SessionInfo(
        "s",
        T0,
        T0,
        0,
        flow=SessionFlow(
            history=tuple(RouteVisit(f"r{i}", T0, T0) for i in range(12)),
            data={"r": {"text": "x" * 500}},
        ),
    )
    lines = list(info_lines(many))
    assert lines[0] == "flow: in no route"
    assert lines[1].startswith("routes: … 4 earlier, r4 (left)")
    assert len(lines[2]) <= len("collected: ") + 200 and lines[2].endswith("…")


@pytest.mark.parametrize(
    "reserved",
    [
        '{"flow.route": 5, "flow.history": "no", "flow.data": [1]}',
        '{"flow.route": "r", "flow.entered_at": "x", "flow.history": [{"route": 1}, 7]}',
        '{"flow.route": "r", "flow.history": [{"route": "r", "entered_at": 1e400}]}',
        "not json at all",
    ],
)
async def test_a_hand_edited_flow_reads_safely(tmp_path: Path, reserved: str) -> None:
    path = tmp_path / "sessions.db"
    url = f"sqlite:///{path}"
    async with open_storage(url) as storage:
        await storage.append("s", [ChatMessage.user("q")])
        await Flow(storage, "s").enter("r")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE sessions SET reserved = ?", (reserved,))
    async with open_storage(url) as storage:
        if reserved.startswith("not"):
            # the damage is named, and the route filter leaves the session out, no traceback
            assert await storage.find_sessions(route="r") == []
            return
        info = await storage.get_info("s")
        assert info is not None and info.flow.history == ()
        assert info.flow.entered_at is None
        # and the flow can be set again over it
        flow = Flow(storage, "s")
        await flow.enter("fresh")
        info = await storage.get_info("s")
        assert info is not None and info.flow.route == "fresh"
        assert (
            json.loads(
                sqlite3.connect(path).execute("SELECT reserved FROM sessions").fetchone()[0]
            )["flow.route"]
            == "fresh"
        )
