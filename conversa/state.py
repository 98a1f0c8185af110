"""SessionState: key-value data kept beside a session's history, persisted on every write."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import Any, TypeVar, overload

from ._state_views import StateView
from .errors import StateValueError
from .storage.base import (
    ConversationStorage,
    StateEntry,
    copy_json,
    expiry_of,
    from_ts,
    state_entries,
)

T = TypeVar("T")


def _to_json_value(value: Any) -> Any:
    """Pydantic models and dataclasses become plain JSON data; everything else is copied."""
    if hasattr(value, "model_dump") or hasattr(value, "__dataclass_fields__"):
        from pydantic import TypeAdapter

        return TypeAdapter(type(value)).dump_python(value, mode="json")
    return copy_json(value)


INTERNAL_PREFIX = "__"


def is_internal(key: str) -> bool:
    """Keys starting with "__" belong to conversa and its apps (user parts, CLI settings)."""
    return key.startswith(INTERNAL_PREFIX)


_Op = tuple[Any, float | None] | None
"""A sync change of one key: (value, expiry in epoch seconds or None), or None for a removal."""


class StateChanges:
    """The changes one tool run or interceptor call made through the sync API.

    They are kept apart from the state until ``SessionState.commit`` stores them, in one
    write, when the call has returned; a call that failed or timed out has them dropped.
    """

    __slots__ = ("closed", "ops", "state")

    def __init__(self, state: SessionState) -> None:
        self.state = state
        self.ops: dict[str, _Op] = {}
        self.closed = False
        """Set once the changes are stored or dropped: later writes (an abandoned thread's)
        raise instead of being lost without a word."""

    def __bool__(self) -> bool:
        return bool(self.ops)


_SCOPE: ContextVar[StateChanges | None] = ContextVar("conversa_state_changes", default=None)

JOURNAL_KEY = "__tool_result_journal"
"""Internal key written with a tool's state changes: the result that goes with them, so that a
crash between the two writes can store the result on the next turn instead of losing it."""


class SessionState:
    """A session's key-value state: reads come from a cache, writes go to storage.

    Two ways to write. The async API (``await state.set(...)``, ``update``, ``delete``,
    ``clear``) stores the change before it returns. The sync API (``state["k"] = v``,
    ``del state["k"]``, and ``state.sync.set/delete/update/clear``) works where ``await``
    cannot, in a sync tool running in its thread or a sync interceptor: the changes a tool or
    interceptor makes this way are stored, in one write, when it returns (for a tool, before
    its result, and together with a journal of that result: a crash keeps both or neither).
    A tool that raises or times out has its sync changes dropped. Outside a tool or an
    interceptor, sync changes apply to this object at once and are stored by ``flush()``, by
    the next async write, at the start of the next turn or when the session is closed.

    Keys starting with "__" are internal (user parts, the CLI's settings): get, set, has and
    delete reach them, but keys, items, to_dict, clear and from_dict leave them out, so a
    tool that lists or clears the state (such as session_data) cannot see or wipe them.

    Values are never shared with the caller: set stores a copy, get returns one. A key's
    expiry is checked on every read against ``clock`` (epoch seconds, default ``time.time``).
    """

    def __init__(
        self,
        storage: ConversationStorage,
        session_id: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._session_id = session_id
        self._clock = clock
        self._values: dict[str, Any] = {}
        self._expires: dict[str, float] = {}
        self._modified = False
        # sync writes come from tool threads too: the cache and the pending changes are
        # changed under this lock
        self._lock = threading.RLock()
        self._pending = StateChanges(self)  # sync changes made outside a tool or interceptor

    async def reload(self) -> None:
        """Read the state from storage again (a turn does this before it starts); pending
        sync changes are stored first, so a reload never loses them."""
        await self.flush()
        self.use(await self._storage.get_state_entries(self._session_id))

    def use(self, entries: Mapping[str, StateEntry]) -> None:
        """Take ``entries``, just read from storage, as the state (``reload`` without its read:
        for a caller that read them with more, after ``flush``)."""
        with self._lock:
            self._values = {k: e.value for k, e in entries.items()}
            self._expires = {
                k: e.expires_at.timestamp() for k, e in entries.items() if e.expires_at is not None
            }
            self._modified = False

    # -- reading -------------------------------------------------------------------------

    def _scope(self) -> StateChanges | None:
        """The changes of the tool or interceptor running in this context, if they are ours."""
        scope = _SCOPE.get()
        return scope if scope is not None and scope.state is self else None

    def _live(self, key: str) -> bool:
        with self._lock:
            expires = self._expires.get(key)
            if expires is not None and expires <= self._clock():
                self._values.pop(key, None)
                del self._expires[key]
            return key in self._values

    def _find(self, key: str) -> tuple[bool, Any]:
        """(found, value) as this context sees it: its own unstored changes over the cache."""
        scope = self._scope()
        if scope is not None and key in scope.ops:
            op = scope.ops[key]
            if op is None or (op[1] is not None and op[1] <= self._clock()):
                return False, None
            return True, op[0]
        with self._lock:
            return (True, self._values[key]) if self._live(key) else (False, None)

    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    @overload
    def get(self, key: str, default: Any = None, *, as_type: type[T]) -> T: ...

    def get(self, key: str, default: Any = None, *, as_type: Any = None) -> Any:
        """The value of ``key`` (``default`` if absent), validated into ``as_type`` if given."""
        found, value = self._find(key)
        if not found:
            return default
        value = copy_json(value)
        if as_type is None:
            return value
        from pydantic import TypeAdapter

        return TypeAdapter(as_type).validate_python(value)

    def __getitem__(self, key: str) -> Any:
        found, value = self._find(key)
        if not found:
            raise KeyError(key)
        return copy_json(value)

    def has(self, key: str) -> bool:
        """Whether ``key`` is set and not expired."""
        return self._find(key)[0]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(key)[0]

    def keys(self, *, internal: bool = False) -> list[str]:
        """The live keys (with ``internal=True`` also those starting with "__")."""
        scope = self._scope()
        with self._lock:
            names = list(self._values)
        if scope is not None:
            names += [k for k in list(scope.ops) if k not in names]
        return [k for k in names if (internal or not is_internal(k)) and self._find(k)[0]]

    def items(self, *, internal: bool = False) -> list[tuple[str, Any]]:
        """The live (key, value) pairs, the values as copies."""
        found = ((k, self._find(k)) for k in self.keys(internal=internal))
        return [(k, copy_json(value)) for k, (ok, value) in found if ok]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def to_dict(self) -> dict[str, Any]:
        """A copy of the live state, without internal keys."""
        return dict(self.items())

    # -- the async API: stored before it returns -------------------------------------------

    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        expires_at: datetime | None = None,
    ) -> None:
        """Store a copy of ``value`` under ``key``, to expire ``ttl`` seconds from now or at
        ``expires_at`` (a naive datetime is taken as UTC); by default it never expires.
        """
        await self.update({key: value}, ttl=ttl, expires_at=expires_at)

    async def update(
        self,
        values: Mapping[str, Any],
        *,
        ttl: float | None = None,
        expires_at: datetime | None = None,
    ) -> None:
        """Store several keys at once, with one expiry (``ttl`` or ``expires_at``) for all."""
        plain, expires = self._prepared(values, ttl, expires_at)
        # storage gets the moment, so this cache and every process agree on when it is
        moment = None if expires is None else from_ts(expires)
        await self.flush()  # sync changes made before this one are stored before it
        await self._storage.set_state(self._session_id, plain, expires_at=moment)
        stored = None if moment is None else moment.timestamp()
        with self._lock:
            self._apply({k: (v, stored) for k, v in plain.items()})
        self._superseded(plain)

    def _prepared(
        self, values: Mapping[str, Any], ttl: float | None, expires_at: datetime | None
    ) -> tuple[dict[str, Any], float | None]:
        """Copies of ``values`` as plain JSON data, and when they expire (epoch seconds)."""
        expires = expiry_of(ttl, expires_at, self._clock())
        return {k: _to_json_value(v) for k, v in values.items()}, expires

    async def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""
        await self.flush()
        await self._storage.delete_state(self._session_id, [key])
        with self._lock:
            self._values.pop(key, None)
            self._expires.pop(key, None)
            self._modified = True
        self._superseded([key])

    async def clear(self) -> None:
        """Remove every key that is not internal."""
        await self.flush()
        scope = self._scope()
        with self._lock:
            keys = [k for k in list(self._values) if not is_internal(k) and self._live(k)]
        if keys:
            await self._storage.delete_state(self._session_id, keys)
        with self._lock:
            for key in keys:
                self._values.pop(key, None)
                self._expires.pop(key, None)
            self._modified = True
        if scope is not None:
            self._superseded([k for k in scope.ops if not is_internal(k)])

    async def from_dict(self, values: Mapping[str, Any]) -> None:
        """Replace the state (but its internal keys) with ``values``."""
        await self.clear()
        if values:
            await self.update(values)

    def _superseded(self, keys: Any) -> None:
        """An async write wins over the sync changes this context made earlier to its keys."""
        scope = self._scope()
        if scope is not None:
            for key in keys:
                scope.ops.pop(key, None)

    # -- the sync API: stored when the tool or interceptor returns -------------------------

    @property
    def sync(self) -> StateView:
        """This state's sync API: get/set/delete/update/clear without ``await``."""
        return StateView(self)

    def __setitem__(self, key: str, value: Any) -> None:
        self.set_sync({key: value})

    def __delitem__(self, key: str) -> None:
        if not self.has(key):
            raise KeyError(key)
        self.delete_sync([key])

    def set_sync(
        self,
        values: Mapping[str, Any],
        *,
        ttl: float | None = None,
        expires_at: datetime | None = None,
    ) -> None:
        """Set keys without ``await`` (see the class: when the change is stored)."""
        plain, expires = self._prepared(values, ttl, expires_at)
        state_entries(plain)  # a bad key or value fails here, in the caller, not at the store
        self._record({k: (v, expires) for k, v in plain.items()})

    def delete_sync(self, keys: Any) -> None:
        """Remove keys without ``await``; absent keys are ignored."""
        self._record(dict.fromkeys(keys))

    def clear_sync(self) -> None:
        """Remove every key that is not internal, without ``await``."""
        self.delete_sync(self.keys())

    def _record(self, ops: dict[str, _Op]) -> None:
        scope = self._scope()
        if scope is not None:
            if scope.closed:
                raise StateValueError(
                    "this tool or interceptor call is over (it failed or timed out): "
                    "its state changes are no longer stored"
                )
            scope.ops.update(ops)
            return
        with self._lock:
            self._apply(ops)
            self._pending.ops.update(ops)

    def _apply(self, ops: Mapping[str, _Op]) -> None:
        """Put stored (or, outside a scope, pending) changes into the cache."""
        for key, op in ops.items():
            if op is None:
                self._values.pop(key, None)
                self._expires.pop(key, None)
                continue
            self._values[key] = op[0]
            if op[1] is None:
                self._expires.pop(key, None)
            else:
                self._expires[key] = op[1]
        self._modified = True

    @property
    def has_pending(self) -> bool:
        """Whether sync changes made outside a tool or interceptor still wait for flush()."""
        return bool(self._pending.ops)

    async def flush(self) -> None:
        """Store the sync changes made outside a tool or interceptor (one write)."""
        with self._lock:
            ops, self._pending.ops = self._pending.ops, {}
        if not ops:
            return
        try:
            await self._storage.change_state(self._session_id, _entries(ops))
        except BaseException:
            with self._lock:  # not stored: keep them for the next try, newer changes first
                self._pending.ops = {**ops, **self._pending.ops}
            raise

    # -- the scope of one tool run or interceptor call ------------------------------------

    async def collecting(self, call: Callable[[], Awaitable[T]]) -> tuple[T, StateChanges]:
        """Await ``call()`` (a tool run, an interceptor call) collecting its sync changes.

        The changes are not stored on return: ``commit`` stores them, ``discard`` drops them,
        as happens at once if the call raises.
        """
        changes = StateChanges(self)
        token = _SCOPE.set(changes)
        try:
            result = await call()
        except BaseException:
            self.discard(changes)
            raise
        finally:
            _SCOPE.reset(token)
        return result, changes

    async def commit(self, changes: StateChanges, *, journal: Any = None) -> None:
        """Store collected changes in one write (with ``journal`` under JOURNAL_KEY)."""
        changes.closed = True
        ops = dict(changes.ops)
        if not ops:
            return
        entries = _entries(ops)
        if journal is not None:
            entries[JOURNAL_KEY] = StateEntry(journal)
        await self.flush()
        await self._storage.change_state(self._session_id, entries)
        with self._lock:
            self._apply(ops)
            if journal is not None:
                self._apply({JOURNAL_KEY: (copy_json(journal), None)})

    @staticmethod
    def discard(changes: StateChanges) -> None:
        """Drop collected changes (their call failed); later writes to them raise."""
        changes.closed = True
        changes.ops.clear()

    @property
    def is_modified(self) -> bool:
        """Whether this object wrote to the state since it was last loaded."""
        return self._modified

    @property
    def is_empty(self) -> bool:
        """Whether no live key (but internal ones) is set."""
        return not self.keys()

    def __repr__(self) -> str:
        return f"SessionState({self.to_dict()!r})"


def _entries(ops: Mapping[str, _Op]) -> dict[str, StateEntry | None]:
    return {
        k: None if op is None else StateEntry(op[0], None if op[1] is None else from_ts(op[1]))
        for k, op in ops.items()
    }
