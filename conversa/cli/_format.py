"""Plain-text formatting shared by the rich and the plain output: no rich imports here."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..context import ContextStatus
    from ..messages import ChatMessage, ToolCall
    from ..storage import UsageTotals

TOOL_RESULT_CHARS = 120
ARGUMENT_CHARS = 80
APPROVAL_CHARS = 300
"""How much of a call's arguments an approval question shows (cut in the middle, not the end)."""

# Every C0 and C1 control but tab and newline is shown as an escape, so that text from a model,
# a tool or the storage cannot drive the terminal (OSC 52 writes the clipboard, OSC 0 the title,
# CSI clears the screen); a carriage return is dropped, it could only overwrite the line.
_CONTROLS: dict[int, str | None] = {
    c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (9, 10)
}
_CONTROLS[0x0D] = None
# Bidirectional embeddings, overrides and isolates reorder what follows them on screen, so an
# approval question could show one file name or URL and run another ("Trojan Source").
_CONTROLS.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})
_TERMINAL_SAFE = str.maketrans(_CONTROLS)


def plural(count: int, noun: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def terminal_text(text: str) -> str:
    """``text`` safe to write to a terminal: control characters shown as escapes, not obeyed."""
    return text.translate(_TERMINAL_SAFE)


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(terminal_text(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def shorten_middle(text: str, limit: int) -> str:
    """``text`` on one line; when longer than ``limit``, its middle replaced by an ellipsis."""
    flat = " ".join(terminal_text(text).split())
    if len(flat) <= limit:
        return flat
    head = (limit - 1) // 2
    return flat[:head] + "…" + flat[len(flat) - (limit - 1 - head) :]


def approval_question(name: str, arguments: dict[str, Any]) -> str:
    """``run name(...)?`` with long arguments cut in the middle, then, never cut, where each
    URL among them really leads."""
    parts = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items()]
    lines = [f"run {shorten_middle(f'{name}(' + ', '.join(parts) + ')', APPROVAL_CHARS)}?"]
    lines += [url_target(v) for v in arguments.values() if isinstance(v, str) and "://" in v]
    return "\n".join(lines)


def url_target(text: str) -> str:
    """What fetching ``text`` would contact, as httpx (which fetch_url uses) parses it: scheme,
    host and port, and a warning when a user name or password comes before the host."""
    import httpx

    try:
        url = httpx.URL(text.strip())
    except httpx.InvalidURL as exc:
        return f"  → not a valid URL: {terminal_text(str(exc))}"
    port = url.port or {"http": 80, "https": 443}.get(url.scheme) or "?"
    # the ASCII form is the name that is resolved; a look-alike Unicode name shows as xn--...
    host = url.raw_host.decode("ascii", "backslashreplace")
    line = f"  → contacts host {host}, port {port} ({url.scheme or 'no scheme'})"
    if url.userinfo:
        userinfo = url.userinfo.decode("ascii", "backslashreplace")
        line += (
            f"; ⚠ {shorten_middle(userinfo, 60)!r} before the '@' is a user name and password, "
            "not the host"
        )
    return terminal_text(line)


def call_summary(name: str, arguments: str | dict[str, Any]) -> str:
    """``name(key=value, ...)`` with long values shortened."""
    if isinstance(arguments, str):
        try:
            parsed: Any = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return f"{name}({shorten(arguments, ARGUMENT_CHARS)})"
    else:
        parsed = arguments
    if not isinstance(parsed, dict):
        return f"{name}({shorten(json.dumps(parsed), ARGUMENT_CHARS)})"
    parts = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in parsed.items()]
    return f"{name}({shorten(', '.join(parts), ARGUMENT_CHARS)})"


def tool_call_line(call: ToolCall) -> str:
    """How a tool call is shown while it runs."""
    return call_summary(call.name, call.arguments)


def tool_result_line(output: str, ok: bool) -> str:
    """How a tool's result is shown: shortened, with its length when cut."""
    short = shorten(output, TOOL_RESULT_CHARS)
    size = f" ({len(output)} chars)" if len(output) > TOOL_RESULT_CHARS else ""
    return f"{'' if ok else 'failed: '}{short}{size}"


def role_counts(messages: Iterable[ChatMessage]) -> Counter[str]:
    """How many messages each role has."""
    return Counter(m.role for m in messages)


def status_text(status: ContextStatus) -> str:
    """What the model sees of a history: "model sees: 12 of 340 messages (summary of 320
    before them), ~2,100 of 8,000 tokens, calibrated ..."."""
    seen = f"model sees: {status.sent} of {plural(status.messages, 'message')}"
    if status.summarized:
        seen += f" (and a summary of {plural(status.summarized, 'earlier message')})"
    window = f" of {status.context_window:,}" if status.context_window else ""
    seen += f", ~{status.tokens:,}{window} tokens, {status.estimate}"
    if status.context_window and not status.compaction:
        seen += "; compaction off"
    return seen


def usage_text(usage: UsageTotals) -> str:
    """A session's usage totals in one line."""
    if not usage.calls:
        return "no model calls recorded"
    return (
        f"{usage.total:,} tokens (prompt {usage.prompt_tokens:,}, completion "
        f"{usage.completion_tokens:,}) in {plural(usage.calls, 'model call')}"
    )


def tokens_used(messages: Iterable[ChatMessage]) -> tuple[int, int]:
    """(prompt, completion) tokens summed over the usage of the assistant messages."""
    prompt = completion = 0
    for m in messages:
        usage = m.metadata.get("usage") if m.role == "assistant" else None
        if isinstance(usage, dict):
            prompt += int(usage.get("prompt_tokens") or 0)
            completion += int(usage.get("completion_tokens") or 0)
    return prompt, completion


def ago(when: datetime, now: datetime | None = None) -> str:
    """A short relative time: "just now", "5m ago", "3h ago", "2d ago", or a date."""
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    if seconds < 60:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            count = int(seconds // size)
            if unit == "d" and count > 30:
                return when.astimezone().strftime("%Y-%m-%d")
            return f"{count}{unit} ago"
    return "just now"  # pragma: no cover


def message_lines(message: ChatMessage) -> tuple[str, str]:
    """(label, text) for one message of a transcript, safe for a terminal."""
    if message.role == "tool":
        name = message.metadata.get("tool") or message.name or "tool"
        ok = message.metadata.get("ok", True) is not False
        return terminal_text(f"tool {name}"), tool_result_line(message.text, ok)
    text = terminal_text(message.text)
    if message.tool_calls:
        calls = ", ".join(tool_call_line(c) for c in message.tool_calls)
        text = f"{text}\n→ {calls}" if text else f"→ {calls}"
    if message.metadata.get("interrupted"):
        text += " [interrupted]"
    if message.role == "user" and message.metadata.get("observation"):
        return "observation", shorten(text, TOOL_RESULT_CHARS)
    return message.role, text


def snippet(text: str, query: str, width: int = 60) -> tuple[str, str, str]:
    """(before, match, after) around the first case-insensitive match of ``query``."""
    flat = " ".join(terminal_text(text).split())
    at = flat.casefold().find(query.casefold().strip())
    if at < 0:
        return "", shorten(flat, 2 * width), ""
    end = at + len(query.strip())
    before = flat[max(0, at - width) : at]
    after = flat[end : end + width]
    return (
        ("…" if at > width else "") + before,
        flat[at:end],
        after + ("…" if end + width < len(flat) else ""),
    )


def table_text(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned table, for output without a terminal."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *rows]
    ]
    return "\n".join(lines)
