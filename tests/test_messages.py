"""ChatMessage: validation at construction and the storage and wire conversions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given

from conversa import ChatMessage, InvalidMessage, ToolCall
from conversa.testing.conformance import chat_messages


@given(chat_messages())
def test_storage_form_roundtrips(message: ChatMessage) -> None:
    assert ChatMessage.from_json(message.to_json()) == message
    assert ChatMessage.from_dict(message.to_dict()) == message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"role": "robot", "content": "x"}, "unknown role 'robot'"),
        ({"role": "tool", "content": "42"}, "needs tool_call_id"),
        ({"role": "user", "content": "x", "metadata": {"when": datetime.now()}}, "JSON"),
        ({"role": "user", "content": "x", "metadata": {"v": float("nan")}}, "JSON"),
        ({"role": "user", "content": None}, "needs content"),
        ({"role": "user", "content": 42}, "must be a string"),
        ({"role": "user", "content": [{"text": "no type"}]}, "'type'"),
        ({"role": "user", "content": "x", "tool_call_id": "c1"}, "only tool messages"),
        ({"role": "user", "content": "x", "tool_calls": [ToolCall("c", "f")]}, "only assistant"),
        ({"role": "system", "content": [{"type": "image_url", "image_url": {}}]}, "text parts"),
        ({"role": "user", "content": "bad \ud800 half"}, "lone surrogate"),
        ({"role": "user", "content": [{"type": "text", "text": "\udfff"}]}, "lone surrogate"),
        ({"role": "user", "content": "x", "metadata": {"k": "\ud800"}}, "lone surrogate"),
    ],
)
def test_invalid_messages_rejected(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidMessage) as err:
        ChatMessage(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_tool_calls_accept_openai_dicts_and_convert_back() -> None:
    wire = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    msg = ChatMessage(role="assistant", tool_calls=(wire,))  # type: ignore[arg-type]
    assert msg.tool_calls == (ToolCall("call_1", "add", "{}"),)
    assert msg.to_openai() == {"role": "assistant", "content": None, "tool_calls": [wire]}


def test_openai_roundtrip_drops_only_local_fields() -> None:
    msg = ChatMessage.tool("call_9", "result", metadata={"latency_ms": 3})
    wire = msg.to_openai()
    assert wire == {"role": "tool", "content": "result", "tool_call_id": "call_9"}
    back = ChatMessage.from_openai(wire)
    assert (back.role, back.content, back.tool_call_id) == ("tool", "result", "call_9")
    assert back.id != msg.id


def test_times_are_utc() -> None:
    local = datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert ChatMessage.user("x", created_at=local).created_at == datetime(
        2026, 1, 1, 10, 0, tzinfo=UTC
    )
    naive = ChatMessage.user("x", created_at=datetime(2026, 1, 1, 12, 0))
    assert naive.created_at.tzinfo is UTC


def test_ids_unique_and_text_view() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]
    msgs = [ChatMessage.user(parts) for _ in range(100)]
    assert len({m.id for m in msgs}) == 100
    assert msgs[0].text == "a"
    assert ChatMessage.assistant(tool_calls=[ToolCall("c", "f")]).text == ""


@pytest.mark.parametrize(
    "data",
    [
        {"content": "no role"},
        {"role": "robot", "content": "x"},
        {"role": "tool", "content": "x"},
        {"role": "user", "content": 5},
        {"role": "user", "content": "x", "metadata": [1]},
        {"role": "user", "content": "x", "created_at": "yesterday"},
        {"role": "assistant", "tool_calls": [{"function": {}}]},
        ["not", "a", "dict"],
    ],
)
def test_from_dict_rejects_damaged_data(data: object) -> None:
    with pytest.raises(InvalidMessage):
        ChatMessage.from_dict(data)  # type: ignore[arg-type]


def test_from_dict_copies_what_it_is_given() -> None:
    data = {"role": "user", "content": "x", "metadata": {"k": 1}}
    message = ChatMessage.from_dict(data)
    data["metadata"]["k"] = 2  # type: ignore[index]
    assert message.metadata == {"k": 1}
