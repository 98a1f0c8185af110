"""The dict-like faces of a SessionState that write without ``await``.

Three places need them: ``state.sync`` (a sync tool or interceptor, whose changes are stored
when it returns), DCAF's ``session.get/set/delete`` on a Session, and SyncSession's ``state``
(whose writes block until stored). They read alike and differ only in how a write is stored,
which is the two hooks ``_store`` and ``_remove``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, overload

if TYPE_CHECKING:
    from .state import SessionState

T = TypeVar("T")


class KeyValueAccess:
    """get/set/update/delete/has and ``[]`` over a SessionState, writing without ``await``.

    By default a write is the state's sync API (stored as SessionState says); a subclass may
    store it otherwise by overriding ``_store`` and ``_remove``.
    """

    __slots__ = ()

    def _target(self) -> SessionState:
        raise NotImplementedError

    def _store(
        self, values: Mapping[str, Any], ttl: float | None, expires_at: datetime | None
    ) -> None:
        self._target().set_sync(values, ttl=ttl, expires_at=expires_at)

    def _remove(self, keys: list[str]) -> None:
        self._target().delete_sync(keys)

    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    @overload
    def get(self, key: str, default: Any = None, *, as_type: type[T]) -> T: ...

    def get(self, key: str, default: Any = None, *, as_type: Any = None) -> Any:
        """The value of ``key`` (``default`` if absent), validated into ``as_type`` if given."""
        return self._target().get(key, default, as_type=as_type)

    def set(
        self, key: str, value: Any, *, ttl: float | None = None, expires_at: datetime | None = None
    ) -> None:
        """Set ``key`` to a copy of ``value``, optionally expiring (``ttl`` or ``expires_at``)."""
        self._store({key: value}, ttl, expires_at)

    def update(
        self,
        values: Mapping[str, Any],
        *,
        ttl: float | None = None,
        expires_at: datetime | None = None,
    ) -> None:
        """Set several keys, with one expiry for all."""
        self._store(values, ttl, expires_at)

    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""
        self._remove([key])

    def has(self, key: str) -> bool:
        """Whether ``key`` is set and not expired."""
        return self._target().has(key)

    def __getitem__(self, key: str) -> Any:
        return self._target()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._store({key: value}, None, None)

    def __delitem__(self, key: str) -> None:
        if not self.has(key):
            raise KeyError(key)
        self._remove([key])

    def __contains__(self, key: object) -> bool:
        return key in self._target()


class StateView(KeyValueAccess):
    """A whole state without ``await`` (``state.sync``): KeyValueAccess, clear and listing."""

    __slots__ = ("_state",)

    def __init__(self, state: SessionState) -> None:
        self._state = state

    def _target(self) -> SessionState:
        return self._state

    def clear(self) -> None:
        """Remove every key that is not internal."""
        self._remove(self._state.keys())

    def keys(self) -> list[str]:
        """The live keys but the internal ones."""
        return self._state.keys()

    def items(self) -> list[tuple[str, Any]]:
        """The live (key, value) pairs but the internal ones, the values as copies."""
        return self._state.items()

    def to_dict(self) -> dict[str, Any]:
        """A copy of the live state, without internal keys."""
        return self._state.to_dict()

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)
