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
from ..messages import ChatMessage, as_utc, message_from_json

TITLE_LENGTH = 60
SessionStatus = Literal["active", "completed", "abandoned"]
_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """The tokens and model calls a session has used, summed over every turn."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    """Model calls that answered (summaries included)."""

    @property
    def total(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        """prompt_tokens, completion_tokens, total_tokens and calls."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total,
            "calls": self.calls,
        }


@dataclass(frozen=True, slots=True)
class SummaryMark:
    """Where a session's newest compaction summary sits, kept by compaction so that a resume
    reads from there on without scanning the history for it."""

    at: int
    """The summary record's position in the history."""
    covered_to: int
    """The position of the last message it covers (the prompt goes on after it)."""


@dataclass(frozen=True, slots=True)
class RouteVisit:
    """One visit of a route in a session's flow: falai's route history entry."""

    route: str
    entered_at: datetime
    exited_at: datetime | None = None
    """None while the route is the current one."""
    completed: bool = False


@dataclass(frozen=True, slots=True)
class SessionFlow:
    """A session's position in its flow (falai's session step), kept with its info.

    ``route`` and ``step`` are the current ones (None: in no route); ``history`` lists every
    route visited, oldest first; ``data`` holds what was collected, per route id.
    """

    route: str | None = None
    step: str | None = None
    entered_at: datetime | None = None
    """When the current route was entered."""
    step_entered_at: datetime | None = None
    """When the current step was entered."""
    history: tuple[RouteVisit, ...] = ()
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The data collected in each route, by route id (kept when the route is left)."""

    @property
    def current_data(self) -> dict[str, Any]:
        """The data collected in the current route ({} when in none)."""
        return copy_json(self.data.get(self.route, {})) if self.route is not None else {}


NO_FLOW = SessionFlow()
"""The flow of a session that never had one."""


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
    usage: UsageTotals = field(default_factory=UsageTotals)
    """What the session's turns used, kept by each turn (``add_usage``) without the history."""
    summary_mark: SummaryMark | None = None
    """Where the newest compaction summary is (None: none recorded); may be stale after an
    undo, so readers check the record they find there."""
    flow: SessionFlow = NO_FLOW
    """Where the session is in its flow: route, step, route history, data (``set_flow``)."""
    completed_at: datetime | None = None
    """When the status last became completed or abandoned (None while active)."""


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
        return message_from_json(data)
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
    append, parse = messages.append, message_from_json
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


# -- reserved info: fields conversa itself keeps in each session's info record ---------------
#
# One flat JSON object per session ("reserved"), apart from the app's own ``metadata`` (which
# update_info replaces whole). Keys are dotted names ("usage.calls"); values are JSON. Every
# backend stores it beside the other info fields and changes it with one atomic
# ``_change_reserved(sid, add=, put=)``: ``add`` adds to numbers (counters), ``put`` sets
# values. decode_info turns it into typed SessionInfo fields. A new conversa-kept field (a
# flow's position, say) is one more key here, one more SessionInfo field read below, and
# nothing new in any backend.

USAGE_KEYS: tuple[str, str, str] = ("usage.prompt_tokens", "usage.completion_tokens", "usage.calls")
"""The reserved keys of UsageTotals' three fields, in order."""
SUMMARY_KEYS: tuple[str, str] = ("compaction.summary_at", "compaction.covered_to")
"""The reserved keys of SummaryMark's two fields, in order."""
RESERVED_FIELD = "reserved"
"""The name of the reserved object among a backend's stored info fields."""
FLOW_ROUTE_KEY = "flow.route"
"""The reserved key of the current route: the one find_sessions(route=) filters on."""
FLOW_DATA_KEY = "flow.data"
"""The reserved key of the data collected per route (sealed by EncryptedStorage)."""
FLOW_KEYS: tuple[str, ...] = (
    FLOW_ROUTE_KEY,
    "flow.step",
    "flow.entered_at",
    "flow.step_entered_at",
    "flow.history",
    FLOW_DATA_KEY,
)
"""The reserved keys of SessionFlow's fields, in order (times as epoch microseconds)."""
_FLOW_KEY_SET = frozenset(FLOW_KEYS)
COMPLETED_AT_KEY = "completed_at"
"""The reserved key of SessionInfo.completed_at (epoch microseconds, or None)."""


def merge_reserved(
    reserved: Mapping[str, Any], add: Mapping[str, int], put: Mapping[str, Any]
) -> dict[str, Any]:
    """``reserved`` with ``add`` added to its numbers and ``put`` set (a new dict)."""
    merged = dict(reserved)
    for key, amount in add.items():
        old = merged.get(key)
        merged[key] = (old if isinstance(old, int) and not isinstance(old, bool) else 0) + amount
    merged.update(put)
    return merged


