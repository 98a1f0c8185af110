"""ConversationStorage: the contract every backend obeys, with defaults built on its core.

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
  ``keep``.
* ``get_info(sid)`` / ``update_info(sid, ...)`` / ``find_sessions(...)``: see ``SessionInfo``.
  Any write (history, info or state) moves ``updated_at``.
* Session state: JSON values under string keys, each with an optional expiry (``ttl=`` seconds
  or an absolute ``expires_at=``); an expired key reads as absent.
* Every public method that takes a session id validates it first (``validate_session_id``):
  the ABC wraps each override, so a backend never sees an invalid id.

A third-party backend implements the five abstract methods and inherits correct, if not fast,
versions of everything else. Without ``load_meta`` / ``save_meta`` (one JSON dict per session
that holds app-set info, timestamps and state) that dict lives in this storage object's memory
only, and is lost with it; implement the pair to persist it.
"""

from __future__ import annotations

import functools
import json
import time
import unicodedata
import warnings
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, cast

from ..errors import InvalidSessionId, StorageError
from ..messages import ChatMessage, _as_utc

MAX_SESSION_ID_LENGTH = 256
TITLE_LENGTH = 60
SessionStatus = Literal["active", "completed", "abandoned"]
STATUSES: frozenset[str] = frozenset(("active", "completed", "abandoned"))


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
    for ch in session_id:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise InvalidSessionId(
                f"a session id must not contain control characters (found {ch!r} in "
                f"{session_id!r:.80})"
            )
    return session_id


def title_from(messages: Iterable[ChatMessage]) -> str | None:
    """The default title: the start of the first user message, on one line."""
    for m in messages:
        if m.role == "user":
            text = " ".join(m.text.split())
            if len(text) > TITLE_LENGTH:
                text = text[: TITLE_LENGTH - 1].rstrip() + "…"
            return text or None
    return None


def check_json(value: object, what: str) -> None:
    """Raise StorageError (a ValueError too) unless ``value`` serialises to JSON."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateValueError(f"{what} must be JSON-serialisable: {exc}") from exc


class StateValueError(StorageError, ValueError):
    """A state value or info field cannot be stored (not JSON-serialisable, bad status)."""


def copy_json(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars): much cheaper than copy.deepcopy.

    Tuples become lists, as they would after a round trip through JSON.
    """
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [copy_json(v) for v in value]
    return value


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is taken as UTC, as ChatMessage does."""
    return _as_utc(moment)


def ts(dt: datetime) -> float:
    """A datetime as epoch seconds; a naive one is taken as UTC, as ChatMessage does."""
    return _as_utc(dt).timestamp()


def from_ts(value: float) -> datetime:
    """Epoch seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(value, UTC)


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
    status: str = "active"
    """active, completed or abandoned."""
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


_UNSET: Any = object()

_M = TypeVar("_M", bound=Callable[..., Awaitable[Any]])


def _checks_id(method: _M) -> _M:
    """Validate the session id (the first argument) before ``method`` runs."""

    @functools.wraps(method)
    async def checked(self: Any, session_id: Any, *args: Any, **kwargs: Any) -> Any:
        validate_session_id(session_id)
        return await method(self, session_id, *args, **kwargs)

    checked.__checks_id__ = _checks_id  # type: ignore[attr-defined]
    return cast("_M", checked)


def _forgets_meta(method: _M) -> _M:
    """Validate the id, run ``method`` (a delete), then drop the in-memory meta of the session."""

    @functools.wraps(method)
    async def deleting(self: Any, session_id: Any, *args: Any, **kwargs: Any) -> Any:
        validate_session_id(session_id)
        result = await method(self, session_id, *args, **kwargs)
        _memory_meta(self).pop(session_id, None)
        return result

    deleting.__checks_id__ = _forgets_meta  # type: ignore[attr-defined]
    return cast("_M", deleting)


def _memory_meta(storage: ConversationStorage) -> dict[str, dict[str, Any]]:
    """The meta dicts of a backend without load_meta/save_meta, kept on the object."""
    found: dict[str, dict[str, Any]] | None = storage.__dict__.get("_conversa_memory_meta")
    if found is None:
        found = storage.__dict__["_conversa_memory_meta"] = {}
    return found


