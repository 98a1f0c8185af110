"""Compaction: summarizing the oldest part of a conversation so the prompt fits the window.

Nothing stored is ever changed or removed. A summary is a message of its own, appended to the
history (role "system", ``metadata["compaction"]`` naming the first and last message ids it
covers, the model, and the prompt's estimated tokens before and after). From then on the prompt
is: the system prompt with the newest summary, then the messages after the last one it covers.
The next compaction summarizes that summary together with what came after it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .messages import ChatMessage

if TYPE_CHECKING:
    from ._prompt_history import PromptHistory
    from .context import PromptOptions
    from .model import ChatModel, Usage
    from .storage import SummaryMark
    from .transcript import Transcript

Counter = Callable[[dict[str, Any]], int]

log = logging.getLogger(__name__)

SUMMARY_KEY = "compaction"
"""The metadata key that marks a summary record and holds what it covers."""

DEFAULT_SUMMARY_PROMPT = """\
You are compacting a long conversation between a user and an AI assistant so that the \
assistant can go on with it without the full transcript. Write a summary that the assistant \
will read in place of the earlier messages. Keep everything it needs: who the user is and \
what they said about themselves (names, preferences, constraints), the task and its goals, \
decisions made and why, facts and figures established, what tools were used and what they \
found, open questions and what was about to happen next. Quote short important phrases of \
the user exactly. Leave out greetings and small talk. If an earlier summary is given, fold it \
in: nothing it holds may be lost. Write plain prose or short bullet points, in the language \
of the conversation, without any preamble."""
"""The summary prompt: the system message of every summary request (replace it with
``Compaction(prompt=...)``)."""

SUMMARY_INTRO = "Summary of the earlier part of this conversation (its messages are not shown):"
"""How the summary is introduced in the system message of the prompt."""

MAX_SUMMARY_CALLS = 8
"""The most summary calls one compaction makes: a first summary of a history far bigger than
the window is made in turn-aligned chunks, each folded into the next; beyond this many the
chunks are shortened to fit (tool outputs first, user messages last)."""

_SHORTENINGS = ((300, None), (80, None), (80, 400))
"""(tool output chars, assistant text chars) tried in turn until the request fits."""


@dataclass(frozen=True, slots=True)
class Compaction:
    """When and how a session compacts its prompt (give it as ``Session(compaction=...)``)."""

    threshold: float = 0.8
    """Compact when the prompt would exceed this share of the context window."""
    keep_recent: float = 0.3
    """At least this share of the window, in the newest messages, always stays verbatim."""
    prompt: str = DEFAULT_SUMMARY_PROMPT
    """The system message of the summary request."""
    timeout: float | None = 120.0
    """Seconds the summary call may take; then the turn goes on with trimming."""

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], not {self.threshold!r}")
        if not 0 <= self.keep_recent < 1:
            raise ValueError(f"keep_recent must be in [0, 1), not {self.keep_recent!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the summary prompt must be a non-empty string")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {self.timeout!r}")


def compaction_option(value: Compaction | bool | None) -> Compaction | None:
    """``Session(compaction=...)``: True for the defaults, False/None for none."""
    if value is None or value is False:
        return None
    if value is True:
        return Compaction()
    if isinstance(value, Compaction):
        return value
    raise ValueError(f"compaction must be a Compaction, True, False or None, not {value!r}")


# -- the summary record ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SummaryRange:
    """What a summary record covers: stored messages from ``first_id`` through ``last_id``."""

    first_id: str
    last_id: str
    covered: int
    """How many messages it stands for (earlier summaries not counted)."""


def summary_range(message: ChatMessage) -> SummaryRange | None:
    """The range of a summary record, or None if ``message`` is not a (well-formed) one."""
    if message.role != "system":
        return None
    meta = message.metadata.get(SUMMARY_KEY)
    if not isinstance(meta, dict):
        return None
    first, last, covered = meta.get("first_id"), meta.get("last_id"), meta.get("covered", 0)
    if not (isinstance(first, str) and isinstance(last, str) and first and last):
        return None
    return SummaryRange(first, last, covered if isinstance(covered, int) else 0)


def newest_summary(history: Sequence[ChatMessage]) -> SummaryMark | None:
    """Where the newest summary record of ``history`` is and the position of the last message
    it covers, or None if it has no well-formed one (a summary whose messages are gone)."""
    from .storage import SummaryMark

    for at in range(len(history) - 1, -1, -1):
        covers = summary_range(history[at])
        if covers is not None:
            for k in range(at - 1, -1, -1):
                if history[k].id == covers.last_id:
                    return SummaryMark(at, k)
    return None


def summary_record(
    text: str,
    covers: SummaryRange,
    *,
    model: str,
    tokens_before: int,
    tokens_after: int,
    usage: Usage,
) -> ChatMessage:
    """The message that stores a summary beside the history it summarizes."""
    meta = {
        "first_id": covers.first_id,
        "last_id": covers.last_id,
        "covered": covers.covered,
        "model": model,
        "tokens_before": tokens_before,
        "tokens_after": tokens_after,
    }
    return ChatMessage.system(
        text, metadata={SUMMARY_KEY: meta, "model": model, "usage": usage.to_dict()}
    )


# -- choosing the cut -----------------------------------------------------------------------


def is_turn_start(message: ChatMessage) -> bool:
    """A message the user wrote: a turn starts there, and no tool call spans it."""
    return message.role == "user" and not message.metadata.get("observation")


def choose_cut(
    messages: Sequence[ChatMessage], costs: Sequence[int], keep_tokens: int
) -> int | None:
    """Where the verbatim part begins: the newest turn start that keeps at least
    ``keep_tokens`` (and the newest user message) after it; None if nothing comes before it.

    A turn start never falls between an assistant's tool call and its results.
    """
    newest_user = None
    for i in range(len(messages) - 1, -1, -1):
        if is_turn_start(messages[i]):
            newest_user = i
            break
    if newest_user is None:
        return None
    tokens = sum(costs[newest_user:])
    for i in range(newest_user, 0, -1):
        if i < newest_user:
            tokens += costs[i]
        if tokens >= keep_tokens and is_turn_start(messages[i]):
            return i
    return None


# -- the summary request --------------------------------------------------------------------


def _shorten(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return text[:limit].rstrip() + f" […{len(text) - limit} characters left out]"


def render(
    messages: Sequence[ChatMessage],
    previous: str | None,
    *,
    tool_chars: int | None,
    assistant_chars: int | None,
    user_chars: int | None = None,
) -> str:
    """The conversation as plain text for the summary request: user messages verbatim
    (unless ``user_chars``), tool outputs and assistant text shortened to the limits."""
    lines: list[str] = []
    if previous:
        lines.append(f"[Earlier summary]\n{previous}")
    for m in messages:
        if summary_range(m) is not None:
            continue  # an older summary: the newest one is given above
        if m.role == "user":
            lines.append(f"[User]\n{_shorten(m.text, user_chars)}")
        elif m.role == "assistant":
            if m.text:
                lines.append(f"[Assistant]\n{_shorten(m.text, assistant_chars)}")
            for call in m.tool_calls:
                args = _shorten(call.arguments, tool_chars)
                lines.append(f"[Assistant calls tool {call.name}] {args}")
        elif m.role == "tool":
            name = m.metadata.get("tool") or "tool"
            lines.append(f"[Result of {name}]\n{_shorten(m.text, tool_chars)}")
        else:
            lines.append(f"[System]\n{_shorten(m.text, assistant_chars)}")
    return "\n\n".join(lines)


def summary_request(
    prompt: str,
    messages: Sequence[ChatMessage],
    previous: str | None,
    budget: int | None,
    count: Callable[[dict[str, Any]], int],
) -> list[dict[str, Any]]:
    """The messages of the summary call, shortened (tool outputs first) to fit ``budget``."""
    system = {"role": "system", "content": prompt}
    fixed = count(system)
    request: list[dict[str, Any]] = []
    for tool_chars, assistant_chars in _SHORTENINGS:
        text = render(messages, previous, tool_chars=tool_chars, assistant_chars=assistant_chars)
        request = [system, {"role": "user", "content": _ASK + text}]
        if budget is None or fixed + count(request[1]) <= budget:
            return request
    # the user's own words alone exceed the budget: the last resort shortens them too
    assert budget is not None
    user_chars = 2000
    while user_chars > 50:
        text = render(messages, previous, tool_chars=80, assistant_chars=200, user_chars=user_chars)
        request = [system, {"role": "user", "content": _ASK + text}]
        if fixed + count(request[1]) <= budget:
            break
        user_chars //= 2
    return request


_ASK = "Summarize this conversation as instructed.\n\n"


class CompactionFailed(Exception):
    """The summary could not be made (the turn goes on with trimming)."""


async def summarize(
    model: ChatModel, request: list[dict[str, Any]], timeout: float | None
) -> tuple[str, Usage]:
    """One model call without tools; its text and usage (CompactionFailed if none)."""
    from .errors import ModelError

    try:
        response = await asyncio.wait_for(model.complete(request, tools=None), timeout)
    except TimeoutError as exc:
        raise CompactionFailed(f"the summary call took longer than {timeout:g}s") from exc
    except ModelError as exc:
        raise CompactionFailed(f"the summary call failed: {exc}") from exc
    text = response.message.text.strip()
    if not text:
        raise CompactionFailed("the summary call returned no text")
    return text, response.usage


def describe(message: ChatMessage) -> str:
    """A one-line account of a summary record, for the CLI."""
    covers = summary_range(message)
    meta = message.metadata.get(SUMMARY_KEY) or {}
    before, after = meta.get("tokens_before"), meta.get("tokens_after")
    shrink = f", prompt ~{before} -> ~{after} tokens" if before and after else ""
    count = covers.covered if covers else 0
    return f"summary of {count} messages{shrink}"


# -- running one compaction -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What one compaction did: the summary it stored, or why there is none."""

    summary: ChatMessage | None
    """The summary record appended to the history (None: none was made)."""
    reason: str
    """What happened, in words."""
    usage: Usage
    """What the summary call used (zero if there was none)."""
    calls: int = 0
    """Summary calls that answered (more than one when older messages came in chunks)."""
    failed: bool = False
    """The summary call failed, timed out, returned nothing, or did not shrink the prompt."""


