"""Prompt repair, the incremental PromptHistory, and the text protocol parser."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from conversa import ChatMessage, ToolCall
from conversa._prompt_history import PromptHistory, repair
from conversa.text_protocol import parse_text_reply

_ids = st.sampled_from(["a", "b", "c"])
_message = st.one_of(
    st.builds(lambda t: ChatMessage.user(t), st.sampled_from(["u1", "u2"])),
    st.builds(lambda t: ChatMessage.assistant(t), st.sampled_from(["r1", "r2"])),
    st.builds(
        lambda ids: ChatMessage.assistant(tool_calls=[ToolCall(i, "f") for i in ids]),
        st.lists(_ids, min_size=1, max_size=3, unique=True),
    ),
    st.builds(lambda i: ChatMessage.tool(i, "result"), _ids),
)


def _shape(messages: list[ChatMessage]) -> list[tuple[Any, ...]]:
    return [(m.role, m.tool_call_id, m.text, tuple(c.id for c in m.tool_calls)) for m in messages]


def _valid(wire: list[dict[str, Any]]) -> bool:
    """What the chat API demands of tool calls and results."""
    owed: list[str] = []
    for m in wire:
        if m["role"] == "tool":
            if m["tool_call_id"] not in owed:
                return False
            owed.remove(m["tool_call_id"])
            continue
        if owed:
            return False
        owed = [c["id"] for c in m.get("tool_calls") or ()]
    return not owed


@given(st.lists(_message, max_size=12), st.integers(min_value=0, max_value=12))
def test_prompt_history_matches_full_repair(messages: list[ChatMessage], cut: int) -> None:
    history = PromptHistory()
    for m in messages:
        history.extend([m])
    fixed = repair(messages)
    assert history.prompt()[0] == [m.to_openai() for m in fixed.messages]
    assert _shape(history.dangling()) == _shape(fixed.to_store)
    history.truncate(cut)
    assert history.prompt()[0] == [m.to_openai() for m in repair(messages[:cut]).messages]


@given(st.lists(_message, max_size=12))
def test_repair_always_gives_valid_input_and_keeps_healthy_histories(
    messages: list[ChatMessage],
) -> None:
    fixed = repair(messages)
    assert _valid([m.to_openai() for m in fixed.messages])
    if _valid([m.to_openai() for m in messages]):
        assert fixed.messages == messages and fixed.to_store == []
    stored_then = repair([*messages, *fixed.to_store])
    assert stored_then.to_store == []


def test_parse_text_reply_forms() -> None:
    assert parse_text_reply('{"thought": "t", "final_answer": "x"}').final_answer == "x"
    act = parse_text_reply('Sure: {"action": "add", "action_input": "{\\"a\\": 1}"} ok')
    assert (act.action, act.action_input) == ("add", {"a": 1})
    assert parse_text_reply("Use {braces} freely.").final_answer == "Use {braces} freely."
    assert "not valid JSON" in (parse_text_reply('{"action": ').problem or "")
    assert "either" in (parse_text_reply('{"thought": "hm"}').problem or "")
    assert "JSON object" in (parse_text_reply('{"action": "a", "action_input": [1]}').problem or "")
    assert parse_text_reply('{"final_answer": {"n": 1}}').final_answer == '{"n": 1}'
