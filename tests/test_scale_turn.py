"""Costs that must not grow with the history: the turn's prompt, resuming with a context window,
and what `import conversa` + create_session imports (issue 11, targets 3, 5 and 6)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from conversa import (
    ChatMessage,
    ConversaError,
    InMemoryStorage,
    ToolCall,
    create_session,
    create_session_sync,
)
from conversa._prompt_history import INTERRUPTED_RESULT
from conversa.context import estimate_tokens, trim
from conversa.testing.scripted import ScriptedModel


class CountingStorage(InMemoryStorage):
    """In-memory storage that counts whole-history reads."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    async def load(self, session_id: str) -> list[ChatMessage]:
        self.loads += 1
        return await super().load(session_id)


def long_history(n: int, *, tools_every: int = 7) -> list[ChatMessage]:
    """``n`` exchanges (user, [tool call, result,] answer), some 300 characters long."""
    out: list[ChatMessage] = []
    for i in range(n):
        out.append(ChatMessage.user(f"question {i} " + "x" * (i % 5) * 60))
        if i % tools_every == 0:
            call = ToolCall(f"c{i}", "add", '{"a": 1, "b": 2}')
            out.append(ChatMessage.assistant(tool_calls=[call]))
            out.append(ChatMessage.tool(f"c{i}", "3"))
        out.append(ChatMessage.assistant(f"answer {i} " + "y" * (i % 3) * 100))
    return out


# -- target 5: resuming reads what the prompt can hold ---------------------------------------


async def test_resuming_with_a_window_reads_no_whole_history_but_history_loads_on_demand() -> None:
    store = CountingStorage()
    stored = long_history(2_000)
    await store.save("s", stored)
    model = ScriptedModel()
    session = await create_session("s", store, model=model, context_window=500)
    assert store.loads == 0
    assert session.message_count() == len(stored)
    await session.send_message("newest")
    assert store.loads == 0
    assert model.requests[0].messages[-1]["content"] == "newest"
    with pytest.raises(ConversaError, match="load_history"):
        session.history  # noqa: B018 (the property is what is tested)
    everything = await session.load_history()
    assert [m.id for m in everything] == [m.id for m in await store.load("s")]
    assert len(everything) == len(stored) + 2
    assert session.history == everything


async def test_a_lazily_resumed_session_sends_the_prompt_a_fully_loaded_one_sends() -> None:
    history = long_history(600)
    prompts = []
    for window in (None, 700):
        store = InMemoryStorage()
        await store.save("s", history)
        model = ScriptedModel()
        session = await create_session("s", store, model=model, context_window=window)
        session.context_window = 700  # the first session loaded everything; same window now
        await session.send_message("newest")
        await session.send_message("and again")
        prompts.append([r.messages for r in model.requests])
    assert prompts[0] == prompts[1]
    sent = prompts[1][0]
    assert sent[0]["role"] == "user"  # a turn's start: no result without its call
    assert 3 < len(sent) < 100


async def test_undo_and_retry_reach_back_past_what_was_read() -> None:
    store = CountingStorage()
    history = long_history(300, tools_every=1)  # every exchange: user, call, result, answer
    await store.save("s", history)
    session = await create_session("s", store, model=ScriptedModel(), context_window=60)
    assert store.loads == 0
    for _ in range(40):  # far beyond the few exchanges a 60-token window holds
        removed = await session.undo()
        assert [m.role for m in removed] == ["user", "assistant", "tool", "assistant"]
    assert await store.count("s") == len(history) - 160
    result = await session.retry()
    assert result.success
    stored = await store.load("s")
    assert stored[-2].text.startswith("question 259 ")
    assert [m.id for m in stored[:-1]] == [m.id for m in history[: len(history) - 163]]
    assert session.message_count() == len(stored)


async def test_a_dangling_call_at_the_end_of_a_long_session_is_answered_on_resume() -> None:
    store = InMemoryStorage()
    call = ToolCall("last", "add", "{}")
    await store.save(
        "s", [*long_history(500), ChatMessage.user("q"), ChatMessage.assistant(tool_calls=[call])]
    )
    model = ScriptedModel()
    session = await create_session("s", store, model=model, context_window=300)
    await session.send_message("next")
    stored = await store.tail("s", 4)
    assert [m.role for m in stored] == ["assistant", "tool", "user", "assistant"]
    assert stored[1].text == INTERRUPTED_RESULT
    assert [m["role"] for m in model.requests[0].messages][-4:] == [
        "user",
        "assistant",
        "tool",
        "user",
    ]


async def test_a_lazily_resumed_session_sees_what_another_process_stored() -> None:
    store = CountingStorage()
    await store.save("s", long_history(1_000))
    model = ScriptedModel()
    session = await create_session("s", store, model=model, context_window=400)
    await store.append("s", [ChatMessage.user("from elsewhere"), ChatMessage.assistant("seen")])
    await session.send_message("mine")
    sent = [m["content"] for m in model.requests[0].messages]
    assert sent[-3:] == ["from elsewhere", "seen", "mine"]
    assert session.message_count() == await store.count("s")
    assert store.loads == 0


async def test_dropping_the_window_reads_the_whole_history_for_the_prompt() -> None:
    store = InMemoryStorage()
    await store.save("s", long_history(200))
    model = ScriptedModel()
    session = await create_session("s", store, model=model, context_window=100)
    session.context_window = None
    await session.send_message("all of it")
    assert len(model.requests[0].messages) == await store.count("s") - 1
    assert len(session.history) == await store.count("s")


