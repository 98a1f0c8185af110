"""Compaction that never loses history, and token accounting that is right (issue 14).

Against the strict fake server: a request with a tool call cut from its results would be
rejected there (400), so every turn that succeeds proves the pairs stayed intact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conversa import (
    DEFAULT_SUMMARY_PROMPT,
    ChatMessage,
    Compaction,
    InMemoryStorage,
    OpenAIChatModel,
    UsageTotals,
    create_session,
    tool,
)
from conversa.compaction import (
    MAX_SUMMARY_CALLS,
    SUMMARY_INTRO,
    choose_cut,
    summary_range,
    summary_request,
)
from conversa.context import Calibration, estimate_tokens
from conversa.storage import open_storage
from conversa.testing.replies import Reply, raw_completion, server_error, text, tool_call
from conversa.testing.server import FakeOpenAIServer

WINDOW = 1500
FILLER = "the quick brown fox jumps over the lazy dog " * 9  # ~400 chars, ~100 tokens
TURNS = 20
LONG = 32


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def is_summary_request(request: dict[str, Any]) -> bool:
    first = request["messages"][0]
    return first["role"] == "system" and first["content"] == DEFAULT_SUMMARY_PROMPT


def responder(summary: Reply | None = None) -> Any:
    """Summaries for summary requests, a tool call for "add", a short text otherwise."""

    def reply(request: dict[str, Any]) -> Reply:
        messages = request["messages"]
        if is_summary_request(messages and request):
            assert "tools" not in request  # the summary call offers no tools
            return summary or text("SUMMARY: the user is called Ada and likes foxes.")
        last = messages[-1]
        if last["role"] == "user" and "please add" in str(last["content"]):
            return tool_call("add", {"a": 2, "b": 3})
        return text("noted " + ("x" if last["role"] != "tool" else "5"))

    return reply


def model_for(server: FakeOpenAIServer) -> OpenAIChatModel:
    return OpenAIChatModel("fake-model", base_url=server.base_url, api_key="test", max_retries=0)


def turn_text(i: int) -> str:
    extra = " please add 2 and 3" if i % 3 == 2 else ""
    return f"Turn {i}: my name is Ada. {FILLER}{extra}"


def server_tokens(request: dict[str, Any]) -> int:
    """The prompt tokens the fake server reports for a request: its words, one more each."""
    return sum(len(str(m.get("content") or "").split()) + 1 for m in request["messages"])


def summaries(history: list[ChatMessage]) -> list[ChatMessage]:
    return [m for m in history if summary_range(m) is not None]


async def chat(session: Any, turns: range) -> None:
    for i in turns:
        result = await session.send_message(turn_text(i))
        assert result.success, result.error


async def test_long_chat_compacts_and_keeps_every_message(server: FakeOpenAIServer) -> None:
    server.default_reply = responder()
    store = InMemoryStorage()
    session = await create_session(
        "s", store, model=model_for(server), tools=[add], context_window=WINDOW, compaction=True
    )
    await chat(session, range(LONG))
    requests = server.requests
    kinds = [is_summary_request(r) for r in requests]
    assert any(kinds), "no summary request was made"
    first = kinds.index(True)
    # the summary request: user messages verbatim, no tools
    body = requests[first]["messages"][1]["content"]
    assert turn_text(0) in body
    # after it, every prompt starts with the summary and leaves the oldest turns out
    for request in requests[first + 1 :]:
        if is_summary_request(request):
            continue
        system = request["messages"][0]["content"]
        assert SUMMARY_INTRO in system and "the user is called Ada" in system
        assert all("Turn 0:" not in str(m.get("content")) for m in request["messages"][1:])
        assert server_tokens(request) <= WINDOW
    # storage holds every original message plus the summary records
    stored = await store.load("s")
    records = summaries(stored)
    assert records
    originals = [m for m in stored if summary_range(m) is None]
    users = [m.text for m in originals if m.role == "user"]
    assert users == [turn_text(i) for i in range(LONG)]
    assert sum(1 for m in originals if m.role == "tool") == len(
        [i for i in range(LONG) if i % 3 == 2]
    )
    ids = [m.id for m in stored]
    for record in records:
        covers = summary_range(record)
        assert covers is not None
        assert covers.first_id == ids[0]  # the next summary folds in the previous one
        assert ids.index(covers.last_id) < ids.index(record.id)
        meta = record.metadata["compaction"]
        assert meta["model"] == "fake-model"
        assert meta["tokens_after"] < meta["tokens_before"]
    # the newest summary of several covers more than the first
    assert len(records) > 1
    if len(records) > 1:
        spans = [summary_range(r).covered for r in records]  # type: ignore[union-attr]
        assert spans == sorted(spans) and spans[0] < spans[-1]
    # totals match the sum of the stored usage, kept without reading the history
    info = await store.get_info("s")
    assert info is not None
    prompt = sum(m.metadata["usage"]["prompt_tokens"] for m in stored if "usage" in m.metadata)
    completion = sum(
        m.metadata["usage"]["completion_tokens"] for m in stored if "usage" in m.metadata
    )
    calls = sum(1 for m in stored if "usage" in m.metadata)
    assert calls == len(requests)
    assert info.usage == UsageTotals(prompt, completion, calls)
    status = await session.context_status()
    assert status.summarized > 0 and status.sent < status.messages
    assert status.tokens <= WINDOW


async def test_restart_and_a_second_process_use_the_stored_summary(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    server.default_reply = responder()
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    session = await create_session(
        "s", url, model=model_for(server), tools=[add], context_window=WINDOW, compaction=True
    )
    await chat(session, range(LONG))
    await session.close()
    store = open_storage(url)
    stored = await store.load("s")
    summary = summaries(stored)[-1]
    await store.close()

    # a restart: the resumed session reads from the summary on and sends it
    server.clear_requests()
    again = await create_session(
        "s", url, model=model_for(server), tools=[add], context_window=WINDOW, compaction=True
    )
    with pytest.raises(Exception, match="only its newest messages are loaded"):
        _ = again.history
    result = await again.send_message("what is my name?")
    assert result.success
    sent = next(r for r in server.requests if not is_summary_request(r))["messages"]
    assert summary.text in sent[0]["content"]
    assert sent[-1]["content"] == "what is my name?"
    await again.close()

    # another process: the same summary goes into its prompt
    server.clear_requests()
    script = (
        "import asyncio, sys\n"
        "from conversa import OpenAIChatModel, create_session\n"
        "async def main():\n"
        "    model = OpenAIChatModel('fake-model', base_url=sys.argv[2], api_key='t')\n"
        "    s = await create_session('s', sys.argv[1], model=model, context_window=1500,\n"
        "                             compaction=True)\n"
        "    r = await s.send_message('and from elsewhere?')\n"
        "    print(r.success)\n"
        "    await s.close()\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, url, server.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    sent = next(r for r in server.requests if not is_summary_request(r))["messages"]
    assert SUMMARY_INTRO in sent[0]["content"]
    assert sent[-1]["content"] == "and from elsewhere?"


async def test_a_failing_summary_call_leaves_the_turn_working(server: FakeOpenAIServer) -> None:
    server.default_reply = responder(summary=server_error(500))
    store = InMemoryStorage()
    session = await create_session(
        "s", store, model=model_for(server), context_window=WINDOW, compaction=True
    )
    warned = []
    for i in range(TURNS):
        result = await session.send_message(turn_text(3 * i))  # no tool calls
        assert result.success, result.error
        warned += result.warnings
    assert warned and "compaction failed" in warned[0]
    summary_calls = [r for r in server.requests if is_summary_request(r)]
    # tried once per turn at most, and again on later turns
    assert len(summary_calls) >= 2
    assert len(summary_calls) <= TURNS
    stored = await store.load("s")
    assert not summaries(stored)
    assert len(stored) == 2 * TURNS
    # the prompts were trimmed to the window meanwhile
    last = [r for r in server.requests if not is_summary_request(r)][-1]
    assert server_tokens(last) <= WINDOW


async def test_a_summary_that_does_not_shrink_the_prompt_is_discarded(
    server: FakeOpenAIServer,
) -> None:
    server.default_reply = responder(summary=text("blah " * 2000))
    store = InMemoryStorage()
    session = await create_session(
        "s", store, model=model_for(server), context_window=WINDOW, compaction=True
    )
    for i in range(16):
        assert (await session.send_message(turn_text(3 * i))).success
    assert any(is_summary_request(r) for r in server.requests)
    assert not summaries(await store.load("s"))
    forced = await session.compact()
    assert forced.summary is None and forced.failed
    assert "did not make the prompt smaller" in forced.reason


async def test_compact_forces_a_summary_and_respects_turn_boundaries(
    server: FakeOpenAIServer,
) -> None:
    server.default_reply = responder()
    store = InMemoryStorage()
    session = await create_session("s", store, model=model_for(server), tools=[add])
    for i in range(6):
        assert (await session.send_message(turn_text(i))).success
    result = await session.compact()
    assert result.summary is not None, result.reason
    stored = await store.load("s")
    covers = summary_range(stored[-1])
    assert covers is not None
    last = next(i for i, m in enumerate(stored) if m.id == covers.last_id)
    assert stored[last + 1].role == "user"  # the verbatim part starts a turn
    assert (await session.send_message("next")).success
    sent = server.requests[-1]["messages"]
    assert SUMMARY_INTRO in sent[0]["content"]
    assert sent[1]["role"] == "user" and sent[1]["content"] == stored[last + 1].text
    info = await store.get_info("s")
    assert info is not None and info.usage.calls == len(server.requests)


async def test_a_first_summary_covers_the_messages_older_than_the_loaded_part(
    server: FakeOpenAIServer,
) -> None:
    server.default_reply = responder()
    store = InMemoryStorage()
    # only trimmed for a long while: the session outgrew its window before compaction
    session = await create_session("s", store, model=model_for(server), context_window=WINDOW)
    for i in range(2 * LONG):  # more than a resume reads at first
        assert (await session.send_message(turn_text(3 * i))).success
    server.clear_requests()
    again = await create_session(
        "s", store, model=model_for(server), context_window=WINDOW, compaction=True
    )
    assert again._transcript.base > 0  # a resume reads only the newest part
    assert (await again.send_message("what is my name?")).success
    asked = [r for r in server.requests if is_summary_request(r)]
    # the older messages came in chunks, each request fitting the window, few of them
    assert 1 < len(asked) <= MAX_SUMMARY_CALLS
    assert turn_text(0) in asked[0]["messages"][1]["content"]
    assert all(sum(estimate_tokens(m) for m in r["messages"]) <= WINDOW for r in asked)
    # each chunk folds in the summary so far
    assert "[Earlier summary]" in asked[1]["messages"][1]["content"]
    stored = await store.load("s")
    (record,) = summaries(stored)
    covers = summary_range(record)
    assert covers is not None and covers.first_id == stored[0].id
    last = [m.id for m in stored].index(covers.last_id)
    assert covers.covered == last + 1  # every message before the cut
    info = await store.get_info("s")
    assert info is not None and info.usage.calls == len(server.requests) + 2 * LONG


async def test_a_resume_after_a_turn_bigger_than_the_window_finds_the_summary(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    server.default_reply = responder()
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    session = await create_session(
        "s", url, model=model_for(server), context_window=WINDOW, compaction=True
    )
    await chat(session, range(0, 3 * LONG, 3))
    huge = "Here is a long paste. " + FILLER * 20  # ~2,000 tokens: more than the window
    assert (await session.send_message(huge)).success
    assert (await session.send_message("thanks")).success
    await session.close()
    store = open_storage(url)
    stored = await store.load("s")
    newest = summaries(stored)[-1]
    info = await store.get_info("s")
    await store.close()
    assert info is not None and info.summary_mark is not None
    assert stored[info.summary_mark.at].id == newest.id

    server.clear_requests()
    again = await create_session(
        "s", url, model=model_for(server), context_window=WINDOW, compaction=True
    )
    transcript = again._transcript
    # read from the summary's covered end on, not the whole history
    assert transcript.base > 0 and transcript.cache.summary is not None
    assert transcript.cache.summary.id == newest.id
    assert (await again.send_message("what is my name?")).success
    sent = next(r for r in server.requests if not is_summary_request(r))["messages"]
    assert newest.text in sent[0]["content"]
    assert sent[-1]["content"] == "what is my name?"
    await again.close()


def test_choose_cut_keeps_the_newest_turn_and_recent_tokens() -> None:
    from conversa import ToolCall

    call = ToolCall("c1", "add", "{}")
    history = [
        ChatMessage.user("u0"),
        ChatMessage.assistant("a0"),
        ChatMessage.user("u1"),
        ChatMessage.assistant(tool_calls=[call]),
        ChatMessage.tool("c1", "5"),
        ChatMessage.assistant("a1"),
        ChatMessage.user("u2"),
        ChatMessage.assistant("a2"),
    ]
    costs = [10] * len(history)
    assert choose_cut(history, costs, 0) == 6  # the newest turn stays, whatever the share
    assert choose_cut(history, costs, 30) == 2  # never inside the tool-call turn
    assert choose_cut(history, costs, 70) is None  # nothing left to summarize
    assert choose_cut(history[:2], costs[:2], 0) is None


def test_summary_request_keeps_user_words_and_shortens_tool_output_first() -> None:
    history = [
        ChatMessage.user("keep me word for word " * 10),
        ChatMessage.assistant(tool_calls=[tool_call_of("c")]),
        ChatMessage.tool("c", "tool output " * 500, metadata={"tool": "add"}),
        ChatMessage.assistant("fine"),
    ]
    request = summary_request("P", history, "earlier", 400, estimate_tokens)
    body = request[1]["content"]
    assert "keep me word for word " * 10 in body
    assert "characters left out" in body and "[Earlier summary]\nearlier" in body
    assert sum(estimate_tokens(m) for m in request) <= 400


def tool_call_of(cid: str) -> Any:
    from conversa import ToolCall

    return ToolCall(cid, "add", '{"a": 1}')


def test_compaction_options_are_checked() -> None:
    with pytest.raises(ValueError):
        Compaction(threshold=0)
    with pytest.raises(ValueError):
        Compaction(keep_recent=1)
    with pytest.raises(ValueError):
        Compaction(prompt=" ")


def test_calibration_is_the_reported_figure_plus_the_estimate_of_what_was_added() -> None:
    calibration = Calibration()
    assert calibration.estimate(100) == 100 and "no model call yet" in calibration.source
    calibration.observe(100, 180)
    assert calibration.estimate(130) == 180 + 30
    assert "calibrated" in calibration.source
    calibration.observe(130, 0)
    assert calibration.estimate(150) == 150 and "reports no usage" in calibration.source


async def test_calibration_follows_reported_usage(server: FakeOpenAIServer) -> None:
    server.usage = (3000, 2)  # the server says each prompt is far bigger than estimated
    server.default_reply = responder()
    store = InMemoryStorage()
    session = await create_session(
        "s", store, model=model_for(server), context_window=3400, compaction=True
    )
    assert (await session.send_message("hello")).success
    status = await session.context_status()
    reply = (await store.load("s"))[-1]
    assert status.tokens == 3000 + estimate_tokens(reply.to_openai())
    assert "calibrated" in status.estimate
    # by the estimator alone every prompt stays far below the threshold (2720); by the
    # server's count it is over it, so compaction starts once there is something to cut
    for i in range(14):
        assert (await session.send_message(turn_text(3 * i))).success
    assert any(is_summary_request(r) for r in server.requests)
    biggest = max(sum(estimate_tokens(m) for m in r["messages"]) for r in server.requests)
    assert biggest < 2720 * 0.7
    info = await store.get_info("s")
    assert info is not None and info.usage.prompt_tokens == 3000 * info.usage.calls


async def test_without_reported_usage_the_estimator_is_used_and_said(
    server: FakeOpenAIServer,
) -> None:
    body = {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    server.default_reply = lambda request: raw_completion(json.dumps(body))
    session = await create_session(
        "s", InMemoryStorage(), model=model_for(server), context_window=1000, compaction=True
    )
    assert (await session.send_message("hello")).success
    status = await session.context_status()
    assert "reports no usage" in status.estimate
    history = await session.load_history()
    assert status.tokens == sum(estimate_tokens(m.to_openai()) for m in history)


# -- the command line -----------------------------------------------------------------------


async def stored_chat(env: dict[str, str], server: FakeOpenAIServer, turns: int) -> None:
    """A session "alice" of ``turns`` long turns, in the storage the CLI children use."""
    server.default_reply = responder()
    session = await create_session("alice", env["CONVERSA_STORAGE"], model=model_for(server))
    await chat(session, range(turns))
    await session.close()


async def test_sessions_compact_show_and_list(
    env: dict[str, str], server: FakeOpenAIServer
) -> None:
    from _cli import conversa

    await stored_chat(env, server, 6)
    done = conversa(env, "sessions", "compact", "alice", "--context-window", "1500")
    assert done.returncode == 0, done.stderr
    assert "summarized" in done.stderr + done.stdout
    assert "model sees:" in done.stderr + done.stdout
    history = await open_storage(env["CONVERSA_STORAGE"]).load("alice")
    assert len(summaries(history)) == 1 and len(history) == 6 * 2 + 2 * 2 + 1  # 2 tool turns
    shown = conversa(env, "sessions", "show", "alice")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout + shown.stderr
    assert "summary of" in text and "model sees:" in text and "model call" in text
    listed = conversa(env, "sessions", "list", "--json")
    rows = json.loads(listed.stdout)
    usage = rows[0]["usage"]
    assert usage["calls"] == len(server.requests) and usage["prompt_tokens"] > 0


async def test_repl_compact_and_count(env: dict[str, str], server: FakeOpenAIServer) -> None:
    from _cli import quit_, say, spawn

    await stored_chat(env, server, 6)
    child = spawn(env, "--context-window", "1500")
    say(child, "/compact", "summarized")
    say(child, "/count", "model sees:")
    quit_(child)
