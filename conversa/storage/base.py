"""ConversationStorage: the contract every backend obeys, written once, with defaults.

The contract (conversa.testing.conformance.StorageConformance checks all of it):

* ``save(sid, history)`` replaces the whole history atomically; ``save(sid, [])`` leaves an
  existing, empty session.
* ``load(sid)`` returns the history in order, ``[]`` for an unknown session. Messages come back
  equal to what was stored (``ChatMessage.to_dict`` round-trips) and are never shared with the
  store: changing them never changes what is stored.
* ``delete(sid)`` removes history, info and state; deleting an unknown session is a no-op.
* ``list_sessions()`` returns session ids, most recently updated first.
* ``exists(sid)`` is true once anything (messages, info or state) was written for ``sid``.
* ``append(sid, messages)`` adds to the end, in one piece: concurrent appends never interleave,
  and its cost grows with the messages appended, never with the history.
* ``count(sid)`` is the number of stored messages, and ``tail(sid, n)`` the newest ``n`` of them,
  without loading the rest (a Session uses both to notice changes made by other processes).
* ``pop(sid, n)`` removes and returns the newest ``n``; ``truncate(sid, keep)`` keeps the oldest
  ``keep`` (a ``keep`` beyond the length changes nothing). ``n`` and ``keep`` are ints >= 0
  (ValueError otherwise); ``n=0`` returns ``[]`` and changes nothing.
* ``get_info(sid)`` / ``update_info(sid, ...)`` / ``find_sessions(...)``: see ``SessionInfo``.
  Any write (history, info or state) moves ``updated_at``.
* ``limit`` of find_sessions and search: ``None`` means all, ``0`` gives ``[]``, a negative
  one raises ValueError.
* Session state: JSON values under string keys, each with an optional expiry (``ttl=`` seconds
  or an absolute ``expires_at=``); an expired key reads as absent.
* ``lease(sid, wait=, ttl=)`` holds an exclusive lease on one session (one turn at a time): it
  waits up to ``wait`` seconds for another holder, then raises SessionBusy, and is released on
  exit, on an exception and on cancellation. The bundled backends make it exclusive across
  processes and release it when the holder dies; the default (an asyncio lock per session in
  the storage object) is exclusive within one process only.
* Every public method that takes a session id validates it first (``validate_session_id``).

The shape: the public methods of this class own the rules. Each checks its arguments once
(the id, limits, counts, info fields, state values), applies the contract's rules, and then
calls one small hook that only stores or reads: ``_append``, ``_count``, ``_tail``, ``_cut``
(truncate and pop), ``_get_info``, ``_update_info``, ``_find``, ``_search``,
``_state_entries``, ``_set_state``, ``_drop_state`` (delete_state and clear_state),
``_set_times``, ``_lease``. A hook is called with valid arguments only and never repeats a
rule; backends override hooks, not the public methods.

The five core methods (``save``, ``load``, ``delete``, ``list_sessions``, ``exists``) are the
exception: they are the abstract public names a backend implements, so that a third-party
backend needs nothing else. Their id is checked by the one guard the class adds to them when a
subclass defines them (``__init_subclass__``): an implementation never checks ids itself, and
each call validates once.

A third-party backend implements the five core methods and inherits correct, if not fast,
versions of every hook. Without ``load_meta`` / ``save_meta`` (one JSON dict per session
that holds app-set info, timestamps and state) that dict lives in this storage object's memory
only, and is lost with it; implement the pair to persist it (and call ``self.touch(sid)`` in
``save``). Both are called with a valid id.
"""

from __future__ import annotations

import functools
import json
import time
import unicodedata
import warnings
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar, cast, get_args

from ..errors import InvalidSessionId, StateValueError
from ..messages import ChatMessage, as_utc
from ._lease import DEFAULT_WAIT, Waiting, check_ttl, check_wait, local_lease
from ._search import matches, query_terms
from ._stored import (
    COMPLETED_AT_KEY,
    NO_FLOW,
    RESERVED_FIELD,
    USAGE_KEYS,
    RouteVisit,
    SearchHit,
    SessionFlow,
    SessionInfo,
    SessionStatus,
    StateEntry,
    SummaryMark,
    UsageTotals,
    copy_json,
    decode_info,
    first_user,
    flow_reserved,
    from_ts,
    merge_reserved,
    state_entry,
    summary_mark,
    summary_reserved,
    title_from,
    to_micros,
)

