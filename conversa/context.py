"""Building the prompt for one model call: the system prompt, the history repaired and trimmed to
a token budget, the user parts, and the request interceptors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._prompt_history import PromptHistory
from .compaction import SUMMARY_INTRO, Compaction
from .events import ModelRequest, RequestInterceptor, maybe_await
from .text_protocol import describe_tools_for_text_protocol

if TYPE_CHECKING:
    from .transcript import Transcript

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
    summary = history.summary_text
    if summary:
        system_lines.append(f"{SUMMARY_INTRO}\n{summary}")
    if text_protocol and schemas and with_tools:
        system_lines.append(describe_tools_for_text_protocol(schemas))
    if limit_note:
        system_lines.append(LIMIT_NOTE)
    wire, user_index = history.prompt()  # the history's own list: never changed here
    parts = options.user_parts() if options.user_parts is not None else []
    interceptors = options.request_interceptors
    anchor = None  # the user's newest message with its parts: it always stays in the prompt
    keep = user_index
    if interceptors:
        # interceptors may edit messages in place; the cached wire forms must not change
        wire = [dict(m) for m in wire]
        if user_index is not None:
            if parts:
                attach_user_parts(wire, user_index, parts)
            anchor = wire[user_index]
    elif user_index is not None and parts:
        anchor = with_user_parts(wire[user_index], parts)
    request = ModelRequest(
        messages=wire, tools=schemas if (schemas and with_tools and not text_protocol) else None
    )
    for interceptor in interceptors:
        changed = await maybe_await(interceptor(request, context))
        request = changed if isinstance(changed, ModelRequest) else request
    system_lines.extend(request.extra_system)
    system = [{"role": "system", "content": "\n\n".join(system_lines)}] if system_lines else []
    if interceptors:
        # where the anchor went: near the end, unless an interceptor moved or dropped it
        keep = _newest(request.messages, lambda m: m is anchor) if anchor is not None else None
        anchor = None
    count = options.token_counter
    window = options.context_window
    if window is not None:
        # the server's count of the last prompt corrects the estimate (see Calibration)
        window -= options.calibration.margin
    request.messages = trim(
        system,
        request.messages,
        window,
        lambda message: history.cost(message, count),
        keep=keep,
        anchor=anchor,
    )
    return request


def prompt_estimate(
    messages: Sequence[dict[str, Any]], history: PromptHistory, count: TokenCounter
) -> int:
    """The estimated tokens of a prompt (each history message counted once, then cached)."""
    return sum(history.cost(m, count) for m in messages)


@dataclass(slots=True)
class Calibration:
    """What the server said the last prompt cost, against what it was estimated to cost.

    The reported ``prompt_tokens`` is the exact size of what was sent; the next estimate is
    that figure plus the estimate of only what changed since (``offset`` = reported minus
    estimated, added to every estimate). Kept by the session across its turns.
    """

    offset: int = 0
    reported: int | None = None
    """The prompt tokens the server reported for the last call (None: none yet)."""
    estimated: int | None = None
    """What that prompt was estimated at."""
    unreported: bool = False
    """The last call's server reported no usage: estimates are the estimator's alone."""

    def observe(self, estimated: int, reported: int) -> None:
        """Take in one model call: the prompt's estimate and what the server reported."""
        self.estimated = estimated
        if reported > 0:
            self.offset, self.reported, self.unreported = reported - estimated, reported, False
        else:
            self.offset, self.reported, self.unreported = 0, None, True

    def estimate(self, estimated: int) -> int:
        """A prompt's calibrated size from its estimate."""
        return estimated + self.offset

    @property
    def margin(self) -> int:
        """What trimming and compaction add to an estimate: the offset when the server counts
        more than the estimator, else nothing (a prompt too big is an error from the API; one
        a little smaller than it could be is not)."""
        return max(0, self.offset)

    def limit(self, estimated: int) -> int:
        """A prompt's size as trimming and compaction judge it: never below the estimate."""
        return estimated + self.margin

    @property
    def source(self) -> str:
        """How estimates are made, in words."""
        if self.unreported:
            return "estimated (the server reports no usage)"
        if self.reported is None:
            return "estimated (no model call yet to calibrate by)"
        return "calibrated by the server's reported usage"


def attach_user_parts(
    wire: list[dict[str, Any]], index: int, parts: Sequence[dict[str, Any]]
) -> None:
    """Add content parts to the wire message at ``index`` (replaced by a new dict)."""
    if parts:
        wire[index] = with_user_parts(wire[index], parts)