# -- target 3: a turn's prompt costs what it sends ---------------------------------------------


def reference_trim(
    system: list[dict[str, Any]], messages: list[dict[str, Any]], budget: int, keep: int | None
) -> list[dict[str, Any]]:
    """The forward algorithm trim had before (every unit costed): the behaviour to keep."""
    units, i = [], 0
    while i < len(messages):
        j = i + 1
        if messages[i].get("tool_calls"):
            while j < len(messages) and messages[j].get("role") == "tool":
                j += 1
        units.append((i, j))
        i = j
    cost = [sum(estimate_tokens(messages[k]) for k in range(a, b)) for a, b in units]
    left = budget - sum(estimate_tokens(m) for m in system)
    if keep is None:
        keep = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    newest = None if keep is None else next(u for u, (a, b) in enumerate(units) if a <= keep < b)
    chosen, u = set(), len(units) - 1
    while u >= 0 and u != newest and cost[u] <= left:
        chosen.add(u)
        left -= cost[u]
        u -= 1
    if newest is not None:
        chosen.add(newest)
        left -= cost[newest]
        if u == newest:
            u -= 1
            while u >= 0 and cost[u] <= left:
                chosen.add(u)
                left -= cost[u]
                u -= 1
    return system + [
        messages[k] for u, (a, b) in enumerate(units) if u in chosen for k in range(a, b)
    ]


def random_wire(rng: random.Random, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        kind = rng.random()
        if kind < 0.3:
            out.append({"role": "user", "content": "u" * rng.randint(0, 200)})
        elif kind < 0.5:
            calls = rng.randint(1, 3)
            out.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": str(c), "function": {}} for c in range(calls)],
                }
            )
            out.extend(
                {"role": "tool", "content": "r" * rng.randint(0, 300), "tool_call_id": str(c)}
                for c in range(rng.randint(0, calls))
            )
        elif kind < 0.55:
            out.append({"role": "tool", "content": "orphan", "tool_call_id": "x"})
        else:
            out.append({"role": "assistant", "content": "a" * rng.randint(0, 400)})
    return out


def test_trim_from_the_newest_end_keeps_what_the_forward_trim_kept() -> None:
    rng = random.Random(11)
    for _ in range(400):
        messages = random_wire(rng, rng.randint(0, 40))
        system = (
            [{"role": "system", "content": "s" * rng.randint(0, 100)}] if rng.random() < 0.5 else []
        )
        budget = rng.randint(0, 600)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        keep = rng.choice([None, *users]) if users else None
        assert trim(system, messages, budget, keep=keep) == reference_trim(
            system, messages, budget, keep
        )


def test_trim_counts_only_what_it_keeps() -> None:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "w" * 40} for i in range(20_000)
    ]
    counted: list[int] = []

    def counter(message: dict[str, Any]) -> int:
        counted.append(1)
        return estimate_tokens(message)

    kept = trim([], messages, 140, counter)
    assert kept == messages[-10:]
    assert len(counted) <= 11  # the ten kept and the one that did not fit


async def test_without_a_window_the_model_gets_the_kept_wire_list_not_a_copy() -> None:
    seen: list[Sequence[dict[str, Any]]] = []

    class Recorder(ScriptedModel):
        async def complete(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
            seen.append(messages)
            return await super().complete(messages, **kwargs)

    store = InMemoryStorage()
    await store.save("s", long_history(50))
    session = await create_session("s", store, model=Recorder())
    await session.send_message("one")
    await session.send_message("two")
    # one list, kept up to date message by message: no turn copies the history
    assert seen[0] is seen[1] is session._transcript.cache.live_wire


# -- target 6: what creating a session imports -------------------------------------------------

HEAVY = ("httpx", "rich", "prompt_toolkit", "openai", "pydantic", "click", "pygments")


def loaded_after(code: str) -> list[str]:
    probe = code + f"\nimport sys\nprint('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOADED"))
    return eval(line.removeprefix("LOADED "))


def test_creating_a_session_imports_no_heavy_library() -> None:
    code = "import conversa, asyncio\nasyncio.run(conversa.create_session('x', 'memory://'))"
    assert loaded_after(code) == []


def test_a_session_with_tools_imports_what_tools_need_but_not_httpx() -> None:
    code = (
        "import asyncio, conversa\n"
        "def add(a: int, b: int) -> int:\n"
        "    'Add.'\n"
        "    return a + b\n"
        "asyncio.run(conversa.create_session('x', 'memory://', tools=[add]))"
    )
    assert loaded_after(code) == ["pydantic"]


def test_the_chat_prompt_needs_no_tools_markdown_or_http() -> None:
    code = (
        "from conversa.cli._factory import load_tools\n"
        "from conversa.cli.render import RichOutput\n"
        "assert load_tools(None) == []\n"
        "RichOutput().note('resumed')\n"
        "import sys\n"
        "assert 'rich.markdown' not in sys.modules and 'rich.live' not in sys.modules\n"
    )
    assert loaded_after(code) == ["rich"]


def test_sync_session_history_reads_everything_of_a_windowed_session(tmp_path: Path) -> None:
    """SyncSession.history blocks to read the rest, where Session.history would refuse."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    history = [ChatMessage.user(f"q{i} " + "x" * 400) for i in range(200)]
    first = create_session_sync("long", url, model=ScriptedModel())
    first._run(first.session.storage.save("long", history))
    first.close()
    windowed = create_session_sync("long", url, model=ScriptedModel(), context_window=500)
    try:
        assert [m.text for m in windowed.history] == [m.text for m in history]
    finally:
        windowed.close()
