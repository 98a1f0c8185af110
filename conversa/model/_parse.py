"""Reading untrusted answers: a completion, or the chunks of a stream, into a ModelResponse.

The SDK builds its objects from the JSON without validating it, so any field may hold any JSON
value (or be missing); everything here checks types instead of trusting the SDK's, and what
does not have the shape of an answer raises Malformed, saying why.
"""

from __future__ import annotations

import json
import re
import uuid
from functools import cache
from typing import Any

from ..messages import ToolCall
from ._protocol import (
    INVALID_TOOL_NAME,
    ModelResponse,
    TextDelta,
    ToolCallStarted,
    Usage,
    build_response,
)


class Malformed(Exception):
    """An answer that does not have the shape of a chat completion (the detail says why)."""


def read_completion(completion: Any, default_model: str, started: float) -> ModelResponse:
    """The ModelResponse of a whole (non-streamed) completion; Malformed if it is not one."""
    if not _is_object(completion):
        raise Malformed(f"the body is {_preview(completion)}, not an object")
    choices = _field(completion, "choices")
    if not choices:
        raise Malformed("the answer has no choices")
    if not isinstance(choices, list):
        raise Malformed(f"its choices are {_preview(choices)}, not a list")
    choice = choices[0]
    message = _field(choice, "message")
    if not _is_object(message):
        raise Malformed(f"its first choice has no message (message: {_preview(message)})")
    raw_calls = _field(message, "tool_calls")
    if raw_calls is not None and not isinstance(raw_calls, list):
        raise Malformed(f"the message's tool_calls are {_preview(raw_calls)}, not a list")
    calls: list[ToolCall] = []
    invalid: dict[str, str] = {}
    taken: set[str] = set()
    for raw in raw_calls or ():
        fn = _field(raw, "function")
        call, problem = _tool_call(
            _field(raw, "id"), _field(fn, "name"), _field(fn, "arguments"), taken
        )
        calls.append(call)
        if problem is not None:
            invalid[call.id] = problem
    return build_response(
        text=_content(_field(message, "content")),
        tool_calls=calls,
        model=_text_field(completion, "model") or default_model,
        usage=Usage.from_openai(_field(completion, "usage")),
        finish_reason=_text_field(choice, "finish_reason"),
        started=started,
        invalid_calls=invalid,
    )


