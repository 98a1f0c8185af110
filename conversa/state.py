"""SessionState: key-value data kept beside a session's history, persisted on every write."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar, overload

from .storage.base import ConversationStorage

T = TypeVar("T")


def _to_json_value(value: Any) -> Any:
    """Pydantic models and dataclasses become plain JSON data; everything else passes as is."""
    if hasattr(value, "model_dump") or hasattr(value, "__dataclass_fields__"):
        from pydantic import TypeAdapter

        return TypeAdapter(type(value)).dump_python(value, mode="json")
    return value


INTERNAL_PREFIX = "__"


def is_internal(key: str) -> bool:
    """Keys starting with "__" belong to conversa and its apps (user parts, CLI settings)."""
    return key.startswith(INTERNAL_PREFIX)


class SessionState:
    """A session's key-value state: reads come from a cache, writes go straight to storage.

    Keys starting with "__" are internal (user parts, the CLI's settings): get, set, has and
    delete reach them, but keys, items, to_dict, clear and from_dict leave them out, so a
    tool that lists or clears the state (such as session_data) cannot see or wipe them.
    """

    def __init__(self, storage: ConversationStorage, session_id: str) -> None:
        self._storage = storage
        self._session_id = session_id
        self._values: dict[str, Any] = {}
        self._expires: dict[str, float] = {}
        self._modified = False

    async def reload(self) -> None:
        """Read the state from storage again (a turn does this before it starts)."""
        self._values = await self._storage.get_state(self._session_id)
        self._expires = {}
        self._modified = False

    def _live(self, key: str) -> bool:
        expires = self._expires.get(key)
        if expires is not None and expires <= time.time():
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
        value = self._values[key]
        if as_type is None:
            return value
        from pydantic import TypeAdapter

        return TypeAdapter(as_type).validate_python(value)

    async def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``; with ``ttl`` seconds it expires after that."""
        await self.update({key: value}, ttl=ttl)

    async def update(self, values: Mapping[str, Any], *, ttl: float | None = None) -> None:
        """Store several keys at once."""
        plain = {k: _to_json_value(v) for k, v in values.items()}
        await self._storage.set_state(self._session_id, plain, ttl=ttl)
        self._values.update(plain)
        for key in plain:
            if ttl is None:
                self._expires.pop(key, None)
            else:
                self._expires[key] = time.time() + ttl
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
        """The live (key, value) pairs."""
        return [(k, self._values[k]) for k in self.keys(internal=internal)]

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