def decode_reserved(raw: object, place: Callable[[], str]) -> dict[str, Any]:
    """The reserved object from what a backend stored (a dict, its JSON text, or None)."""
    try:
        value = json.loads(raw) if isinstance(raw, str | bytes) else raw
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"a JSON object was expected, not {value!r:.40}")
        return value
    except ValueError as exc:
        raise corrupt(place(), exc, "delete the session's reserved info to reset it") from exc


def _count_of(reserved: Mapping[str, Any], key: str) -> int:
    value = reserved.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_totals(reserved: Mapping[str, Any]) -> UsageTotals:
    """The UsageTotals kept in a reserved object (zeros for what is missing or not a number)."""
    if not reserved:
        return _NO_USAGE
    return UsageTotals(*(_count_of(reserved, key) for key in USAGE_KEYS))


_NO_USAGE = UsageTotals()


def summary_mark(reserved: Mapping[str, Any]) -> SummaryMark | None:
    """The SummaryMark kept in a reserved object (None if missing or not two positions)."""
    at, covered_to = (reserved.get(key) for key in SUMMARY_KEYS)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (at, covered_to)):
        return None
    assert isinstance(at, int) and isinstance(covered_to, int)
    return SummaryMark(at, covered_to) if covered_to < at else None


def summary_reserved(mark: SummaryMark | None) -> dict[str, Any]:
    """The reserved keys and values that store ``mark`` (both keys, so a put replaces it)."""
    fields = (mark.at, mark.covered_to) if mark is not None else (None, None)
    return dict(zip(SUMMARY_KEYS, fields, strict=True))


def flow_reserved(flow: SessionFlow) -> dict[str, Any]:
    """The reserved keys and values that store ``flow`` (every flow key, so a put replaces it)."""
    return dict(
        zip(
            FLOW_KEYS,
            (
                flow.route,
                flow.step,
                _micros_or_none(flow.entered_at),
                _micros_or_none(flow.step_entered_at),
                [
                    {
                        "route": v.route,
                        "entered_at": to_micros(v.entered_at),
                        "exited_at": _micros_or_none(v.exited_at),
                        "completed": v.completed,
                    }
                    for v in flow.history
                ],
                copy_json(flow.data),
            ),
            strict=True,
        )
    )


def session_flow(reserved: Mapping[str, Any]) -> SessionFlow:
    """The SessionFlow kept in a reserved object.

    Like the usage totals, a value of the wrong type (edited by hand) reads as absent rather
    than making the whole info unreadable.
    """
    if not reserved or _FLOW_KEY_SET.isdisjoint(reserved):
        return NO_FLOW
    route, step, entered, step_entered, history, data = (reserved.get(k) for k in FLOW_KEYS)
    route = route if isinstance(route, str) and route else None
    visits = []
    for entry in history if isinstance(history, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("route"), str):
            continue
        at = _time_or_none(entry.get("entered_at"))
        if at is not None:
            exited = _time_or_none(entry.get("exited_at"))
            visits.append(RouteVisit(entry["route"], at, exited, entry.get("completed") is True))
    collected = (
        {k: copy_json(v) for k, v in data.items() if isinstance(v, dict)}
        if isinstance(data, dict)
        else {}
    )
    return SessionFlow(
        route=route,
        step=step if route is not None and isinstance(step, str) and step else None,
        entered_at=_time_or_none(entered) if route is not None else None,
        step_entered_at=_time_or_none(step_entered) if route is not None else None,
        history=tuple(visits),
        data=collected,
    )


def _micros_or_none(moment: datetime | None) -> int | None:
    return None if moment is None else to_micros(moment)


def _time_or_none(value: object) -> datetime | None:
    """Epoch microseconds as a datetime; None for anything else (or out of range)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    try:
        return from_micros(value)
    except (OverflowError, ValueError):
        return None


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
    """A SessionInfo from stored fields: ``row`` holds title, user_id, status, metadata and
    reserved (each a dict, or its JSON text), each optional; a set title wins over
    ``default_title``.
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
    reserved = _stored_reserved(session_id, row.get(RESERVED_FIELD), where)
    status: SessionStatus = row.get("status") or "active"
    return SessionInfo(
        session_id=session_id,
        created_at=created_at,
        updated_at=updated_at,
        message_count=message_count,
        title=row.get("title") or default_title or None,
        user_id=row.get("user_id"),
        status=status,
        metadata=copy_json(metadata),
        usage=usage_totals(reserved),
        summary_mark=summary_mark(reserved) if reserved else None,
        flow=session_flow(reserved),
        completed_at=(
            _time_or_none(reserved.get(COMPLETED_AT_KEY))
            if reserved and status != "active"
            else None
        ),
    )


def decode_flow(session_id: str, raw: object, where: Place) -> SessionFlow:
    """The flow position kept in a stored reserved object (a dict, its JSON text, or None)."""
    return session_flow(_stored_reserved(session_id, raw, where))


def _stored_reserved(session_id: str, raw: object, where: Place) -> dict[str, Any]:
    return decode_reserved(
        raw, lambda: f"the reserved info of session {session_id!r} in {_said(where)}"
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