class ConversationStorage(ABC):
    """Where conversations live: the async contract every backend obeys."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap every override of a method that takes a session id so it validates the id."""
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            wrap = getattr(getattr(ConversationStorage, name, None), "__checks_id__", None)
            if wrap is not None and callable(value) and not hasattr(value, "__checks_id__"):
                setattr(cls, name, wrap(value))

    # -- the core: every backend implements these -----------------------------------------

    @abstractmethod
    @_checks_id
    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Replace the whole history of ``session_id``, atomically."""

    @abstractmethod
    @_checks_id
    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history in order; ``[]`` for an unknown session."""

    @abstractmethod
    @_forgets_meta
    async def delete(self, session_id: str) -> None:
        """Remove history, info and state of ``session_id``; a no-op if it does not exist."""

    @abstractmethod
    async def list_sessions(self) -> list[str]:
        """All session ids, most recently updated first."""

    @abstractmethod
    @_checks_id
    async def exists(self, session_id: str) -> bool:
        """Whether anything is stored for ``session_id``."""

    # -- the meta pair: a JSON dict per session for info and state -----------------------

    @_checks_id
    async def load_meta(self, session_id: str) -> dict[str, Any] | None:
        """The session's meta dict (app-set info, timestamps and state), None if none was saved.

        Override it with save_meta to persist the dict; this default keeps it in memory.
        """
        meta = _memory_meta(self).get(session_id)
        return copy_json(meta) if meta is not None else None

    @_checks_id
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
            await self.append(session_id, [])

    # -- history: defaults on the core; bundled backends override them --------------------

    @_checks_id
    async def append(self, session_id: str, messages: Sequence[ChatMessage]) -> None:
        """Add ``messages`` to the end of the history, in one piece."""
        history = await self.load(session_id)
        await self.save(session_id, [*history, *messages])
        await self.touch(session_id)

    @_checks_id
    async def touch(self, session_id: str) -> None:
        """Record the time of a history write in the meta dict.

        The default get_info takes updated_at from it and from the messages' own times; the
        defaults of append, pop and truncate call it, and a backend's save() may too.
        """
        meta = await self.load_meta(session_id) or {}
        meta.setdefault("created_at", time.time())
        meta["updated_at"] = time.time()
        await self.save_meta(session_id, meta)

    @_checks_id
    async def count(self, session_id: str) -> int:
        """The number of stored messages."""
        return len(await self.load(session_id))

    @_checks_id
    async def tail(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """The newest ``n`` messages in order, without loading the rest."""
        if n < 0:
            raise ValueError("n must be >= 0")
        history = await self.load(session_id)
        return history[max(0, len(history) - n) :] if n else []

    @_checks_id
    async def truncate(self, session_id: str, keep: int) -> None:
        """Keep only the oldest ``keep`` messages."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        history = await self.load(session_id)
        if keep < len(history):
            await self.save(session_id, history[:keep])
            await self.touch(session_id)

    @_checks_id
    async def pop(self, session_id: str, n: int = 1) -> list[ChatMessage]:
        """Remove and return the newest ``n`` messages (fewer if the history is shorter)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        history = await self.load(session_id)
        if n == 0 or not history:
            return []
        keep = max(0, len(history) - n)
        await self.save(session_id, history[:keep])
        await self.touch(session_id)
        return history[keep:]

    # -- session info ---------------------------------------------------------------------

    @_checks_id
    async def get_info(self, session_id: str) -> SessionInfo | None:
        """What is known about the session, or None if it does not exist."""
        meta = await self.load_meta(session_id)
        history = await self.load(session_id)
        if meta is None and not history and not await self.exists(session_id):
            return None
        meta = meta or {}
        stamps = [m.created_at for m in history]
        now = datetime.now(UTC)
        created = from_ts(meta["created_at"]) if "created_at" in meta else min(stamps, default=now)
        updated = max([*stamps, from_ts(meta.get("updated_at", 0.0)), created])
        return SessionInfo(
            session_id=session_id,
            created_at=created,
            updated_at=updated,
            message_count=len(history),
            title=meta.get("title") or title_from(history),
            user_id=meta.get("user_id"),
            status=meta.get("status", "active"),
            metadata=dict(meta.get("metadata", {})),
        )

    @_checks_id
    async def update_info(
        self,
        session_id: str,
        *,
        title: str | None = _UNSET,
        user_id: str | None = _UNSET,
        status: str = _UNSET,
        metadata: Mapping[str, Any] = _UNSET,
    ) -> SessionInfo:
        """Set the given info fields (creating the session if needed) and return the info.

        ``metadata`` replaces the whole metadata dict; ``title=None`` goes back to the default.
        """
        fields = info_fields(title=title, user_id=user_id, status=status, metadata=metadata)
        meta = await self.load_meta(session_id) or {}
        meta.update(fields)
        meta.setdefault("created_at", time.time())
        meta["updated_at"] = time.time()
        await self.save_meta(session_id, meta)
        info = await self.get_info(session_id)
        assert info is not None
        return info

    async def find_sessions(
        self,
        *,
        user_id: str | None = None,
        status: str | None = None,
        updated_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[SessionInfo]:
        """Infos of the sessions that match every given filter, newest first."""
        found: list[SessionInfo] = []
        for sid in await self.list_sessions():
            info = await self.get_info(sid)
            if info is not None and info_matches(info, user_id, status, updated_before):
                found.append(info)
        # a backend without save_meta lists by history writes only; info writes count too
        found.sort(key=lambda i: i.updated_at, reverse=True)
        return found if limit is None else found[:limit]

    async def search(self, query: str, *, limit: int = 50) -> list[SearchHit]:
        """Messages whose text contains ``query`` (ignoring case), newest session first.

        Backends with a full-text index (SQLite FTS5) may match by words instead.
        """
        needle = query.casefold().strip()
        if not needle:
            return []
        hits: list[SearchHit] = []
        for sid in await self.list_sessions():
            for i, m in enumerate(await self.load(sid)):
                if needle in m.text.casefold():
                    hits.append(SearchHit(sid, i, m))
                    if len(hits) >= limit:
                        return hits
        return hits

    # -- session state --------------------------------------------------------------------

    @_checks_id
    async def get_state(self, session_id: str) -> dict[str, Any]:
        """The session's state: every key that has not expired, with its value."""
        return {k: e.value for k, e in (await self.get_state_entries(session_id)).items()}

    @_checks_id
    async def get_state_entries(self, session_id: str) -> dict[str, StateEntry]:
        """Every key of the session's state that has not expired, with its value and expiry."""
        meta = await self.load_meta(session_id) or {}
        return live_entries(meta.get("state", {}))

    @_checks_id
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
        entries = state_entries(values, ttl, expires_at)
        meta = await self.load_meta(session_id) or {}
        meta["state"] = {**live_raw(meta.get("state", {})), **entries}
        meta.setdefault("created_at", time.time())
        meta["updated_at"] = time.time()
        await self.save_meta(session_id, meta)

    @_checks_id
    async def delete_state(self, session_id: str, keys: Iterable[str]) -> None:
        """Remove keys from the session's state; absent keys are ignored."""
        keys = list(keys)
        meta = await self.load_meta(session_id)
        if not meta or not any(k in meta.get("state", {}) for k in keys):
            return
        for k in keys:
            meta["state"].pop(k, None)
        meta["updated_at"] = time.time()
        await self.save_meta(session_id, meta)

    @_checks_id
    async def clear_state(self, session_id: str) -> None:
        """Remove every key of the session's state."""
        meta = await self.load_meta(session_id)
        if meta and meta.get("state"):
            meta["state"] = {}
            meta["updated_at"] = time.time()
            await self.save_meta(session_id, meta)

    @_checks_id
    async def set_times(
        self, session_id: str, *, created_at: datetime, updated_at: datetime
    ) -> None:
        """Set when the session was created and last updated (a copy keeps the original's).

        Naive datetimes are taken as UTC. The session must exist; later writes move
        ``updated_at`` as usual.
        """
        meta = await self.load_meta(session_id) or {}
        meta["created_at"] = ts(created_at)
        meta["updated_at"] = ts(updated_at)
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


# -- helpers shared by the backends -------------------------------------------------------


def info_fields(
    *, title: Any = _UNSET, user_id: Any = _UNSET, status: Any = _UNSET, metadata: Any = _UNSET
) -> dict[str, Any]:
    """Validate update_info arguments and return the fields that were given."""
    fields: dict[str, Any] = {}
    if title is not _UNSET:
        if title is not None and not isinstance(title, str):
            raise StateValueError("title must be a string or None")
        fields["title"] = title
    if user_id is not _UNSET:
        if user_id is not None and not isinstance(user_id, str):
            raise StateValueError("user_id must be a string or None")
        fields["user_id"] = user_id
    if status is not _UNSET:
        if status not in STATUSES:
            raise StateValueError(
                f"unknown status {status!r}; use one of: {', '.join(sorted(STATUSES))}"
            )
        fields["status"] = status
    if metadata is not _UNSET:
        if not isinstance(metadata, Mapping):
            raise StateValueError("metadata must be a dict")
        check_json(metadata, "metadata")
        fields["metadata"] = dict(metadata)
    return fields


def info_matches(
    info: SessionInfo, user_id: str | None, status: str | None, updated_before: datetime | None
) -> bool:
    """Whether ``info`` passes the filters of find_sessions."""
    if user_id is not None and info.user_id != user_id:
        return False
    if status is not None and info.status != status:
        return False
    return updated_before is None or info.updated_at < updated_before


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
        return ts(expires_at)
    return None


def state_entries(
    values: Mapping[str, Any], ttl: float | None = None, expires_at: datetime | None = None
) -> dict[str, dict[str, Any]]:
    """Validate state values and wrap each as {"value": v, "expires_at": epoch or None}."""
    expires = expiry_of(ttl, expires_at, time.time())
    entries: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise StateValueError(f"state keys must be non-empty strings, not {key!r}")
        check_json(value, f"the value of state key {key!r}")
        entries[key] = {"value": value, "expires_at": expires}
    return entries


def _live(expires: float | None, now: float) -> bool:
    return expires is None or expires > now


def live_raw(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The stored entries (``{"value", "expires_at"}`` dicts) that have not expired."""
    now = time.time()
    return {k: e for k, e in entries.items() if _live(e.get("expires_at"), now)}


def live_entries(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, StateEntry]:
    """The stored entries that have not expired, as StateEntry objects."""
    return {k: state_entry(e["value"], e.get("expires_at")) for k, e in live_raw(entries).items()}


def state_entry(value: Any, expires_at: float | None) -> StateEntry:
    """A StateEntry from a value and epoch seconds (or None)."""
    return StateEntry(value, None if expires_at is None else from_ts(expires_at))
