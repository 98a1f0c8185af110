"""What a turn produces (events and its result) and the types of the hooks that shape it."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .messages import ChatMessage, ToolCall
from .model import ModelResponse, TextDelta, ToolCallStarted, Usage

if TYPE_CHECKING:
    from .session import Session

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


RequestInterceptor = Callable[
    [ModelRequest, "Session"], ModelRequest | Awaitable[ModelRequest | None] | None
]
ResponseInterceptor = Callable[
    [ModelResponse, "Session"], ModelResponse | Awaitable[ModelResponse | None] | None
]
Approver = Callable[[str, dict[str, Any]], bool | Awaitable[bool]]


async def maybe_await(value: Any) -> Any:
    """The value, awaited first if it is awaitable (callbacks may be sync or async)."""
    return await value if inspect.isawaitable(value) else value
