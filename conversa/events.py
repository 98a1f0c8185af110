"""What a turn produces (events and its result) and the types of the hooks that shape it."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .messages import ChatMessage, ToolCall
from .model import ModelResponse, TextDelta, ToolCallStarted, Usage

StopReason = Literal["final_answer", "max_iterations", "cancelled", "error"]
ReactMode = Literal["auto", "tools", "text"]
OnLimit = Literal["stop", "generate"]


@dataclass(frozen=True, slots=True)
class Step:
    """One action of the loop: the model's thought, the tool it chose and what came back."""

    thought: str | None
    action: str | None
    action_input: dict[str, Any] | str | None
    observation: str | None


@dataclass(frozen=True, slots=True)
class AgentResult:
    """The outcome of one user turn."""

    result: str
    steps: list[Step]
    success: bool
    iterations: int
    usage: Usage
    stop_reason: StopReason
    error: str | None = None
    messages: list[ChatMessage] = field(default_factory=list)
    """The messages this turn stored, in order."""
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    """The ModelError that ended the turn, for a traceback (``error`` is its message)."""
    warnings: list[str] = field(default_factory=list)
    """What went wrong without ending the turn (a compaction that failed, ...)."""


@dataclass(frozen=True, slots=True)
class ToolRunning:
    """A tool is about to run with these arguments."""

    call: ToolCall


@dataclass(frozen=True, slots=True)
class ToolDone:
    """A tool finished; ``ok`` is False when its output is an error the model will see."""

    call: ToolCall
    output: str
    ok: bool


@dataclass(frozen=True, slots=True)
class TurnDone:
    """The turn is over; always the last event."""

    result: AgentResult


TurnEvent = TextDelta | ToolCallStarted | ToolRunning | ToolDone | TurnDone


@dataclass(slots=True)
class ModelRequest:
    """What goes to the model; request interceptors may change any of it."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    extra_system: list[str] = field(default_factory=list)
    """Lines appended to the system prompt for this call only."""
    session: Any = None
    """The Session the request is for (set before the interceptors see it)."""

    def add_system_context(self, text: str) -> None:
        """Append ``text`` to the system prompt of this call (DCAF's name)."""
        self.extra_system.append(text)

    def get_latest_user_message(self) -> str:
        """The text of the newest user message ("" if there is none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                parts = content if isinstance(content, list) else []
                return "\n".join(
                    str(p.get("text", ""))
                    for p in parts
                    if isinstance(p, dict) and p.get("type") == "text"
                )
        return ""


@dataclass(slots=True)
class InterceptedResponse:
    """The model's answer as a one-argument response interceptor gets it (DCAF's shape).

    ``text`` may be changed; the stored assistant message then carries the new text.
    """

    text: str
    tool_calls: list[dict[str, Any]]
    usage: Usage
    session: Any
    raw: ModelResponse
    """The response as the model gave it."""

    def has_tool_calls(self) -> bool:
        """Whether the model asked for tools."""
        return bool(self.tool_calls)

    def get_text_length(self) -> int:
        """The length of ``text``."""
        return len(self.text)


RequestInterceptor = Callable[..., ModelRequest | Awaitable[ModelRequest | None] | None]
"""``(request, session)`` or, DCAF's shape, ``(request)`` with ``request.session``."""
ResponseInterceptor = Callable[..., Any]
"""``(response, session)`` on the ModelResponse, returning it (changed) or None; or, DCAF's
shape, ``(response)`` on an InterceptedResponse, returning it, a ModelResponse or None."""
Approver = Callable[[str, dict[str, Any]], bool | Awaitable[bool]]


async def maybe_await(value: Any) -> Any:
    """The value, awaited first if it is awaitable (callbacks may be sync or async)."""
    return await value if inspect.isawaitable(value) else value
