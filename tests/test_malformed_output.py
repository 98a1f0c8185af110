"""Malformed model output never raises out of a turn (issue 8, items 13-15).

Every case is served byte for byte by FakeOpenAIServer on 127.0.0.1 (raw_completion, raw_stream);
the server validates each request strictly, so a following turn that succeeds proves the stored
history is valid model input.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from _closing import opened
from hypothesis import given
from hypothesis import strategies as st

from conversa import (
    AgentResult,
    ChatMessage,
    OpenAIChatModel,
    Session,
    ToolCall,
    TurnDone,
    create_session,
    tool,
)
from conversa.model import INVALID_CALLS_KEY, INVALID_TOOL_NAME
from conversa.testing.replies import Reply, raw_completion, raw_stream, text
from conversa.testing.scripted import ScriptedModel
from conversa.testing.server import FakeOpenAIServer
from conversa.text_protocol import parse_text_reply

pytestmark = pytest.mark.usefixtures("close_opened")


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def session_for(server: FakeOpenAIServer, url: str = "memory://") -> Session:
    model = OpenAIChatModel(
        "fake-model", base_url=server.base_url, api_key="sk-test-0123456789", max_retries=0
    )
    session = await create_session("s", url, model=model, tools=[add])
    opened(session)
    return session


async def turn(session: Session, message: str, streaming: bool) -> AgentResult:
    if not streaming:
        return await session.send_message(message)
    events = [event async for event in session.stream_message(message)]
    assert isinstance(events[-1], TurnDone)
    return events[-1].result


async def next_turn_succeeds(server: FakeOpenAIServer, session: Session) -> None:
    server.add_reply(text("all good"))
    result = await session.send_message("are we fine?")
    assert result.success, result.error
    assert result.result == "all good"


def completion(message: Any, **fields: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "fake-model",
            "choices": [choice], **fields}  # fmt: skip


def chunk(delta: Any, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "fake-model",
            "choices": [choice], **fields}  # fmt: skip


STOP = chunk({}, "stop")
NOT_UTF8 = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "caf\xe9"}}]}'
NOT_UTF8_CHUNK = b'{"choices": [{"index": 0, "delta": {"content": "caf\xe9"}}]}'

# -- 13. malformed completions end the turn with an error ----------------------------------------

BROKEN: dict[str, tuple[Reply, str]] = {
    "choice-without-message": (
        raw_completion({"choices": [{"index": 0}]}),
        "no message",
    ),
    "message-null": (raw_completion(completion(None)), "no message"),
    "choices-not-a-list": (raw_completion({"choices": "nope"}), 'choices are str "nope"'),
    "no-choices": (raw_completion({"choices": []}), "no choices"),
    "body-not-an-object": (raw_completion("[1, 2]"), "the body is list"),
    "integer-content": (
        raw_completion(completion({"role": "assistant", "content": 5})),
        "content is int 5",
    ),
    "list-content-not-text": (
        raw_completion(completion({"role": "assistant", "content": [{"type": "image_url"}]})),
        "content is list",
    ),
    "tool-calls-not-a-list": (
        raw_completion(completion({"role": "assistant", "content": None, "tool_calls": 7})),
        "tool_calls are int 7",
    ),
    "not-utf8": (raw_completion(NOT_UTF8), "not UTF-8"),
    "stream-choices-not-a-list": (raw_stream({"choices": "nope"}, STOP), 'choices are str "nope"'),
    "stream-chunk-not-an-object": (raw_stream("5", STOP), "chunk is int 5"),
    "stream-integer-content": (raw_stream(chunk({"content": 5}), STOP), "content is int 5"),
    "stream-delta-not-an-object": (raw_stream(chunk("x"), STOP), 'delta is str "x"'),
    "stream-not-utf8": (raw_stream(NOT_UTF8_CHUNK, STOP), "not UTF-8"),
}


@pytest.mark.parametrize("case", BROKEN)
async def test_a_malformed_answer_ends_the_turn_with_a_clear_error(
    server: FakeOpenAIServer, case: str
) -> None:
    reply, said = BROKEN[case]
    session = await session_for(server)
    server.add_reply(reply)
    result = await turn(session, "hi", streaming=case.startswith("stream"))
    assert result.stop_reason == "error" and not result.success
    assert said in (result.error or "")
    assert "did not answer with a chat completion" in (result.error or "")
    assert [m.role for m in await session.storage.load("s")] == ["user"]
    await next_turn_succeeds(server, session)


# -- 13. what can be recovered is recovered ------------------------------------------------------

RECOVERED: dict[str, tuple[Reply, str]] = {
    "lone-surrogate": (
        raw_completion(completion({"role": "assistant", "content": "a\ud800b"})),
        "a\ufffdb",
    ),
    "text-parts": (
        raw_completion(
            completion({"role": "assistant", "content": [{"type": "text", "text": "one"}, "two"]})
        ),
        "one\ntwo",
    ),
    "usage-not-numbers": (
        raw_completion(
            completion({"role": "assistant", "content": "ok"}, usage={"prompt_tokens": "x"})
        ),
        "ok",
    ),
    "stream-lone-surrogate": (raw_stream(chunk({"content": "a\ud800b"}), STOP), "a\ufffdb"),
    "stream-surrogate-in-model-name": (
        raw_stream(chunk({"content": "ok"}, model="m\udc00"), STOP),
        "ok",
    ),
}


@pytest.mark.parametrize("case", RECOVERED)
async def test_a_recoverable_answer_is_recovered(server: FakeOpenAIServer, case: str) -> None:
    reply, answer = RECOVERED[case]
    session = await session_for(server)
    server.add_reply(reply)
    result = await turn(session, "hi", streaming=case.startswith("stream"))
    assert result.success, result.error
    assert result.result == answer
    assert (await session.storage.load("s"))[-1].text == answer
    await next_turn_succeeds(server, session)


async def test_stream_tool_call_deltas_without_an_index_are_assembled(
    server: FakeOpenAIServer,
) -> None:
    def call(**fields: Any) -> dict[str, Any]:
        return chunk({"tool_calls": [{"index": None, **fields}]})

    server.add_reply(
        raw_stream(
            call(id="call_1", type="function", function={"name": "add", "arguments": '{"a": 1,'}),
            call(function={"arguments": ' "b": 2}'}),
            call(id="call_2", type="function", function={"name": "add", "arguments": ""}),
            call(function={"arguments": '{"a": 3, "b": 4}'}),
            chunk({}, "tool_calls"),
        ),
        text("3 and 7"),
    )
    session = await session_for(server)
    result = await turn(session, "add twice", streaming=True)
    assert result.success, result.error
    assert [(s.action, s.observation) for s in result.steps] == [("add", "3"), ("add", "7")]
    await next_turn_succeeds(server, session)


async def test_a_model_whose_message_cannot_be_stored_ends_the_turn_with_an_error() -> None:
    # a ChatModel of the user's own that builds an invalid assistant message
    model = ScriptedModel([Reply(tool_calls=(ToolCall("call_1", None),))])  # type: ignore[arg-type]
    session = await create_session("s", "memory://", model=model, tools=[add])
    opened(session)
    result = await session.send_message("hi")
    assert result.stop_reason == "error"
    assert "not a valid message" in (result.error or "")
    assert [m.role for m in session.history] == ["user"]


# -- 14. malformed tool calls never poison the history -------------------------------------------


def native_call(**call: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return completion(message)


def streamed_call(**call: Any) -> Reply:
    return raw_stream(chunk({"tool_calls": [{"index": 0, **call}]}), chunk({}, "tool_calls"))


MALFORMED_CALLS: dict[str, tuple[dict[str, Any], str]] = {
    "name-null": (
        {"id": "call_1", "type": "function", "function": {"name": None, "arguments": "{}"}},
        "your tool call has no function name",
    ),
    "name-empty": (
        {"id": "call_1", "type": "function", "function": {"name": "", "arguments": "{}"}},
        "your tool call has no function name",
    ),
    "name-not-a-string": (
        {"id": "call_1", "type": "function", "function": {"name": 5, "arguments": "{}"}},
        "the function name of your tool call must be a string, not int 5",
    ),
    "no-function": ({"id": "call_1", "type": "function"}, "your tool call has no function name"),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("case", MALFORMED_CALLS)
async def test_a_call_without_a_usable_name_is_answered_and_stored_safely(
    server: FakeOpenAIServer, tmp_path: Path, case: str, streaming: bool
) -> None:
    call, problem = MALFORMED_CALLS[case]
    url = f"file://{tmp_path}/sessions"
    session = await session_for(server, url)
    reply = streamed_call(**call) if streaming else raw_completion(native_call(**call))
    server.add_reply(reply, text("sorry, I will use add"))
    result = await turn(session, "add 1 and 2", streaming)
    assert result.success, result.error
    observation = result.steps[0].observation or ""
    assert observation.startswith(f"Error: {problem}") and "Available tools: add" in observation
    # the model saw that error, and the strict server accepted the history it came in
    assert server.requests[-1]["messages"][-1]["content"] == observation
    await next_turn_succeeds(server, session)

    stored = await session.storage.load("s")
    (bad,) = stored[1].tool_calls
    assert bad.name == INVALID_TOOL_NAME and bad.id
    assert stored[1].metadata[INVALID_CALLS_KEY] == {bad.id: problem}
    assert stored[2].role == "tool" and stored[2].tool_call_id == bad.id

    await session.close()
    reloaded = await session_for(server, url)
    assert reloaded.history == session.history
    assert reloaded.history[1].tool_calls == (bad,)
    await next_turn_succeeds(server, reloaded)


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_missing_ids_and_object_arguments_are_repaired(
    server: FakeOpenAIServer, streaming: bool
) -> None:
    arguments = {"a": 1, "b": 2}
    if streaming:
        reply = raw_stream(
            chunk({"tool_calls": [{"index": 0, "function": {"name": "add"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
            chunk({"tool_calls": [{"index": 1, "id": 7, "function": {"name": "add"}}]}),
            chunk({}, "tool_calls"),
        )
    else:
        calls = [
            {"type": "function", "function": {"name": "add", "arguments": arguments}},
            {"id": 7, "type": "function", "function": {"name": "add", "arguments": None}},
            {"id": "dup", "type": "function", "function": {"name": "add", "arguments": "{}"}},
            {"id": "dup", "type": "function", "function": {"name": "add", "arguments": "{}"}},
        ]
        reply = raw_completion(
            completion({"role": "assistant", "content": None, "tool_calls": calls})
        )
    session = await session_for(server)
    server.add_reply(reply, text("done"))
    result = await turn(session, "add", streaming)
    assert result.success, result.error
    assert result.steps[0].observation == "3"
    ids = [c.id for c in session.history[1].tool_calls]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids)
    assert json.loads(session.history[1].tool_calls[0].arguments) == arguments
    await next_turn_succeeds(server, session)


def test_a_tool_call_without_a_name_is_not_a_valid_message() -> None:
    from conversa.errors import InvalidMessage

    for call in (ToolCall("c", None), ToolCall("", "add"), ToolCall("c", "add", None)):  # type: ignore[arg-type]
        with pytest.raises(InvalidMessage, match="tool call needs"):
            ChatMessage.assistant(tool_calls=[call])


# -- 15. the text protocol's parser is linear ----------------------------------------------------

OLD_FENCE = re.compile(r"```(?:json)?\s*(\{.*\})\s*```", re.DOTALL)
"""The regex the parser used to find a fenced object (quadratic), as the reference."""


PIECES = st.sampled_from(["```", "`", "{", "}", " ", "\n", "json", "js", "x", '"a"', ":"])


@given(st.lists(PIECES, max_size=14).map("".join))
def test_fenced_objects_are_found_as_the_old_regex_found_them(reply: str) -> None:
    from conversa.text_protocol import _fenced_object

    match = OLD_FENCE.search(reply)
    assert _fenced_object(reply) == (match.group(1) if match else None)


def test_parse_results_are_unchanged_on_fenced_replies() -> None:
    answer = 'Sure.\n```json\n{"final_answer": "4"}\n```\nand more ```'
    assert parse_text_reply(answer).final_answer == "4"
    action = '```\n{"action": "add", "action_input": {"a": 1}}\n```'
    assert parse_text_reply(action).action == "add"


class CountingStr(str):
    """A str that counts the characters its find/rfind/startswith/endswith/[] calls look at."""

    scanned = 0

    def find(self, sub: str, start: Any = None, end: Any = None) -> int:  # type: ignore[override]
        start, end = start or 0, len(self) if end is None else end
        found = super().find(sub, start, end)
        CountingStr.scanned += (found + len(sub) if found >= 0 else end) - start
        return found

    def rfind(self, sub: str, start: Any = None, end: Any = None) -> int:  # type: ignore[override]
        start, end = start or 0, len(self) if end is None else end
        found = super().rfind(sub, start, end)
        CountingStr.scanned += end - (found if found >= 0 else start)
        return found

    def startswith(self, prefix: Any, *args: Any) -> bool:
        CountingStr.scanned += 1
        return super().startswith(prefix, *args)

    def endswith(self, suffix: Any, *args: Any) -> bool:
        CountingStr.scanned += 1
        return super().endswith(suffix, *args)

    def __getitem__(self, key: Any) -> str:
        CountingStr.scanned += 1
        return super().__getitem__(key)


def scan_work(reply: str) -> int:
    CountingStr.scanned = 0
    parsed = parse_text_reply(CountingStr(reply))
    assert parsed == parse_text_reply(reply)
    return CountingStr.scanned


@pytest.mark.parametrize(
    "unit", ["```{", "```json {", "}```", "} ```x", "```x{", "}x```", "```", "{}", "x"]
)
def test_the_fence_scan_is_linear_in_the_reply(unit: str) -> None:
    n = 64_000
    small, large = unit * (n // len(unit)), unit * (2 * n // len(unit))
    work_small, work_large = scan_work(small), scan_work(large)
    # the scan looks at every character through the counted calls (nothing hides the work) ...
    assert len(small) <= work_small <= 4 * len(small)
    # ... and twice the reply costs twice the work
    assert work_large <= 2 * work_small + 16


def test_replies_the_parser_cannot_decode_are_problems_not_exceptions() -> None:
    deep = '{"action": "add", "action_input": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert "not valid JSON" in (parse_text_reply(deep).problem or "")
    nested_input = '{"action": "add", "action_input": "' + "[" * 100_000 + '"}'
    assert "action_input" in (parse_text_reply(nested_input).problem or "")
    assert "name of a tool" in (parse_text_reply('{"action": null}').problem or "")


async def test_deeply_nested_native_arguments_are_an_observation(server: FakeOpenAIServer) -> None:
    arguments = "[" * 100_000 + "]" * 100_000
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": arguments}}
    server.add_reply(raw_completion(native_call(**call)), text("gave up"))
    session = await session_for(server)
    result = await session.send_message("add")
    assert result.success, result.error
    assert "not valid JSON" in (result.steps[0].observation or "")
    await next_turn_succeeds(server, session)
