"""SessionState: key-value data kept beside a session's history, persisted on every write."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar, overload

from .storage.base import ConversationStorage, copy_json, expiry_of, from_ts

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


class SessionState:
    """A session's key-value state: reads come from a cache, writes go straight to storage.

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

    async def reload(self) -> None:
        """Read the state from storage again (a turn does this before it starts)."""
        entries = await self._storage.get_state_entries(self._session_id)
        self._values = {k: e.value for k, e in entries.items()}
        self._expires = {
            k: e.expires_at.timestamp() for k, e in entries.items() if e.expires_at is not None
        }
        self._modified = False

    def _live(self, key: str) -> bool:
        expires = self._expires.get(key)
        if expires is not None and expires <= self._clock():
            self._values.pop(key, None)
            del self._expires[key]
        return key in self._values

    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    @overload
    def get(self, key: str, default: Any = None, *, as_type: type[T]) -> T: ...

    def get(self, key: str, default: Any = None, *, as_type: Any = None) -> Any:
        """The value of ``key`` (``default`` if absent), validated into ``as_type`` if given."""
        if not self._live(key):
            return default
        value = copy_json(self._values[key])
        if as_type is None:
            return value
        from pydantic import TypeAdapter

        return TypeAdapter(as_type).validate_python(value)

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
        expires = expiry_of(ttl, expires_at, self._clock())
        # storage gets the moment, so this cache and every process agree on when it is
        moment = None if expires is None else from_ts(expires)
        plain = {k: _to_json_value(v) for k, v in values.items()}
        await self._storage.set_state(self._session_id, plain, expires_at=moment)
        self._values.update(plain)
        for key in plain:
            if moment is None:
                self._expires.pop(key, None)
            else:
                self._expires[key] = moment.timestamp()
        self._modified = True

    async def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""
        await self._storage.delete_state(self._session_id, [key])
        self._values.pop(key, None)
        self._expires.pop(key, None)
        self._modified = True

    async def clear(self) -> None:
        """Remove every key that is not internal."""
        keys = self.keys()
        if keys:
            await self._storage.delete_state(self._session_id, keys)
        for key in keys:
            self._values.pop(key, None)
            self._expires.pop(key, None)
        self._modified = True

    async def from_dict(self, values: Mapping[str, Any]) -> None:
        """Replace the state (but its internal keys) with ``values``."""
        await self.clear()
        if values:
            await self.update(values)

    def has(self, key: str) -> bool:
        """Whether ``key`` is set and not expired."""
        return self._live(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._live(key)

    def keys(self, *, internal: bool = False) -> list[str]:
        """The live keys (with ``internal=True`` also those starting with "__")."""
        return [k for k in list(self._values) if (internal or not is_internal(k)) and self._live(k)]

    def items(self, *, internal: bool = False) -> list[tuple[str, Any]]:
        """The live (key, value) pairs, the values as copies."""
        return [(k, copy_json(self._values[k])) for k in self.keys(internal=internal)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def to_dict(self) -> dict[str, Any]:
        """A copy of the live state, without internal keys."""
        return dict(self.items())

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