def with_user_parts(message: dict[str, Any], parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A copy of the wire message with content parts added (the cached one stays as it is)."""
    content = message["content"]
    base = [{"type": "text", "text": content}] if isinstance(content, str) else content
    return {**message, "content": [*base, *parts]}


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
    calibration: Calibration = field(default_factory=lambda: Calibration())
    """The correction of estimates by reported usage (shared across a session's turns)."""
    compaction: Compaction | None = None
    """When and how to summarize the oldest messages (None: trim only)."""


def _newest(
    messages: Sequence[dict[str, Any]], test: Callable[[dict[str, Any]], bool]
) -> int | None:
    """The index of the newest message that passes ``test`` (searched from the end)."""
    for i in range(len(messages) - 1, -1, -1):
        if test(messages[i]):
            return i
    return None


def _unit_start(messages: Sequence[dict[str, Any]], k: int) -> int:
    """Where the unit holding message ``k`` starts: a tool call's results go with the call."""
    if messages[k].get("role") != "tool":
        return k
    i = k
    while i > 0 and messages[i - 1].get("role") == "tool":
        i -= 1
    return i - 1 if i > 0 and messages[i - 1].get("tool_calls") else k


def _unit_end(messages: Sequence[dict[str, Any]], start: int) -> int:
    """Where the unit starting at ``start`` ends (exclusive)."""
    end = start + 1
    if messages[start].get("tool_calls"):
        while end < len(messages) and messages[end].get("role") == "tool":
            end += 1
    return end


def trim(
    system: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    budget: int | None,
    count: TokenCounter = estimate_tokens,
    *,
    keep: int | None = None,
    anchor: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The system messages plus the newest messages that fit in ``budget`` tokens.

    Tool calls are never split from their results, and the message at index ``keep`` (by
    default the newest user message) is always kept, even when it alone exceeds the budget;
    ``anchor``, if given, is sent (and counted) in its place. Only the messages that are kept
    (and the first one that does not fit) are looked at, so the cost does not grow with the
    history. Without a budget, system, anchor or copy, the result is ``messages`` itself.
    """
    if budget is None:
        if not system and anchor is None:
            return messages
        out = system + messages
        if anchor is not None and keep is not None:
            out[len(system) + keep] = anchor
        return out
    if keep is None and anchor is None:
        keep = _newest(messages, lambda m: m.get("role") == "user")

    def cost(k: int) -> int:
        return count(anchor) if k == keep and anchor is not None else count(messages[k])

    left = budget - sum(count(m) for m in system)
    forced = _unit_start(messages, keep) if keep is not None else None  # kept come what may
    start = len(messages)  # messages[start:] are kept
    while start > 0:
        first = _unit_start(messages, start - 1)
        unit = cost(first) if first == start - 1 else sum(map(cost, range(first, start)))
        if first == forced:
            forced = None
        elif unit > left:
            break
        left -= unit
        start = first
    kept = messages[forced : _unit_end(messages, forced)] if forced is not None else []
    kept += messages[start:]
    if anchor is not None and keep is not None:
        at = keep - forced if forced is not None else len(kept) - (len(messages) - keep)
        kept[at] = anchor
    return system + kept


@dataclass(frozen=True, slots=True)
class ContextStatus:
    """How much of a session's history the model sees in its next prompt."""

    messages: int
    """Every stored message (summary records included)."""
    summarized: int
    """Messages the newest summary stands for (0: no summary)."""
    sent: int
    """History messages the next prompt carries verbatim (after the summary and trimming)."""
    tokens: int
    """The next prompt's estimated tokens (calibrated when the server reports usage)."""
    context_window: int | None
    compaction: bool
    """Whether compaction is on."""
    estimate: str
    """How ``tokens`` was reached, in words."""


def context_status(
    transcript: Transcript, options: PromptOptions, *, compaction: object
) -> ContextStatus:
    """What the next prompt of ``transcript`` would hold, without calling anything."""
    from .compaction import summary_range

    history = transcript.cache
    count = options.token_counter
    lines = [options.system_prompt] if options.system_prompt else []
    if history.summary_text:
        lines.append(f"{SUMMARY_INTRO}\n{history.summary_text}")
    system = [{"role": "system", "content": "\n\n".join(lines)}] if lines else []
    wire, _ = history.prompt()
    window = options.context_window
    budget = None if window is None else window - options.calibration.margin
    kept = trim(system, wire, budget, lambda m: history.cost(m, count))
    covers = summary_range(history.summary) if history.summary is not None else None
    return ContextStatus(
        messages=len(transcript),
        summarized=covers.covered if covers is not None else 0,
        sent=len(kept) - len(system),
        tokens=options.calibration.estimate(prompt_estimate(kept, history, count)),
        context_window=window,
        compaction=compaction is not None,
        estimate=options.calibration.source if window is not None else "estimated (no window)",
    )
