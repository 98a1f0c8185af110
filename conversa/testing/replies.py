"""The reply vocabulary shared by FakeOpenAIServer and ScriptedModel.

A script is a list of replies, one per model call, built with these factories:

    text("Hello!")                               an assistant answer
    tool_call("get_time", {"tz": "UTC"})          one native tool call (id generated)
    tool_calls(("a", {}), ("b", {"x": 1}))        several calls in one assistant message
    error(500, "boom")                            an HTTP error with an OpenAI-style body
    rate_limited(retry_after=1)                   429 with a Retry-After header
    server_error()                                500
    unauthorized()                                401, as for a wrong API key
    model_not_found()                             404, as for an unknown model name
    tools_unsupported()                           400 "... does not support tools"
    slow(seconds, then=text("late"))              answer only after a delay (client timeouts)
    drop_stream(after_chunks=2, text="...")       cut the connection mid-answer
    invalid_json()                                a 200 whose body is not JSON
    raw_completion(body)                          a 200 whose body is exactly `body` (malformed?)
    raw_stream(*events)                           a stream of exactly these SSE data events

Text-protocol (JSON ReAct) replies are plain text: text('{"final_answer": "4"}').
A script may also hold plain strings, assistant ChatMessages and lists of ToolCall (see
to_reply). When the script runs out, a Responder answers; the default, echo, replies
"echo: <last user text>".
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..messages import ChatMessage, ToolCall


@dataclass(frozen=True, slots=True)
class Fault:
    """A failure to inject instead of (or in the middle of) an answer."""

    status: int = 200
    message: str = ""
    error_type: str = "server_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    raw_body: str | None = None
    drop_after_chunks: int | None = None
    raw_bytes: bytes | None = None
    """A non-streaming answer's body, sent verbatim (it need not be UTF-8)."""
    raw_events: tuple[bytes, ...] | None = None
    """A streaming answer's SSE data events, sent verbatim."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted model answer: text and/or tool calls, optionally delayed or faulty."""

    text: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    fault: Fault | None = None
    delay: float = 0.0
    finish_reason: str | None = None

    @property
    def resolved_finish_reason(self) -> str:
        """The finish_reason to report: as given, else "tool_calls" or "stop"."""
        if self.finish_reason:
            return self.finish_reason
        return "tool_calls" if self.tool_calls else "stop"

    @property
    def is_error(self) -> bool:
        """True when this reply is an HTTP error status instead of an answer."""
        return self.fault is not None and self.fault.status >= 400


def new_call_id() -> str:
    """A fresh tool-call id in the style of the OpenAI API."""
    return "call_" + uuid.uuid4().hex[:24]


def text(content: str) -> Reply:
    """An assistant answer with this text."""
    return Reply(text=content)


def tool_call(
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    id: str | None = None,
    text: str | None = None,
) -> Reply:
    """An assistant message calling one tool with these arguments (id generated if not given)."""
    call = ToolCall(
        id=id or new_call_id(),
        name=name,
        arguments=json.dumps(dict(args or {}), ensure_ascii=False),
    )
    return Reply(text=text, tool_calls=(call,))


def tool_calls(*calls: tuple[str, Mapping[str, Any]], text: str | None = None) -> Reply:
    """An assistant message calling several tools at once: tool_calls(("a", {}), ("b", {...}))."""
    built = tuple(
        ToolCall(id=new_call_id(), name=name, arguments=json.dumps(dict(args), ensure_ascii=False))
        for name, args in calls
    )
    return Reply(text=text, tool_calls=built)


def error(
    status: int,
    message: str = "scripted error",
    *,
    error_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    raw_body: str | None = None,
) -> Reply:
    """An HTTP error with an OpenAI-style JSON body (or raw_body verbatim)."""
    default_type = "invalid_request_error" if status < 500 else "server_error"
    return Reply(
        fault=Fault(
            status=status,
            message=message,
            error_type=error_type or default_type,
            param=param,
            code=code,
            headers=dict(headers or {}),
            raw_body=raw_body,
        )
    )


def rate_limited(retry_after: float | None = None) -> Reply:
    """429 Too Many Requests, with a Retry-After header (seconds) when given."""
    headers = {"Retry-After": _seconds(retry_after)} if retry_after is not None else {}
    return error(
        429,
        "Rate limit reached; please try again later.",
        error_type="requests",
        code="rate_limit_exceeded",
        headers=headers,
    )


