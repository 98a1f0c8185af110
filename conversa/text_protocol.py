"""The JSON text protocol, for models without native tool calling: what the model is told, how
its replies are read, and how tool results go back to it (as ``Observation:`` user messages)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .messages import ChatMessage

OBSERVATION_PREFIX = "Observation: "


def describe_tools_for_text_protocol(schemas: Sequence[dict[str, Any]]) -> str:
    """The system prompt section that teaches the JSON text protocol to a model."""
    lines = [
        "You can use tools. Reply with exactly one JSON object and nothing else.",
        'To use a tool: {"thought": "...", "action": "<tool name>", "action_input": {...}}',
        'To answer the user: {"thought": "...", "final_answer": "..."}',
        "After a tool runs you get a message starting with 'Observation:' holding its result.",
        "Tools:",
    ]
    for schema in schemas:
        fn = schema["function"]
        params = json.dumps(fn.get("parameters", {}), ensure_ascii=False)
        lines.append(f"- {fn['name']}: {fn.get('description', '')} Arguments schema: {params}")
    return "\n".join(lines)


def observation(output: str, *, tool: str | None = None, interrupted: bool = False) -> ChatMessage:
    """The user message that brings a tool's output (or a reply's problem) back to the model."""
    meta: dict[str, Any] = {"observation": True}
    if tool is not None:
        meta["tool"] = tool
    if interrupted:
        meta["interrupted"] = True
    return ChatMessage.user(OBSERVATION_PREFIX + output, metadata=meta)


@dataclass(frozen=True, slots=True)
class TextReply:
    """A parsed text-protocol reply: a final answer, an action, or what was wrong with it."""

    thought: str | None = None
    final_answer: str | None = None
    action: str | None = None
    action_input: dict[str, Any] | None = None
    problem: str | None = None


def parse_text_reply(text: str) -> TextReply:
    """Read a reply of the JSON text protocol; prose that is not JSON counts as an answer.

    Linear in the reply's length: a model's output is untrusted, and the turn runs on the loop.
    """
    fenced = _fenced_object(text)
    candidate = fenced if fenced is not None else text.strip()
    if not candidate.startswith("{"):
        # Models often wrap the JSON in a sentence: use an embedded object if there is one.
        start, end = candidate.find("{"), candidate.rfind("}")
        embedded = _json_object(candidate[start : end + 1]) if 0 <= start < end else None
        if embedded is None or not ({"action", "final_answer"} & embedded.keys()):
            return TextReply(final_answer=text.strip())
        candidate = candidate[start : end + 1]
    try:
        data = json_value(candidate)
    except ValueError as exc:
        return TextReply(problem=f"your reply was not valid JSON ({exc})")
    if not isinstance(data, dict):
        return TextReply(problem="your reply must be one JSON object")
    thought = data.get("thought")
    thought = str(thought) if thought is not None else None
    if "final_answer" in data:
        answer = data["final_answer"]
        return TextReply(
            thought, final_answer=answer if isinstance(answer, str) else json.dumps(answer)
        )
    if "action" in data:
        action = data["action"]
        if not isinstance(action, str) or not action.strip():
            return TextReply(thought, problem='"action" must be the name of a tool')
        raw = data.get("action_input", {})
        if isinstance(raw, str):
            try:
                raw = json_value(raw) if raw.strip() else {}
            except ValueError:
                return TextReply(thought, problem="action_input must be a JSON object")
        if not isinstance(raw, dict):
            return TextReply(thought, problem="action_input must be a JSON object")
        return TextReply(thought, action=action, action_input=raw)
    return TextReply(thought, problem='the JSON needs either "action" or "final_answer"')


def json_value(text: str) -> Any:
    """json.loads; ValueError for nesting too deep to decode as well as for invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("it is nested too deeply") from exc


_FENCE = "```"


def _fenced_object(text: str) -> str | None:
    r"""The object in the reply's first ``` (or ```json) fence that a later fence closes.

    What the regex ```(?:json)?\s*(\{.*\})\s*``` (DOTALL) finds: from the "{" of the first
    opening fence to the last "}" before a closing fence. That regex backtracks quadratically on
    replies full of fences; these scans move one way each, so every character is looked at a
    bounded number of times.
    """
    close = _last_closing_brace(text)
    if close < 0:
        return None
    start = 0
    while (fence := text.find(_FENCE, start, close)) >= 0:
        # only the first "{" after a fence can open it (or one of the fences in between)
        brace = text.find("{", fence + len(_FENCE), close)
        if brace < 0:
            return None
        if _opens_fence(text, brace):
            return text[brace : close + 1]
        start = brace + 1
    return None


def _last_closing_brace(text: str) -> int:
    """The index of the last "}" followed by only whitespace and a ``` fence, else -1."""
    end = len(text)
    while (fence := text.rfind(_FENCE, 0, end)) >= 0:
        # only the last "}" before a fence can close it (or one of the fences in between)
        brace = text.rfind("}", 0, fence)
        if brace < 0:
            return -1
        after = brace + 1
        while after < fence and text[after].isspace():
            after += 1
        if text.startswith(_FENCE, after):
            return brace
        end = brace
    return -1


def _opens_fence(text: str, brace: int) -> bool:
    """Whether only whitespace and an optional "json" lie between a ``` fence and this "{"."""
    before = brace
    while before > 0 and text[before - 1].isspace():
        before -= 1
    if text.endswith(_FENCE, 0, before):
        return True
    return text.endswith("json", 0, before) and text.endswith(_FENCE, 0, before - 4)


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json_value(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