__all__ = [
    "UNSET",
    "ConversationStorage",
    "RouteVisit",
    "SearchHit",
    "SessionFlow",
    "SessionInfo",
    "SessionQuery",
    "SessionStatus",
    "StateEntry",
    "StateValueError",
    "Unset",
    "copy_json",
    "expiry_of",
    "from_ts",
    "title_from",
    "validate_session_id",
]

MAX_SESSION_ID_LENGTH = 256
STATUSES: frozenset[str] = frozenset(get_args(SessionStatus))


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a valid id, else raise InvalidSessionId saying why."""
    if not isinstance(session_id, str):
        raise InvalidSessionId(f"a session id must be a string, not {type(session_id).__name__}")
    if not session_id:
        raise InvalidSessionId("a session id must not be empty")
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise InvalidSessionId(
            f"a session id may have at most {MAX_SESSION_ID_LENGTH} characters, "
            f"this one has {len(session_id)}"
        )
    if not session_id.isprintable():  # cheap: only a non-printable id needs the closer look
        for ch in session_id:
            if unicodedata.category(ch) in ("Cc", "Cs"):
                raise InvalidSessionId(
                    f"a session id must not contain control characters (found {ch!r} in "
                    f"{session_id!r:.80})"
                )
    return session_id


class Unset:
    """The type of ``UNSET``: an argument that was not given (``None`` is a value: reset it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """The checked filters of one find_sessions call, as the ``_find`` hook receives them."""

    user_id: str | None = None
    status: str | None = None
    updated_before: datetime | None = None
    """Aware (UTC)."""
    limit: int | None = None
    """At least 1, or None for all."""
    route: str | None = None
    """The current route of the session's flow (``SessionInfo.flow.route``)."""

    def matches(self, info: SessionInfo) -> bool:
        """Whether ``info`` passes every filter."""
        return (
            self.matches_fields(info.user_id, info.status)
            and (self.updated_before is None or info.updated_at < self.updated_before)
            and (self.route is None or info.flow.route == self.route)
        )

    def matches_fields(self, user_id: str | None, status: str) -> bool:
        """Whether a session with this user_id and status may match (before reading the rest)."""
        return (self.user_id is None or user_id == self.user_id) and (
            self.status is None or status == self.status
        )


_CORE_WITH_ID = ("save", "load", "delete", "exists")
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _guarded(method: _F, *, forget_meta: bool = False) -> _F:
    """``method`` (a core method of a backend) with its session id validated first."""

    @functools.wraps(method)
    async def guarded(self: ConversationStorage, session_id: str, *args: Any, **kw: Any) -> Any:
        validate_session_id(session_id)
        result = await method(self, session_id, *args, **kw)
        if forget_meta:
            self.__dict__.get("_conversa_memory_meta", {}).pop(session_id, None)
        return result

    guarded.__conversa_guarded__ = True  # type: ignore[attr-defined]
    return cast("_F", guarded)


class ConversationStorage(ABC):
    """Where conversations live: the async contract every backend obeys."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Guard the core methods a subclass defines: their session id is validated first."""
        super().__init_subclass__(**kwargs)
        for name in _CORE_WITH_ID:
            method = cls.__dict__.get(name)
            if callable(method) and not hasattr(method, "__conversa_guarded__"):
                setattr(cls, name, _guarded(method, forget_meta=name == "delete"))

    # -- the core: every backend implements these -----------------------------------------

    @abstractmethod
    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Replace the whole history of ``session_id``, atomically."""

    @abstractmethod
    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history in order; ``[]`` for an unknown session."""

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Remove history, info and state of ``session_id``; a no-op if it does not exist."""

    @abstractmethod
    async def list_sessions(self) -> list[str]:
        """All session ids, most recently updated first."""

    @abstractmethod
    async def exists(self, session_id: str) -> bool:
        """Whether anything is stored for ``session_id``."""

    # -- history --------------------------------------------------------------------------

    async def append(
        self,
        session_id: str,
        messages: Sequence[ChatMessage],
        *,
        usage: UsageTotals | None = None,
    ) -> None:
        """Add ``messages`` to the end of the history, in one piece.

        ``usage`` (what the model calls that wrote them used) is added to the session's
        usage totals in the same atomic write, as ``add_usage`` would add it.
        """
        validate_session_id(session_id)
        await self._append(session_id, messages, usage_added(usage))

    async def count(self, session_id: str) -> int:
        """The number of stored messages."""
        validate_session_id(session_id)
        return await self._count(session_id)

    async def tail(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """The newest ``n`` messages in order, without loading the rest."""
        validate_session_id(session_id)
        if not _at_least_zero(n, "n"):
            return []
        return await self._tail(session_id, n)

    async def read(
        self, session_id: str, offset: int = 0, limit: int | None = None
    ) -> list[ChatMessage]:
        """The messages from position ``offset`` on, at most ``limit`` (None: to the end), in
        order, reading no more than them where the backend can (a page of a long history)."""
        validate_session_id(session_id)
        if _at_least_zero(offset, "offset") >= NO_LONGER_HISTORY:
            return []
        if limit is not None and not _at_least_zero(limit, "limit"):
            return []
        if limit is not None and limit >= NO_LONGER_HISTORY:
            limit = None  # past any history, and past the 64-bit integers SQL takes
        if offset == 0 and limit is None:
            return await self.load(session_id)
        return await self._read(session_id, offset, limit)

    async def truncate(self, session_id: str, keep: int) -> None:
        """Keep only the oldest ``keep`` messages."""
        validate_session_id(session_id)
        _at_least_zero(keep, "keep")
        await self._cut(session_id, keep, pop=False)

    async def pop(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """Remove and return the newest ``n`` messages (fewer if the history is shorter)."""
        validate_session_id(session_id)
        if not _at_least_zero(n, "n"):
            return []
        return await self._cut(session_id, n, pop=True)

    async def touch(self, session_id: str) -> None:
        """Record the time of a history write in the meta dict (for backends built on it).

        The default get_info takes updated_at from it and from the messages' own times; the
        default hooks of append, pop and truncate call it, and a backend's save() may too.
        """
        validate_session_id(session_id)
        await self._edit_meta(session_id, _changed, create=True)

    # -- session info ---------------------------------------------------------------------

    async def get_info(self, session_id: str) -> SessionInfo | None:
        """What is known about the session, or None if it does not exist."""
        validate_session_id(session_id)
        return await self._get_info(session_id)

    async def update_info(
        self,
        session_id: str,
        *,
        title: str | Unset | None = UNSET,
        user_id: str | Unset | None = UNSET,
        status: str | Unset = UNSET,
        metadata: Mapping[str, Any] | Unset = UNSET,
    ) -> SessionInfo:
        """Set the given info fields (creating the session if needed) and return the info.

        ``metadata`` replaces the whole metadata dict; ``title=None`` goes back to the default.
        A status of "completed" or "abandoned" records ``completed_at`` (now); "active"
        clears it.
        """
        validate_session_id(session_id)
        fields = info_fields(title=title, user_id=user_id, status=status, metadata=metadata)
        if "status" in fields:
            # Stored before the status: completed_at reads as None while the status is
            # "active", so a crash between the two writes shows nothing half-done.
            done = fields["status"] != "active"
            stamp = to_micros(datetime.now(UTC)) if done else None
            await self._change_reserved(session_id, {}, {COMPLETED_AT_KEY: stamp})
        return await self._update_info(session_id, fields)

    async def set_flow(self, session_id: str, flow: SessionFlow) -> None:
        """Store the session's flow position (``SessionInfo.flow``) whole, in one atomic write.

        ``session.flow`` (conversa.flow.Flow) keeps it turn by turn; the history is not read.
        """
        validate_session_id(session_id)
        await self._change_reserved(session_id, {}, flow_reserved(check_flow(flow)))

    async def set_summary_mark(self, session_id: str, mark: SummaryMark | None) -> None:
        """Store where the newest compaction summary is (``SessionInfo.summary_mark``; None
        forgets it), in one atomic write; compaction keeps it so a resume need not scan."""
        validate_session_id(session_id)
        await self._change_reserved(session_id, {}, summary_reserved(check_summary_mark(mark)))

    async def add_usage(
        self, session_id: str, *, prompt_tokens: int = 0, completion_tokens: int = 0, calls: int = 0
    ) -> None:
        """Add to the session's usage totals (``SessionInfo.usage``), atomically.

        Each turn adds what its model calls used; the history is not read.
        """
        validate_session_id(session_id)
        add = usage_added(UsageTotals(prompt_tokens, completion_tokens, calls))
        if add:
            await self._change_reserved(session_id, add, {})

    async def find_sessions(
        self,
        *,
        user_id: str | None = None,
        status: str | None = None,
        updated_before: datetime | None = None,
        limit: int | None = None,
        route: str | None = None,
    ) -> list[SessionInfo]:
        """Infos of the sessions that match every given filter, newest first.

        ``route``: sessions whose flow is in that route now. falai's "active session of a
        user" is ``find_sessions(user_id=..., status="active", limit=1)``.
        """
        if limit is not None and not _at_least_zero(limit, "limit"):
            return []
        if route is not None:
            check_flow_id(route, "route")
        before = None if updated_before is None else as_utc(updated_before)
        return await self._find(SessionQuery(user_id, status, before, limit, route))

    async def search(self, query: str, *, limit: int | None = 50) -> list[SearchHit]:
        """Messages that match ``query``, newest session first, then in order.

        Every backend matches alike (conversa.storage._search): each word of the query must be
        a word of the message or the start of one, ignoring case and accents.
        """
        if limit is not None and not _at_least_zero(limit, "limit"):
            return []
        terms = query_terms(query)
        return await self._search(terms, limit) if terms else []

    # -- session state --------------------------------------------------------------------

    async def get_state(self, session_id: str) -> dict[str, Any]:
        """The session's state: every key that has not expired, with its value."""
        validate_session_id(session_id)
        return {k: e.value for k, e in (await self._state_entries(session_id)).items()}

    async def get_state_entries(self, session_id: str) -> dict[str, StateEntry]:
        """Every key of the session's state that has not expired, with its value and expiry."""
        validate_session_id(session_id)
        return await self._state_entries(session_id)

    async def get_state_and_flow(
        self, session_id: str
    ) -> tuple[dict[str, StateEntry], SessionFlow]:
        """``get_state_entries`` and the flow position (``SessionInfo.flow``) in one read, as
        a turn needs them before it starts; ``({}, NO_FLOW)`` for an unknown session."""
        validate_session_id(session_id)
        return await self._state_and_flow(session_id)

    async def set_state(
        self,
        session_id: str,
        values: Mapping[str, Any],
        *,
        ttl: float | None = None,
        expires_at: datetime | None = None,
    ) -> None:
        """Set keys of the session's state, to expire ``ttl`` seconds from now or at
        ``expires_at`` (a naive datetime is taken as UTC; a past one reads as absent).
        """
        validate_session_id(session_id)
        await self._set_state(session_id, state_entries(values, ttl, expires_at))

    async def change_state(self, session_id: str, changes: Mapping[str, StateEntry | None]) -> None:
        """Set keys (a StateEntry, each with its own expiry) and remove keys (None) in one
        write: a crash keeps all of the change or none of it.
        """
        validate_session_id(session_id)
        entries: dict[str, dict[str, Any]] = {}
        for key, entry in changes.items():
            if entry is None:
                # a removal is an entry expired since 1970: it reads as absent at once and the
                # next write drops it, and it goes in the same single hook call as the sets
                state_entries({key: None})  # the key is checked like any other
                entries[key] = {"value": None, "expires_at": 0.0}
            else:
                moment = None if entry.expires_at is None else as_utc(entry.expires_at)
                entries.update(state_entries({key: entry.value}, expires_at=moment))
        if entries:
            await self._set_state(session_id, entries)

    async def delete_state(self, session_id: str, keys: Iterable[str]) -> None:
        """Remove keys from the session's state; absent keys are ignored."""
        validate_session_id(session_id)
        names = list(keys)
        if names:
            await self._drop_state(session_id, names)

    async def clear_state(self, session_id: str) -> None:
        """Remove every key of the session's state."""
        validate_session_id(session_id)
        await self._drop_state(session_id, None)

    async def set_times(
        self, session_id: str, *, created_at: datetime, updated_at: datetime
    ) -> None:
        """Set when the session was created and last updated (a copy keeps the original's).

        Naive datetimes are taken as UTC. The session must exist; later writes move
        ``updated_at`` as usual.
        """
        validate_session_id(session_id)
        await self._set_times(session_id, as_utc(created_at), as_utc(updated_at))

    # -- the session lease ----------------------------------------------------------------

    def lease(
        self, session_id: str, *, wait: float | None = DEFAULT_WAIT, ttl: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Hold an exclusive lease on the session: ``async with storage.lease(sid): ...``.

        Waits up to ``wait`` seconds (None: no limit, 0: one try) for another holder, then
        raises SessionBusy. ``ttl`` is how long a lease outlives a holder that died without
        releasing it, where the backend needs one (Redis); None takes the backend's default.
        The bundled backends are exclusive across processes; a backend that does not override
        ``_lease`` is exclusive within this process only (an asyncio lock per session).
        """
        validate_session_id(session_id)
        return self._lease(Waiting.start(session_id, check_wait(wait)), check_ttl(ttl))

    # -- the meta pair: a JSON dict per session for info and state -----------------------

    async def load_meta(self, session_id: str) -> dict[str, Any] | None:
        """The session's meta dict (app-set info, timestamps and state), None if none was saved.

        Override it with save_meta to persist the dict; this default keeps it in memory.
        """
        meta = _memory_meta(self).get(session_id)
        return copy_json(meta) if meta is not None else None

    async def save_meta(self, session_id: str, meta: dict[str, Any]) -> None:
        """Store the session's meta dict, replacing the previous one.

        This default keeps it in this object's memory (with a warning, once), and creates the
        session through append() so that exists() and list_sessions() know it.
        """
        store = _memory_meta(self)
        if not store:
            warnings.warn(
                f"{type(self).__name__} does not implement load_meta() and save_meta(): session "
                "info and state are kept in memory only and are lost when it is closed",
                stacklevel=2,
            )
        fresh = session_id not in store
        store[session_id] = copy_json(meta)
        if fresh and not await self.exists(session_id):
            await self._append(session_id, [], {})

    # -- hooks: defaults built on the core and the meta pair; backends override them -------

    async def _append(
        self, session_id: str, messages: Sequence[ChatMessage], add: dict[str, int]
    ) -> None:
        """Add ``messages`` to the end, in one piece, and ``add`` to the reserved numbers
        (the usage totals; usually empty) in the same step."""
        history = await self.load(session_id)
        await self.save(session_id, [*history, *messages])
        change = functools.partial(put_reserved, add=add, put={}) if add else _changed
        await self._edit_meta(session_id, change, create=True)

    async def _count(self, session_id: str) -> int:
        """The number of stored messages."""
        return len(await self.load(session_id))

    async def _tail(self, session_id: str, n: int) -> list[ChatMessage]:
        """The newest ``n`` (>= 1) messages in order."""
        return (await self.load(session_id))[-n:]

    async def _read(self, session_id: str, offset: int, limit: int | None) -> list[ChatMessage]:
        """The messages at positions ``offset`` (>= 0) to ``offset + limit`` (>= 1; None: to
        the end), in order."""
        return (await self.load(session_id))[offset : None if limit is None else offset + limit]

    async def _cut(self, session_id: str, n: int, *, pop: bool) -> list[ChatMessage]:
        """Remove the newest ``n`` messages and return them (``pop``), or keep the oldest ``n``
        (returning ``[]``); nothing changes (not even updated_at) if nothing is removed.
        """
        history = await self.load(session_id)
        keep = kept(len(history), n, pop=pop)
        if keep >= len(history):
            return []
        await self.save(session_id, history[:keep])
        await self._edit_meta(session_id, _changed, create=True)
        return history[keep:] if pop else []

    async def _get_info(self, session_id: str) -> SessionInfo | None:
        """The session's info, or None if it does not exist."""
        meta = await self.load_meta(session_id)
        history = await self.load(session_id)
        if meta is None and not history and not await self.exists(session_id):
            return None
        meta = meta or {}
        stamps = [m.created_at for m in history]
        now = datetime.now(UTC)
        created = from_ts(meta["created_at"]) if "created_at" in meta else min(stamps, default=now)
        updated = max([*stamps, from_ts(meta.get("updated_at", 0.0)), created])
        first = first_user(history)
        return decode_info(
            session_id,
            meta,
            created_at=created,
            updated_at=updated,
            message_count=len(history),
            default_title=first[1] if first else None,
            where="the meta dict",
        )

    async def _update_info(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        """Store the checked info ``fields`` (a None value resets one) and return the info."""
        await self._edit_meta(session_id, functools.partial(put_info, fields=fields), create=True)
        info = await self._get_info(session_id)
        assert info is not None
        return info

    async def _change_reserved(
        self, session_id: str, add: dict[str, int], put: dict[str, Any]
    ) -> None:
        """Change the reserved info (see ``_stored.merge_reserved``) in one atomic step,
        creating the session if needed."""
        change = functools.partial(put_reserved, add=add, put=put)
        await self._edit_meta(session_id, change, create=True)

    async def _find(self, query: SessionQuery) -> list[SessionInfo]:
        """The infos ``query`` matches, newest first, at most ``query.limit``."""
        found: list[SessionInfo] = []
        for sid in await self.list_sessions():
            info = await self._get_info(sid)
            if info is not None and query.matches(info):
                found.append(info)
        # a backend without save_meta lists by history writes only; info writes count too
        found.sort(key=lambda i: i.updated_at, reverse=True)
        return found[: query.limit]

    async def _search(self, terms: list[str], limit: int | None) -> list[SearchHit]:
        """Messages matching every term (``query_terms``, not empty), at most ``limit`` (>= 1).

        The default scans the sessions newest first and stops at the limit.
        """
        hits: list[SearchHit] = []
        for sid in await self.list_sessions():
            for i, m in enumerate(await self.load(sid)):
                if matches(terms, m.text):
                    hits.append(SearchHit(sid, i, m))
                    if len(hits) == limit:
                        return hits
        return hits

    async def _state_entries(self, session_id: str) -> dict[str, StateEntry]:
        """The unexpired state entries."""
        meta = await self.load_meta(session_id) or {}
        return live_entries(meta.get("state") or {})

    async def _state_and_flow(self, session_id: str) -> tuple[dict[str, StateEntry], SessionFlow]:
        """The live state entries and the flow position (backends read both at once)."""
        entries = await self._state_entries(session_id)
        info = await self._get_info(session_id)
        return entries, NO_FLOW if info is None else info.flow

    async def _set_state(self, session_id: str, entries: dict[str, dict[str, Any]]) -> None:
        """Store checked ``entries`` (from state_entries), dropping expired keys on the way."""
        change = functools.partial(put_state, entries=entries)
        await self._edit_meta(session_id, change, create=True)

    async def _drop_state(self, session_id: str, keys: Collection[str] | None) -> None:
        """Remove the given state keys (every key if None); touch the session if any went."""
        await self._edit_meta(session_id, functools.partial(drop_state, keys=keys), create=False)

    async def _set_times(self, session_id: str, created_at: datetime, updated_at: datetime) -> None:
        """Store both times (aware)."""
        meta = await self.load_meta(session_id) or {}
        meta["created_at"] = created_at.timestamp()
        meta["updated_at"] = updated_at.timestamp()
        await self.save_meta(session_id, meta)

    def _lease(self, waiting: Waiting, ttl: float | None) -> AbstractAsyncContextManager[None]:
        """Hold the lease of ``waiting.session_id`` until the deadline of ``waiting``.

        This default is exclusive within this process only: an asyncio lock per session.
        """
        return local_lease(self, waiting)

    async def _edit_meta(
        self, session_id: str, change: Callable[[dict[str, Any]], bool], *, create: bool
    ) -> None:
        """Apply ``change`` to the meta dict and save it (with new times) if it says it changed."""
        meta = await self.load_meta(session_id)
        if meta is None:
            if not create:
                return
            meta = {}
        if change(meta):
            now = time.time()
            meta.setdefault("created_at", now)
            meta["updated_at"] = now
            await self.save_meta(session_id, meta)

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:  # noqa: B027 (optional hook, nothing to release here)
        """Release connections and files; the storage is not used after this."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _memory_meta(storage: ConversationStorage) -> dict[str, dict[str, Any]]:
    """The meta dicts of a backend without load_meta/save_meta, kept on the object."""
    found: dict[str, dict[str, Any]] | None = storage.__dict__.get("_conversa_memory_meta")
    if found is None:
        found = storage.__dict__["_conversa_memory_meta"] = {}
    return found


NO_LONGER_HISTORY = 1 << 62
"""More messages than any history holds: positions at or past it are read as past the end."""


def _at_least_zero(value: int, name: str) -> int:
    """``value`` if it is an int >= 0 (a count or a limit); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 0, not {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    return value


def usage_added(usage: UsageTotals | None) -> dict[str, int]:
    """The reserved numbers ``usage`` adds (its non-zero fields); ValueError for a negative
    or non-int amount."""
    if usage is None:
        return {}
    amounts = (usage.prompt_tokens, usage.completion_tokens, usage.calls)
    for name, value in zip(USAGE_KEYS, amounts, strict=True):
        _at_least_zero(value, name)
    return {k: v for k, v in zip(USAGE_KEYS, amounts, strict=True) if v}


def kept(count: int, n: int, *, pop: bool) -> int:
    """How many of ``count`` messages a ``_cut(n, pop=pop)`` keeps."""
    return max(0, count - n) if pop else min(n, count)


# -- checking what callers give -------------------------------------------------------------


def info_fields(
    *,
    title: str | Unset | None = UNSET,
    user_id: str | Unset | None = UNSET,
    status: str | Unset = UNSET,
    metadata: Mapping[str, Any] | Unset = UNSET,
) -> dict[str, Any]:
    """Validate update_info arguments and return the fields that were given."""
    fields: dict[str, Any] = {}
    if not isinstance(title, Unset):
        if title is not None and not isinstance(title, str):
            raise StateValueError("title must be a string or None")
        fields["title"] = title
    if not isinstance(user_id, Unset):
        if user_id is not None and not isinstance(user_id, str):
            raise StateValueError("user_id must be a string or None")
        fields["user_id"] = user_id
    if not isinstance(status, Unset):
        if status not in STATUSES:
            raise StateValueError(
                f"unknown status {status!r}; use one of: {', '.join(sorted(STATUSES))}"
            )
        fields["status"] = status
    if not isinstance(metadata, Unset):
        if not isinstance(metadata, Mapping):
            raise StateValueError("metadata must be a dict")
        check_json(metadata, "metadata")
        fields["metadata"] = copy_json(dict(metadata))
    return fields


MAX_FLOW_ID_LENGTH = 256
FLOW_HISTORY_LIMIT = 256
"""The most route visits a flow keeps (session.flow drops the oldest beyond it)."""


def check_summary_mark(mark: object) -> SummaryMark | None:
    """``mark`` if it is None or one that reads back as stored (``_stored.summary_mark``: two
    positions, the summary after the last message it covers); StateValueError else."""
    if mark is None:
        return None
    if not isinstance(mark, SummaryMark) or summary_mark(summary_reserved(mark)) is None:
        raise StateValueError(
            "a summary mark holds two positions (ints >= 0), the summary's after the last "
            f"message it covers, not {mark!r}"
        )
    return mark


def check_flow_id(value: object, what: str) -> str:
    """``value`` if it is a route or step id (non-empty printable text); StateValueError else."""
    if not isinstance(value, str) or not value:
        raise StateValueError(f"a {what} id must be a non-empty string, not {value!r:.60}")
    if len(value) > MAX_FLOW_ID_LENGTH:
        raise StateValueError(f"a {what} id may have at most {MAX_FLOW_ID_LENGTH} characters")
    if not value.isprintable():
        raise StateValueError(f"a {what} id must be printable text, not {value!r:.60}")
    return value


def _check_time(value: object, what: str) -> None:
    if not isinstance(value, datetime):
        raise StateValueError(f"{what} must be a datetime, not {type(value).__name__}")


def check_flow(flow: object) -> SessionFlow:
    """``flow`` if it is a SessionFlow that can be stored as it is; StateValueError else."""
    if not isinstance(flow, SessionFlow):
        raise StateValueError(f"a flow must be a SessionFlow, not {type(flow).__name__}")
    if flow.route is None:
        if flow.step is not None:
            raise StateValueError("a flow step needs a current route")
    else:
        check_flow_id(flow.route, "route")
        _check_time(flow.entered_at, "the entered_at of the current route")
    if flow.step is not None:
        check_flow_id(flow.step, "step")
        _check_time(flow.step_entered_at, "the step_entered_at of the current step")
    if not isinstance(flow.history, tuple) or len(flow.history) > FLOW_HISTORY_LIMIT:
        raise StateValueError(f"a flow history is a tuple of at most {FLOW_HISTORY_LIMIT} visits")
    for visit in flow.history:
        if not isinstance(visit, RouteVisit):
            raise StateValueError(f"a flow history holds RouteVisit, not {type(visit).__name__}")
        check_flow_id(visit.route, "route")
        _check_time(visit.entered_at, "a visit's entered_at")
        if visit.exited_at is not None:
            _check_time(visit.exited_at, "a visit's exited_at")
        if not isinstance(visit.completed, bool):
            raise StateValueError("a visit's completed must be a bool")
    if not isinstance(flow.data, dict):
        raise StateValueError("a flow's data must be a dict of route id to dict")
    for route, values in flow.data.items():
        check_flow_id(route, "route")
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise StateValueError(f"the data of route {route!r} must be a dict with string keys")
    check_json(flow.data, "a flow's data")
    return flow


def check_json(value: object, what: str) -> None:
    """Raise StateValueError (a ValueError too) unless ``value`` serialises to JSON."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateValueError(f"{what} must be JSON-serialisable: {exc}") from exc


def expiry_of(ttl: float | None, expires_at: datetime | None, now: float) -> float | None:
    """The epoch seconds at which a key set at ``now`` expires: from ``ttl`` or ``expires_at``."""
    if ttl is not None and expires_at is not None:
        raise StateValueError("give either ttl or expires_at, not both")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise StateValueError("ttl must be a positive number of seconds")
        return now + ttl
    if expires_at is not None:
        if not isinstance(expires_at, datetime):
            raise StateValueError(f"expires_at must be a datetime, not {type(expires_at).__name__}")
        return as_utc(expires_at).timestamp()
    return None


def state_entries(
    values: Mapping[str, Any], ttl: float | None = None, expires_at: datetime | None = None
) -> dict[str, dict[str, Any]]:
    """Validate state values and wrap each as {"value": v, "expires_at": epoch or None}.

    The values are copies, so the caller's objects are never stored.
    """
    expires = expiry_of(ttl, expires_at, time.time())
    entries: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise StateValueError(f"state keys must be non-empty strings, not {key!r}")
        check_json(value, f"the value of state key {key!r}")
        entries[key] = {"value": copy_json(value), "expires_at": expires}
    return entries


# -- edits of a meta dict (the ABC's defaults and the file backend) ---------------------------


def _changed(meta: dict[str, Any]) -> bool:
    """The edit of a history write: nothing but the times."""
    return True


def put_info(meta: dict[str, Any], *, fields: Mapping[str, Any]) -> bool:
    """Set checked info fields."""
    meta.update(fields)
    return True


def put_reserved(meta: dict[str, Any], *, add: Mapping[str, int], put: Mapping[str, Any]) -> bool:
    """Change the reserved info in a meta dict."""
    meta[RESERVED_FIELD] = merge_reserved(meta.get(RESERVED_FIELD) or {}, add, put)
    return True


def put_state(meta: dict[str, Any], *, entries: Mapping[str, dict[str, Any]]) -> bool:
    """Set state entries in a meta dict."""
    meta["state"] = merge_state(meta.get("state") or {}, entries)
    return True


def drop_state(meta: dict[str, Any], *, keys: Collection[str] | None) -> bool:
    """Remove the given state keys (every key if None) from a meta dict; whether any went."""
    state = remove_state(meta.get("state") or {}, keys)
    if state is not None:
        meta["state"] = state
    return state is not None


def merge_state(
    state: Mapping[str, dict[str, Any]], entries: Mapping[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Stored state entries with ``entries`` set, and the expired ones dropped."""
    return {**live_raw(state), **entries}


def remove_state(
    state: Mapping[str, dict[str, Any]], keys: Collection[str] | None
) -> dict[str, dict[str, Any]] | None:
    """Stored state entries without ``keys`` (all if None); None if none of them was there."""
    gone = set(state) if keys is None else set(keys).intersection(state)
    return {k: e for k, e in state.items() if k not in gone} if gone else None


def _live(expires: float | None, now: float) -> bool:
    return expires is None or expires > now


def live_raw(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The stored entries (``{"value", "expires_at"}`` dicts) that have not expired."""
    now = time.time()
    return {k: e for k, e in entries.items() if _live(e.get("expires_at"), now)}


def live_entries(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, StateEntry]:
    """The stored entries that have not expired, as StateEntry objects."""
    return {k: state_entry(e["value"], e.get("expires_at")) for k, e in live_raw(entries).items()}
