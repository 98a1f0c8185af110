"""Building the prompt for one model call: the system prompt, the history repaired and trimmed to
a token budget, the user parts, and the request interceptors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .events import ModelRequest, RequestInterceptor, maybe_await
from .text_protocol import describe_tools_for_text_protocol
from .transcript import PromptHistory

TokenCounter = Callable[[dict[str, Any]], int]
"""Counts the tokens of one message in wire form."""

LIMIT_NOTE = (
    "You have reached the limit of tool use for this turn. Do not call tools; answer the user "
    "now as well as you can with what you have."
)
_IMAGE_TOKENS = 765  # what a high-detail 512x512 tile costs; a fair guess for any image part
_MESSAGE_OVERHEAD = 4


async def build_request(
    history: PromptHistory,
    options: PromptOptions,
    schemas: list[dict[str, Any]],
    *,
    text_protocol: bool,
    with_tools: bool,
    limit_note: bool,
    context: Any,
) -> ModelRequest:
    """The prompt for the next model call: repaired, trimmed, intercepted.

    ``schemas`` are the tools' (sent as ``tools``, or described in the system prompt for the
    text protocol); ``context`` is what the request interceptors get as their second argument.
    """
    system_lines = [options.system_prompt] if options.system_prompt else []
    if text_protocol and schemas and with_tools:
        system_lines.append(describe_tools_for_text_protocol(schemas))
    if limit_note:
        system_lines.append(LIMIT_NOTE)
    wire, user_index = history.prompt()
    interceptors = options.request_interceptors
    if interceptors:
        # interceptors may edit messages in place; the cached wire forms must not change
        wire = [dict(m) for m in wire]
    anchor = None  # the user's newest message: it always stays in the prompt
    if user_index is not None:
        if options.user_parts is not None:
            attach_user_parts(wire, user_index, options.user_parts())
        anchor = wire[user_index]
    request = ModelRequest(
        messages=wire, tools=schemas if (schemas and with_tools and not text_protocol) else None
    )
    for interceptor in interceptors:
        changed = await maybe_await(interceptor(request, context))
        request = changed if isinstance(changed, ModelRequest) else request
    system_lines.extend(request.extra_system)
    system = [{"role": "system", "content": "\n\n".join(system_lines)}] if system_lines else []
    keep = next((i for i, m in enumerate(request.messages) if m is anchor), None)
    count = options.token_counter
    request.messages = trim(
        system,
        request.messages,
        options.context_window,
        lambda message: history.cost(message, count),
        keep=keep,
    )
    return request


def attach_user_parts(
    wire: list[dict[str, Any]], index: int, parts: Sequence[dict[str, Any]]
) -> None:
    """Add content parts to the wire message at ``index`` (replaced by a new dict)."""
    if not parts:
        return
    content = wire[index]["content"]
    base = [{"type": "text", "text": content}] if isinstance(content, str) else content
    # a new dict: the cached wire form of the stored message must stay as it is
    wire[index] = {**wire[index], "content": [*base, *parts]}


def estimate_tokens(message: dict[str, Any]) -> int:
    """An offline estimate of a wire message's tokens: about four characters per token."""
    chars = 0
    images = 0
    content = message.get("content")
    if isinstance(content, str):
        chars += len(content)
    elif isinstance(content, list):
        for part in content:
            if part.get("type") == "text":
                chars += len(str(part.get("text", "")))
            else:
                images += 1
    for call in message.get("tool_calls") or ():
        fn = call.get("function", {})
        chars += len(fn.get("name", "")) + len(fn.get("arguments", ""))
    return _MESSAGE_OVERHEAD + (chars + 3) // 4 + images * _IMAGE_TOKENS


@dataclass(frozen=True, slots=True)
class PromptOptions:
    """What shapes every prompt of a turn besides the history."""

    system_prompt: str | None = None
    context_window: int | None = None
    """Tokens the prompt may take; None: no trimming."""
    token_counter: TokenCounter = estimate_tokens
    request_interceptors: Sequence[RequestInterceptor] = ()
    user_parts: Callable[[], list[dict[str, Any]]] | None = None
    """Content parts attached to the user's newest message, asked for at each model call."""


def _units(messages: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """Split into [start, end) units that must stay together: a tool call with its results."""
    units: list[tuple[int, int]] = []
    i = 0
    while i < len(messages):
        j = i + 1
        if messages[i].get("tool_calls"):
            while j < len(messages) and messages[j].get("role") == "tool":
                j += 1
        units.append((i, j))
        i = j
    return units


def trim(
    system: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    budget: int | None,
    count: TokenCounter = estimate_tokens,
    *,
    keep: int | None = None,
) -> list[dict[str, Any]]:
    """The system messages plus the newest messages that fit in ``budget`` tokens.

    Tool calls are never split from their results, and the message at index ``keep`` (by
    default the newest user message) is always kept, even when it alone exceeds the budget.
    """
    if budget is None:
        return system + messages
    left = budget - sum(count(m) for m in system)
    units = _units(messages)
    cost = [sum(count(messages[k]) for k in range(a, b)) for a, b in units]
    if keep is None:
        keep = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    newest_user = None  # the unit that holds message `keep`
    if keep is not None:
        newest_user = next(u for u, (a, b) in enumerate(units) if a <= keep < b)
    chosen: set[int] = set()
    u = len(units) - 1
    while u >= 0 and u != newest_user and cost[u] <= left:
        chosen.add(u)
        left -= cost[u]
        u -= 1
    if newest_user is not None:
        chosen.add(newest_user)
        left -= cost[newest_user]
        if u == newest_user:  # everything newer fitted: go on into older history
            u -= 1
            while u >= 0 and cost[u] <= left:
                chosen.add(u)
                left -= cost[u]
                u -= 1
    kept = [messages[k] for u, (a, b) in enumerate(units) if u in chosen for k in range(a, b)]
    return system + kept
