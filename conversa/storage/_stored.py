"""What backends store and read back: the value types, and one set of decoders for them.

Every backend turns its stored rows, lines or hashes into these types through the decoders
below, so damaged data raises the same CorruptSessionError everywhere, naming what is damaged,
where it lives and what to do.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from ..errors import CorruptSessionError
from ..messages import ChatMessage, as_utc

TITLE_LENGTH = 60
SessionStatus = Literal["active", "completed", "abandoned"]
_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What is known about a session without loading its history."""

    session_id: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    title: str | None = None
    """The title set with update_info, else the start of the first user message."""
    user_id: str | None = None
    status: SessionStatus = "active"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One message that matched a search, and where it sits."""

    session_id: str
    position: int
    """The message's index in its session's history."""
    message: ChatMessage


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One state key as stored: its value and when it expires (None: never)."""

    value: Any
    expires_at: datetime | None = None


def state_entry(value: Any, expires_at: float | None) -> StateEntry:
    """A StateEntry from a value and epoch seconds (or None)."""
    return StateEntry(value, None if expires_at is None else from_ts(expires_at))


# -- reading what is stored: one set of decoders, one kind of error -------------------------


Place = str | Callable[[], str]
"""Where stored data lives, for an error message; a function if it costs something to say."""


def corrupt(place: Place, why: object, fix: str) -> CorruptSessionError:
    """The error for stored data that cannot be read: what and where it is, why, what to do."""
    return CorruptSessionError(f"{_said(place)} is damaged: {why}. It was left untouched; {fix}")


def _why(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc.msg}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    return f"not a stored message ({exc})"


def decode_message(data: str | bytes, place: Place, fix: str) -> ChatMessage:
    """A stored message (``ChatMessage.to_json`` text), or CorruptSessionError naming it."""
    try:
        return ChatMessage.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise corrupt(place, _why(exc), fix) from exc


def decode_messages(
    rows: Iterable[tuple[_K, str | bytes]], place: Callable[[_K], str], fix: str
) -> list[ChatMessage]:
    """Stored messages from ``(key, data)`` rows; ``place(key)`` names a damaged one.

    One loop with one ``try`` around it, and the cycle collector paused: a load pays for
    nothing but the parsing.
    """
    messages: list[ChatMessage] = []
    append, parse = messages.append, ChatMessage.from_json
    key: Any = None
    try:
        with paused_gc():
            for key, data in rows:  # noqa: B007 (the key names a damaged row)
                append(parse(data))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise corrupt(place(key), _why(exc), fix) from exc
    return messages


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_resume = False


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Keep the cycle collector off while messages are decoded (in any thread, nested too).

    A decoded history is acyclic, yet its thousands of new containers set off collections
    that walk every object again (a third to a half of a load). The collector is off only
    while any decode runs, and comes back on only if it was on before the first one began.
    """
    global _gc_pauses, _gc_resume
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_resume:
                gc.enable()


def decode_info(
    session_id: str,
    row: Mapping[str, Any],
    *,
    created_at: datetime,
    updated_at: datetime,
    message_count: int,
    default_title: str | None,
    where: Place,
) -> SessionInfo:
    """A SessionInfo from stored fields: ``row`` holds title, user_id, status and metadata
    (a dict, or its JSON text), each optional; a set title wins over ``default_title``.
    """
    metadata = row.get("metadata")
    try:
        if metadata is None:
            metadata = {}
        elif isinstance(metadata, str):
            metadata = json.loads(metadata)
        if not isinstance(metadata, dict):
            raise ValueError(f"a JSON object was expected, not {metadata!r:.40}")
    except ValueError as exc:
        place = f"the metadata of session {session_id!r} in {_said(where)}"
        raise corrupt(place, exc, "set it again with update_info(metadata=...)") from exc
    return SessionInfo(
        session_id=session_id,
        created_at=created_at,
        updated_at=updated_at,
        message_count=message_count,
        title=row.get("title") or default_title or None,
        user_id=row.get("user_id"),
        status=row.get("status") or "active",
        metadata=copy_json(metadata),
    )


def decode_state(
    session_id: str, key: str, text: str, expires_at: float | str | None, where: Place
) -> StateEntry:
    """A stored state entry (the value as JSON text, the expiry as epoch seconds)."""
    try:
        return state_entry(json.loads(text), None if expires_at is None else float(expires_at))
    except ValueError as exc:
        place = f"state key {key!r} of session {session_id!r} in {_said(where)}"
        raise corrupt(place, exc, "set or delete that key") from exc


def _said(place: Place) -> str:
    return place if isinstance(place, str) else place()


def title_from(messages: Iterable[ChatMessage]) -> str | None:
    """The default title: the start of the first user message, on one line."""
    found = first_user(messages)
    return found[1] if found else None


def first_user(messages: Iterable[ChatMessage]) -> tuple[int, str | None] | None:
    """The index of the first user message and the default title it gives (None if none)."""
    for i, m in enumerate(messages):
        if m.role == "user":
            text = " ".join(m.text.split())
            if len(text) > TITLE_LENGTH:
                text = text[: TITLE_LENGTH - 1].rstrip() + "…"
            return i, text or None
    return None


def copy_json(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars): much cheaper than copy.deepcopy.

    Tuples become lists, as they would after a round trip through JSON.
    """
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [copy_json(v) for v in value]
    return value


# -- times ------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def from_ts(value: float) -> datetime:
    """Epoch seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(value, UTC)


def to_micros(moment: datetime) -> int:
    """A datetime as integer microseconds since the epoch (naive means UTC), exactly."""
    return (as_utc(moment) - _EPOCH) // _MICRO


def from_micros(value: int | str) -> datetime:
    """Integer microseconds since the epoch (or their text) as an aware UTC datetime."""
    return _EPOCH + int(value) * _MICRO
