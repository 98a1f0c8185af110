"""The request checks the real chat-completions API makes, for FakeOpenAIServer(strict=True)."""

from __future__ import annotations

from typing import Any

Problem = tuple[str, str | None]
"""An error message and the offending parameter, as in an OpenAI 400 error body."""

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def validate_chat_request(request: dict[str, Any]) -> Problem | None:
    """The first problem the OpenAI API would reject this request for, or None."""
    if not request.get("model"):
        return "Missing required parameter: 'model'.", "model"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array of message objects.", "messages"
    problem = _check_tools(request.get("tools"))
    if problem is not None:
        return problem
    return _check_messages(messages)


def _check_tools(tools: object) -> Problem | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        return "'tools' must be a non-empty array when given.", "tools"
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            return (
                f"Invalid value for 'tools[{i}]': expected "
                "{'type': 'function', 'function': {...}}.",
                f"tools[{i}]",
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"Missing required parameter: 'tools[{i}].function.name'.", f"tools[{i}]"
    return None


def _check_messages(messages: list[Any]) -> Problem | None:
    group: set[str] | None = None  # ids of the latest assistant tool calls, while results follow
    pending: dict[str, int] = {}  # unanswered call id -> index of the assistant message
    for i, message in enumerate(messages):
        where = f"messages.[{i}]"
        if not isinstance(message, dict):
            return f"Invalid type for '{where}': expected an object.", where
        role = message.get("role")
        if role not in KNOWN_ROLES:
            supported = ", ".join(f"'{r}'" for r in KNOWN_ROLES)
            return f"Invalid value: {role!r}. Supported values are: {supported}.", f"{where}.role"
        if role == "tool":
            problem = _check_tool_result(message, where, group, pending)
            if problem is not None:
                return problem
            continue
        if pending:
            return _unanswered(pending)
        group = None
        problem = _check_content(message, role, where)
        if problem is not None:
            return problem
        if role == "assistant" and message.get("tool_calls"):
            ids, problem = _call_ids(message["tool_calls"], where)
            if problem is not None:
                return problem
            group = set(ids)
            pending = dict.fromkeys(ids, i)
    if pending:
        return _unanswered(pending)
    return None


def _check_content(message: dict[str, Any], role: str, where: str) -> Problem | None:
    content = message.get("content")
    if role == "assistant":
        if content is None and not message.get("tool_calls"):
            return (
                f"Invalid value for '{where}': an assistant message needs content or tool_calls.",
                f"{where}.content",
            )
    elif "content" not in message:
        return f"Missing required parameter: '{where}.content'.", f"{where}.content"
    if content is None and role != "assistant":
        return (
            f"Invalid type for '{where}.content': expected one of a string or array of "
            "objects, but got null instead.",
            f"{where}.content",
        )
    if content is not None and not isinstance(content, str | list):
        return (
            f"Invalid type for '{where}.content': expected one of a string or array of "
            f"objects, but got {type(content).__name__} instead.",
            f"{where}.content",
        )
    return None


def _call_ids(calls: object, where: str) -> tuple[list[str], Problem | None]:
    if not isinstance(calls, list):
        return [], (f"Invalid type for '{where}.tool_calls': expected an array.", where)
    ids: list[str] = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not fn["name"]
            or not isinstance(fn.get("arguments"), str)
        ):
            return ids, (
                f"Invalid value for '{where}.tool_calls[{j}]': expected id, type 'function' "
                "and function.name (a non-empty string) and function.arguments (a JSON string).",
                f"{where}.tool_calls[{j}]",
            )
        ids.append(call["id"])
    return ids, None


def _check_tool_result(
    message: dict[str, Any], where: str, group: set[str] | None, pending: dict[str, int]
) -> Problem | None:
    if group is None:
        return (
            "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
            "message with 'tool_calls'.",
            f"{where}.role",
        )
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        return f"Missing required parameter: '{where}.tool_call_id'.", f"{where}.tool_call_id"
    if call_id not in group:
        return (
            f"Invalid parameter: '{where}.tool_call_id' {call_id!r} does not match any "
            "tool call of the preceding assistant message.",
            f"{where}.tool_call_id",
        )
    if call_id not in pending:
        return (
            f"Invalid parameter: '{where}' is a second result for tool call {call_id!r}.",
            f"{where}.tool_call_id",
        )
    if message.get("content") is None:
        return f"Missing required parameter: '{where}.content'.", f"{where}.content"
    del pending[call_id]
    return None


def _unanswered(pending: dict[str, int]) -> Problem:
    index = min(pending.values())
    ids = ", ".join(sorted(pending))
    return (
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        f"to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        f"{ids}",
        f"messages.[{index}].role",
    )
