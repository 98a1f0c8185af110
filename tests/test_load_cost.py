"""Loading a history (issue 11, target 4): the per-row decode does no more Python calls than it
must, keeps big integers exact, and still refuses what is not a stored message."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from conversa.errors import CorruptSessionError, InvalidMessage
from conversa.messages import ChatMessage, ToolCall, message_from_json
from conversa.storage import open_storage
from conversa.storage._stored import decode_messages

BIG = 2**70 + 1  # past a float's 53 bits and a C long's 64


def python_calls(work: Any) -> int:
    """How many Python functions ``work()`` calls (C functions are not counted)."""
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


def test_decoding_a_row_costs_two_python_calls() -> None:
    rows = [
        (i, ChatMessage.user(f"q{i}").to_json() if i % 2 else ChatMessage.assistant("a").to_json())
        for i in range(100)
    ]
    with_rows = python_calls(lambda: decode_messages(rows, str, "fix"))
    without = python_calls(lambda: decode_messages([], str, "fix"))
    # one for the line (the C scanner directly), one to build the message (its rules inline);
    # before: from_json, raw_decode, from_dict, as_utc, _check_rules, _check_content
    assert (with_rows - without) / len(rows) == 2


def test_big_integers_and_floats_stay_exact_through_a_load(tmp_path: Path) -> None:
    message = ChatMessage.assistant(
        "n", metadata={"big": BIG, "neg": -BIG, "float": 0.1, "nested": [{"n": 10**30}]}
    )

    async def roundtrip() -> list[ChatMessage]:
        async with open_storage(f"sqlite:///{tmp_path / 's.db'}") as storage:
            await storage.save("s", [message])
            return await storage.load("s")

    (loaded,) = asyncio.run(roundtrip())
    assert loaded.metadata == {"big": BIG, "neg": -BIG, "float": 0.1, "nested": [{"n": 10**30}]}
    assert type(loaded.metadata["big"]) is int
    assert loaded == message


def test_a_loaded_message_equals_the_stored_one_in_every_shape() -> None:
    call = ToolCall(id="c1", name="add", arguments='{"a": 1}')
    shapes = [
        ChatMessage.system("be brief"),
        ChatMessage.user([{"type": "text", "text": "hi"}]),
        ChatMessage.assistant(None, tool_calls=[call]),
        ChatMessage.tool("c1", "2", name="add"),
        ChatMessage.assistant("x", metadata={"k": [1, 2]}),
    ]
    for message in shapes:
        assert message_from_json(message.to_json()) == message
        assert message_from_json(message.to_json().encode()) == message


def test_from_dict_copies_metadata_and_from_json_needs_not() -> None:
    metadata = {"k": 1}
    data = ChatMessage.user("x", metadata=metadata).to_dict()
    built = ChatMessage.from_dict(data)
    data["metadata"]["k"] = 2  # the caller's dict changing later does not change the message
    assert built.metadata == {"k": 1}


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("", json.JSONDecodeError),
        ("   ", json.JSONDecodeError),
        ('{"role": "user", "content": "x", "id": "1"} {}', json.JSONDecodeError),
        ("[1, 2]", InvalidMessage),
        ('"user"', InvalidMessage),
        ('{"content": "x"}', InvalidMessage),
        ('{"role": "robot", "content": "x", "id": "1"}', InvalidMessage),
        ('{"role": "user", "content": 5, "id": "1"}', InvalidMessage),
        ('{"role": "user", "content": null, "id": "1"}', InvalidMessage),
        ('{"role": "user", "content": "x", "id": ""}', InvalidMessage),
        ('{"role": "user", "content": "x", "id": 7}', InvalidMessage),
        ('{"role": "tool", "content": "x", "id": "1"}', InvalidMessage),
        ('{"role": "user", "content": "x", "id": "1", "tool_call_id": "c"}', InvalidMessage),
        ('{"role": "user", "content": "x", "id": "1", "created_at": "soon"}', InvalidMessage),
        ('{"role": "user", "content": "x", "id": "1", "created_at": 5}', InvalidMessage),
        ('{"role": "user", "content": "x", "id": "1", "metadata": []}', InvalidMessage),
        ('{"role": "user", "content": "x", "id": "1", "metadata": 0}', InvalidMessage),
    ],
)
def test_what_is_not_a_stored_message_is_refused(line: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        message_from_json(line)
    with pytest.raises(CorruptSessionError, match="row 3"):
        decode_messages([(3, line)], lambda key: f"row {key}", "fix it")


def test_a_stored_time_in_another_zone_is_read_as_utc() -> None:
    line = '{"role": "user", "content": "x", "id": "1", "created_at": "2026-01-01T02:00:00+02:00"}'
    moment = message_from_json(line).created_at
    assert moment.isoformat() == "2026-01-01T00:00:00+00:00"
    naive = '{"role": "user", "content": "x", "id": "1", "created_at": "2026-01-01T02:00:00"}'
    assert message_from_json(naive).created_at.isoformat() == "2026-01-01T02:00:00+00:00"