def _system_tokens(options: PromptOptions, summary: str | None, count: Counter) -> int:
    lines = [options.system_prompt] if options.system_prompt else []
    if summary:
        lines.append(f"{SUMMARY_INTRO}\n{summary}")
    return count({"role": "system", "content": "\n\n".join(lines)}) if lines else 0


def compaction_due(history: PromptHistory, options: PromptOptions) -> bool:
    """Whether the next prompt would exceed the threshold (counting from the newest message
    back, and stopping there: the cost does not grow with the history)."""
    settings, window = options.compaction, options.context_window
    if settings is None or window is None:
        return False
    count = options.token_counter
    limit = settings.threshold * window - options.calibration.margin
    tokens = _system_tokens(options, history.summary_text, count)
    wire = history.live_wire
    for i in range(len(wire) - 1, -1, -1):
        tokens += history.cost(wire[i], count)
        if tokens > limit:
            return True
    return tokens > limit


def chunks(
    messages: Sequence[ChatMessage], costs: Sequence[int], size: int | None
) -> list[list[ChatMessage]]:
    """``messages`` in consecutive parts of about ``size`` tokens, each starting a turn
    (a single turn bigger than that is one part), at most MAX_SUMMARY_CALLS of them."""
    if size is None or not messages:
        return [list(messages)] if messages else []
    size = max(size, -(-sum(costs) // MAX_SUMMARY_CALLS))
    parts: list[list[ChatMessage]] = [[]]
    tokens = 0
    for message, cost in zip(messages, costs, strict=True):
        if parts[-1] and tokens + cost > size and is_turn_start(message):
            parts.append([])
            tokens = 0
        parts[-1].append(message)
        tokens += cost
    while len(parts) > MAX_SUMMARY_CALLS:  # turns bigger than a part: merge the smallest pair
        sizes = [len(a) + len(b) for a, b in itertools.pairwise(parts)]
        i = sizes.index(min(sizes))
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


async def _older_part(
    transcript: Transcript,
) -> tuple[list[ChatMessage], ChatMessage | None]:
    """The stored messages older than the cache that no summary covers yet, and the newest
    summary among them (read when compaction starts on a history that outgrew its window
    before it was on, or whose summary the cache did not reach)."""
    older = await transcript.older_than_cache()
    mark = newest_summary(older)
    start, summary = (0, None) if mark is None else (mark.covered_to + 1, older[mark.at])
    return [m for m in older[start:] if summary_range(m) is None], summary


async def compact_transcript(
    transcript: Transcript, options: PromptOptions, model: ChatModel, *, force: bool = False
) -> CompactionResult:
    """Summarize the oldest part of the prompt into a summary record appended to storage.

    Without ``force`` it runs only when ``compaction_due``. The summary covers every message
    before the cut: if the cache starts later and holds no summary, the older messages are
    read for it (in up to MAX_SUMMARY_CALLS chunks). Every failure is a result with
    ``failed`` set, never an exception: the caller goes on with trimming.
    """
    from .model import Usage

    none = Usage()
    settings = options.compaction or Compaction()
    history = transcript.cache
    if not force and not compaction_due(history, options):
        return CompactionResult(None, "the prompt is below the threshold", none)
    count, window, calibration = options.token_counter, options.context_window, options.calibration
    live = list(history.live)
    costs = [history.cost(w, count) for w in history.live_wire]
    previous = history.summary
    before = calibration.limit(_system_tokens(options, history.summary_text, count) + sum(costs))
    keep = int(settings.keep_recent * window) if window is not None else 0
    cut = choose_cut(live, costs, keep)
    if cut is None:
        why = "nothing to summarize: the newest turn and the recent messages are all there is"
        return CompactionResult(None, why, none)
    covered = live[:cut]
    budget = None
    if window is not None:  # the server counts the summary request as it counts the prompt
        budget = int(settings.threshold * window) - calibration.margin
    parts = [covered]
    if previous is None and transcript.base:
        older, previous = await _older_part(transcript)
        covered = older + covered
        # in parts that leave room for the summary so far, which the next request carries
        size = None if budget is None else max(1, budget // 2)
        older_costs = [count(m.to_openai()) for m in older]
        parts = chunks(covered, older_costs + costs[:cut], size)
    text = previous.text if previous is not None else None
    usage, calls = none, 0
    for part in parts:
        request = summary_request(settings.prompt, part, text, budget, count)
        try:
            text, used = await summarize(model, request, settings.timeout)
        except CompactionFailed as exc:
            return CompactionResult(None, str(exc), usage, calls=calls, failed=True)
        except Exception as exc:  # a ChatModel's own bug must not end the turn either
            why = f"the summary call failed: {type(exc).__name__}: {exc}"
            return CompactionResult(None, why, usage, calls=calls, failed=True)
        usage, calls = usage + used, calls + 1
    assert text is not None
    after = calibration.limit(_system_tokens(options, text, count) + sum(costs[cut:]))
    if after >= before:
        why = f"the summary did not make the prompt smaller (~{before} -> ~{after} tokens)"
        return CompactionResult(None, why, usage, calls=calls, failed=True)
    prior = summary_range(previous) if previous is not None else None
    covers = SummaryRange(
        first_id=prior.first_id if prior is not None else covered[0].id,
        last_id=covered[-1].id,
        covered=(prior.covered if prior is not None else 0) + len(covered),
    )
    record = summary_record(
        text, covers, model=model.name, tokens_before=before, tokens_after=after, usage=usage
    )
    await transcript.append([record])
    await transcript.mark_summary(record.id, covers.last_id)
    why = f"summarized {covers.covered} messages: prompt ~{before} -> ~{after} tokens"
    return CompactionResult(record, why, usage, calls=calls)