class StreamState:
    """Assembles streamed chunks into text, tool calls and usage."""

    def __init__(self) -> None:
        self.yielded = False
        self.text_parts: list[str] = []
        self.tool_parts: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.model: str | None = None

    @property
    def text(self) -> str | None:
        """The answer text so far (None if none arrived)."""
        return "".join(self.text_parts) if self.text_parts else None

    def feed(self, chunk: Any) -> list[TextDelta | ToolCallStarted]:
        """Take one chunk; return the events it produces (Malformed if it is not a chunk)."""
        if not _is_object(chunk):
            raise Malformed(f"a stream chunk is {_preview(chunk)}, not an object")
        self.model = self.model or _text_field(chunk, "model")
        usage = _field(chunk, "usage")
        if usage is not None:
            self.usage = Usage.from_openai(usage)
        choices = _field(chunk, "choices")
        if choices is not None and not isinstance(choices, list):
            raise Malformed(f"a stream chunk's choices are {_preview(choices)}, not a list")
        events: list[TextDelta | ToolCallStarted] = []
        for choice in choices or ():
            if not _is_object(choice):
                raise Malformed(f"a stream chunk's choice is {_preview(choice)}")
            delta = _field(choice, "delta")
            if delta is not None and not _is_object(delta):
                raise Malformed(f"a stream chunk's delta is {_preview(delta)}")
            content = _content(_field(delta, "content"))
            if content:
                self.text_parts.append(content)
                events.append(TextDelta(content))
            calls = _field(delta, "tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise Malformed(f"a stream chunk's tool_calls are {_preview(calls)}")
            for call in calls or ():
                started = self._feed_call(call)
                if started is not None:
                    events.append(started)
            self.finish_reason = _text_field(choice, "finish_reason") or self.finish_reason
        self.yielded = self.yielded or bool(events)
        return events

    def _feed_call(self, call: Any) -> ToolCallStarted | None:
        index, call_id, fn = _field(call, "index"), _field(call, "id"), _field(call, "function")
        if not isinstance(index, int) or isinstance(index, bool):
            index = self._index_for(call_id)
        part = self.tool_parts.setdefault(
            index, {"id": None, "name": [], "bad_name": None, "arguments": [], "announced": False}
        )
        if isinstance(call_id, str) and call_id and not part["announced"]:
            part["id"] = call_id
        name, arguments = _field(fn, "name"), _field(fn, "arguments")
        if isinstance(name, str):
            part["name"].append(name)
        elif name is not None:
            part["bad_name"] = name
        if isinstance(arguments, str):
            part["arguments"].append(arguments)
        elif arguments is not None:
            part["arguments"].append(_json_text(arguments))
        if part["announced"] or part["bad_name"] is not None:
            return None
        full_name = _clean("".join(part["name"]))
        if not full_name.strip():
            return None
        part["announced"] = True
        part["id"] = part["id"] or _new_call_id()
        return ToolCallStarted(index=index, id=part["id"], name=full_name)

    def _index_for(self, call_id: object) -> int:
        # Some servers send no index: a new id starts a call, anything else continues the last.
        for index, part in self.tool_parts.items():
            if call_id is not None and part["id"] == call_id:
                return index
        last = max(self.tool_parts, default=-1)
        return last + 1 if last < 0 or (isinstance(call_id, str) and call_id) else last

    def calls(self) -> tuple[list[ToolCall], dict[str, str]]:
        """The complete tool calls, in index order, and the problems of malformed ones."""
        calls: list[ToolCall] = []
        invalid: dict[str, str] = {}
        taken: set[str] = set()
        for _, part in sorted(self.tool_parts.items()):
            name = part["bad_name"] if part["bad_name"] is not None else "".join(part["name"])
            arguments = "".join(part["arguments"])
            call, problem = _tool_call(part["id"], name, arguments, taken)
            calls.append(call)
            if problem is not None:
                invalid[call.id] = problem
        return calls, invalid


def _tool_call(
    raw_id: object, raw_name: object, raw_arguments: object, taken: set[str]
) -> tuple[ToolCall, str | None]:
    """A ToolCall the API will accept back in the history, and what was wrong, if anything.

    A missing or repeated id gets a fresh one, and non-string arguments their JSON text; a call
    without a usable name is kept under INVALID_TOOL_NAME so it can be answered with an error.
    """
    call_id = _clean(raw_id) if isinstance(raw_id, str) and raw_id.strip() else ""
    if not call_id or call_id in taken:
        call_id = _new_call_id()
    taken.add(call_id)
    if raw_arguments is None or isinstance(raw_arguments, str):
        arguments = _clean(raw_arguments or "") or "{}"
    else:
        arguments = _json_text(raw_arguments)
    if isinstance(raw_name, str) and raw_name.strip():
        return ToolCall(call_id, _clean(raw_name), arguments), None
    if raw_name is None or isinstance(raw_name, str):
        problem = "your tool call has no function name"
    else:
        problem = f"the function name of your tool call must be a string, not {_preview(raw_name)}"
    return ToolCall(call_id, INVALID_TOOL_NAME, arguments), problem


def _content(value: object) -> str | None:
    """A message's text; a list of text parts is joined, anything else is Malformed."""
    if value is None:
        return None
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, list):
        texts = [part if isinstance(part, str) else _field(part, "text") for part in value]
        if all(isinstance(t, str) for t in texts):
            return _clean("\n".join(texts))
    raise Malformed(f"the message content is {_preview(value)}, not text")


def _field(obj: object, name: str) -> Any:
    """A field of a JSON object (a dict or an SDK model); None if missing or not an object."""
    if isinstance(obj, dict):
        return obj.get(name)
    if isinstance(obj, _sdk_model()):
        return getattr(obj, name, None)
    return None


def _is_object(value: object) -> bool:
    return isinstance(value, dict | _sdk_model())


def _text_field(obj: object, name: str) -> str | None:
    value = _field(obj, name)
    return _clean(value) if isinstance(value, str) else None


@cache
def _sdk_model() -> type:
    import openai

    return openai.BaseModel


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text: str) -> str:
    """The text with lone surrogates (valid in JSON escapes, not in UTF-8) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _json_text(value: object) -> str:
    try:
        return _clean(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):
        return _clean(str(value))


def _preview(value: object) -> str:
    """A short description of a JSON value for an error message: `int 5`, `null`, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool | int | float | str | list | dict):
        return f"{type(value).__name__} {_json_text(value)[:80]}"
    return type(value).__name__


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
