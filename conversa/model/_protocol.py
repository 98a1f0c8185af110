"""What a model answers: the ChatModel protocol, ModelResponse, stream events, Usage."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..messages import ChatMessage, ToolCall

WireMessage = dict[str, Any]

INVALID_TOOL_NAME = "invalid_tool_call"
"""The name a tool call without a usable function name is stored under (the API needs one)."""
INVALID_CALLS_KEY = "invalid_tool_calls"
"""The assistant metadata key mapping the id of each such call to what was wrong with it."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one or more model calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def __sub__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
        )

    def to_dict(self) -> dict[str, int]:
        """The OpenAI shape: prompt_tokens, completion_tokens, total_tokens."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total,
        }

    @classmethod
    def from_openai(cls, usage: Any) -> Usage:
        """From an SDK usage object or dict (None gives zero usage)."""
        if usage is None:
            return cls()
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        else:
            prompt = getattr(usage, "prompt_tokens", None)
            completion = getattr(usage, "completion_tokens", None)
        return cls(_token_count(prompt), _token_count(completion))


def _token_count(value: object) -> int:
    # a server may send anything here: what is not a finite count is no count
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and math.isfinite(value):
        return max(int(value), 0)
    return 0


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """One model answer: the assistant message (with model, usage, latency metadata)."""

    message: ChatMessage
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        """The answer's text ("" when it only calls tools)."""
        return self.message.text

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tool calls the model asked for."""
        return self.message.tool_calls


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of answer text, as it arrives."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    """The model began a tool call (its arguments are still arriving)."""

    index: int
    id: str
    name: str


StreamEvent = TextDelta | ToolCallStarted | ModelResponse


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """A model call is about to be retried: why, after how long, and which retry it is."""

    reason: str
    delay: float
    attempt: int
    retries: int


@runtime_checkable
class ChatModel(Protocol):
    """Anything that answers chat messages in the OpenAI wire form."""

    name: str

    async def complete(
        self,
        messages: Sequence[WireMessage],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> ModelResponse:
        """The whole answer to these messages."""
        ...

    def stream(
        self,
        messages: Sequence[WireMessage],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Deltas as they arrive, then the final ModelResponse."""
        ...


def build_response(
    *,
    text: str | None,
    tool_calls: Sequence[ToolCall],
    model: str,
    usage: Usage,
    finish_reason: str | None,
    started: float,
    invalid_calls: Mapping[str, str] | None = None,
) -> ModelResponse:
    """A ModelResponse whose assistant message carries model, usage, latency and finish reason.

    invalid_calls maps the ids of tool calls the model got wrong to what was wrong with them
    (stored under INVALID_CALLS_KEY, for the agent to answer each with that error).
    """
    metadata: dict[str, Any] = {
        "model": model,
        "usage": usage.to_dict(),
        "latency_ms": round((time.monotonic() - started) * 1000),
        "finish_reason": finish_reason,
    }
    if invalid_calls:
        metadata[INVALID_CALLS_KEY] = dict(invalid_calls)
    message = ChatMessage.assistant(
        content=text if text or not tool_calls else None,
        tool_calls=tuple(tool_calls),
        metadata=metadata,
    )
    return ModelResponse(message=message, usage=usage, finish_reason=finish_reason)