def server_error(status: int = 500, message: str = "The server had an error.") -> Reply:
    """A 5xx server error."""
    return error(status, message, error_type="server_error")


def unauthorized() -> Reply:
    """401, as the API answers a wrong API key."""
    return error(
        401,
        "Incorrect API key provided.",
        error_type="invalid_request_error",
        code="invalid_api_key",
    )


def model_not_found(model: str | None = None) -> Reply:
    """404 for an unknown model; the name defaults to the one in the request."""
    return error(
        404,
        f"The model `{model or '{model}'}` does not exist or you do not have access to it.",
        error_type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def tools_unsupported() -> Reply:
    """400 as a server answers a `tools` parameter its model cannot use (Ollama's wording)."""
    return error(
        400,
        "{model} does not support tools",
        error_type="invalid_request_error",
        param="tools",
    )


def slow(seconds: float, then: Reply | str | None = None) -> Reply:
    """Answer `then` (default: the default responder's text) only after `seconds`."""
    base = to_reply(then) if then is not None else Reply()
    return Reply(
        text=base.text,
        tool_calls=base.tool_calls,
        fault=base.fault,
        delay=seconds,
        finish_reason=base.finish_reason,
    )


def drop_stream(after_chunks: int = 1, text: str = "partial answer that never ends") -> Reply:
    """Cut the connection after `after_chunks` chunks of `text` (at once if not streaming)."""
    return Reply(text=text, fault=Fault(drop_after_chunks=after_chunks))


def invalid_json(body: str = "this is not JSON {") -> Reply:
    """A 200 answer whose body (or streamed data line) is not valid JSON."""
    return Reply(fault=Fault(status=200, raw_body=body))


def raw_completion(body: str | bytes | Mapping[str, Any]) -> Reply:
    """A 200 non-streaming answer whose body is exactly `body` (a mapping is sent as JSON)."""
    return Reply(fault=Fault(status=200, raw_bytes=_raw(body)))


def raw_stream(*events: str | bytes | Mapping[str, Any], done: bool = True) -> Reply:
    """A 200 stream of exactly these SSE data events (mappings as JSON), then [DONE] if `done`.

    Nothing else is sent: no role chunk, no finish chunk unless one of the events is one.
    """
    data = tuple(_raw(e) for e in events) + ((b"[DONE]",) if done else ())
    return Reply(fault=Fault(status=200, raw_events=data))


def _raw(value: str | bytes | Mapping[str, Any]) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        # surrogatepass: a test may send text that is not valid Unicode on purpose
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


ReplyLike = Reply | str | ChatMessage | ToolCall | list[ToolCall] | tuple[ToolCall, ...]
Responder = Callable[[dict[str, Any]], ReplyLike]
"""Answers a request (the chat-completions JSON body) the script has no reply left for."""


def to_reply(value: ReplyLike) -> Reply:
    """Coerce a script entry: a string is text, ToolCalls become one tool-calling message."""
    if isinstance(value, Reply):
        return value
    if isinstance(value, str):
        return text(value)
    if isinstance(value, ChatMessage):
        if value.role != "assistant":
            raise TypeError(f"a scripted reply must be an assistant message, not {value.role}")
        return Reply(text=value.text or None, tool_calls=value.tool_calls)
    if isinstance(value, ToolCall):
        return Reply(tool_calls=(value,))
    if isinstance(value, list | tuple) and all(isinstance(c, ToolCall) for c in value):
        return Reply(tool_calls=tuple(value))
    raise TypeError(
        f"cannot use {value!r:.80} as a reply; use a string, text(...), tool_call(...), "
        "a list of ToolCall or one of the fault factories"
    )


def last_user_text(request: Mapping[str, Any]) -> str:
    """The text of the last user message of a chat request ("" if none)."""
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def echo(request: dict[str, Any]) -> Reply:
    """The default responder: "echo: <last user text>"."""
    return Reply(text=f"echo: {last_user_text(request)}")


_PIECE = re.compile(r"\s*\S+\s*|\s+")


def split_text(content: str) -> list[str]:
    """Split text into word-sized stream pieces whose concatenation is the text."""
    return _PIECE.findall(content)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
