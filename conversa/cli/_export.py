"""Export and import formats: Markdown for reading, JSON for moving sessions around.

Import reads conversa's own JSON export, a plain JSON array of messages
(``[{"role": "user", "content": "..."}, ...]``, the ``{session_id}.json`` format of the
original design) and JSON Lines (one message per line, as the file backend stores them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._format import call_summary, terminal_text

if TYPE_CHECKING:
    from ..messages import ChatMessage
    from ..storage import SessionInfo, UsageTotals

FORMAT_NAME = "conversa.session"
FORMAT_VERSION = 1
ExportFormat = Literal["md", "json"]


def format_for(path: str | None, explicit: str | None = None) -> ExportFormat:
    """The export format: the one asked for, else by the file's extension (Markdown default)."""
    if explicit:
        return "json" if explicit.lower() == "json" else "md"
    return "json" if path and Path(path).suffix.lower() in (".json", ".jsonl") else "md"


def to_json(
    session_id: str,
    messages: Sequence[ChatMessage],
    info: SessionInfo | None,
    state: dict[str, Any],
    expires: Mapping[str, datetime] | None = None,
) -> str:
    """conversa's JSON export: the messages with ids, times and metadata, the info and state,
    and when state keys expire (``state_expires_at``: key -> ISO time, for those that do)."""
    document: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "session_id": session_id,
        "exported_at": datetime.now(UTC).isoformat(),
        "info": _info_dict(info),
        "state": state,
        "state_expires_at": {k: t.isoformat() for k, t in (expires or {}).items()},
        "messages": [m.to_dict() for m in messages],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _info_dict(info: SessionInfo | None) -> dict[str, Any] | None:
    from ..storage._stored import flow_reserved

    if info is None:
        return None
    return {
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
        "message_count": info.message_count,
        "title": info.title,
        "user_id": info.user_id,
        "status": info.status,
        "metadata": info.metadata,
        "usage": info.usage.to_dict(),
        "completed_at": None if info.completed_at is None else info.completed_at.isoformat(),
        "flow": flow_reserved(info.flow),
    }


def to_markdown(session_id: str, messages: Sequence[ChatMessage], system: str | None) -> str:
    """A readable transcript: one heading per message, tool calls and results compact.

    Control characters are escaped: the file is for reading, also with `cat` in a terminal
    (the JSON export keeps the text exactly).
    """
    lines = [f"# {session_id}", ""]
    lines.append(f"{len(messages)} messages, exported {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    lines.append("")
    if system:
        lines += ["**System prompt:**", "", system, ""]
    for m in messages:
        when = m.created_at.strftime("%Y-%m-%d %H:%M")
        if m.role == "tool":
            name = m.metadata.get("tool") or m.name or "tool"
            lines += [f"### tool: {name} · {when}", "", "~~~text", m.text, "~~~", ""]
            continue
        lines += [f"### {m.role} · {when}", ""]
        if m.text:
            lines += [m.text, ""]
        for call in m.tool_calls:
            lines += [f"> calls `{call_summary(call.name, call.arguments)}`", ""]
        if m.metadata.get("interrupted"):
            lines += ["_(interrupted)_", ""]
    return terminal_text("\n".join(lines))


def write_private(path: Path, text: str) -> None:
    """Write an export that only the user can read (0600 when created), like the session files:
    it holds the whole conversation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as file:
        file.write(text)


@dataclass(slots=True)
class Imported:
    """A session read from an export file."""

    session_id: str | None
    messages: list[ChatMessage]
    state: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    expires: dict[str, datetime] = field(default_factory=dict)
    """When state keys expire; keys not in it never do."""
    info: dict[str, Any] = field(default_factory=dict)
    """Those of user_id, status, metadata, created_at, updated_at, usage, flow and
    completed_at the export holds."""


def parse_import(text: str, source: str) -> Imported:
    """Read any supported export; ValueError says what is wrong and where."""
    from ..messages import ChatMessage

    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = _json_lines(text, source)
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        raw, sid = data["messages"], data.get("session_id")
        state = data.get("state") or {}
        info = data.get("info") or {}
        if not isinstance(info, dict):
            info = {}
        title = info.get("title")
        expiry = data.get("state_expires_at") or {}
    elif isinstance(data, list):
        raw, sid, state, title, info, expiry = data, None, {}, None, {}, {}
    else:
        raise ValueError(f"{source} is neither a conversa JSON export nor a JSON array of messages")
    messages = []
    for index, item in enumerate(raw):
        try:
            messages.append(ChatMessage.from_dict(item))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{source}: message {index} cannot be read: {exc}") from exc
    state = dict(state) if isinstance(state, dict) else {}
    expires = {
        k: _moment(v, f"state_expires_at[{k!r}]", source)
        for k, v in (expiry.items() if isinstance(expiry, dict) else ())
        if k in state
    }
    return Imported(
        sid if isinstance(sid, str) else None,
        messages,
        state,
        title if isinstance(title, str) else None,
        expires,
        _info_fields(info, source),
    )


def _info_fields(info: dict[str, Any], source: str) -> dict[str, Any]:
    """The info fields of an export that write_session takes, checked."""
    from ..storage._stored import session_flow

    fields: dict[str, Any] = {
        k: info[k] for k in ("user_id", "status") if isinstance(info.get(k), str)
    }
    if isinstance(info.get("metadata"), dict):
        fields["metadata"] = info["metadata"]
    if isinstance(info.get("usage"), dict):
        fields["usage"] = _usage(info["usage"], source)
    if isinstance(info.get("flow"), dict):
        fields["flow"] = session_flow(info["flow"])  # a damaged part reads as absent
    if info.get("completed_at") is not None:
        fields["completed_at"] = _moment(info["completed_at"], "info.completed_at", source)
    if info.get("created_at") is not None and info.get("updated_at") is not None:
        for k in ("created_at", "updated_at"):
            fields[k] = _moment(info[k], f"info.{k}", source)
    return fields


def _usage(raw: dict[str, Any], source: str) -> UsageTotals:
    """The usage totals of an export; ValueError names a count that is not one."""
    from ..storage import UsageTotals

    counts = []
    for key in ("prompt_tokens", "completion_tokens", "calls"):
        value = raw.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{source}: info.usage.{key} is not a count: {value!r:.60}")
        counts.append(value)
    return UsageTotals(*counts)


def _moment(value: Any, what: str, source: str) -> datetime:
    """An ISO 8601 time from an export (naive means UTC); ValueError names the field."""
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {what} is not an ISO 8601 time: {value!r:.60}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _json_lines(text: str, source: str) -> list[Any]:
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source} is not JSON (line {number}: {exc.msg})") from exc
    return items
