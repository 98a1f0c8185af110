"""session_data: the model's key-value access to the session's state (from the Distri design)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any, Protocol

from pydantic import Field

from ..state import is_internal

ACTIONS = ("set", "get", "delete", "list", "clear")


class StateLike(Protocol):
    """The part of SessionState session_data uses: sync reads, async writes."""

    def get(self, key: str, default: Any = None) -> Any: ...
    async def set(self, key: str, value: Any, ttl: float | None = None) -> Any: ...
    async def delete(self, key: str) -> Any: ...
    def has(self, key: str) -> bool: ...
    def keys(self) -> Iterable[str]: ...
    async def clear(self) -> Any:
        """Remove every key but the internal ones."""


async def session_data(
    action: Annotated[
        str | None, Field(description="One of: set, get, delete, list, clear.")
    ] = None,
    key: Annotated[str | None, Field(description="The key; needed by set, get and delete.")] = None,
    value: Annotated[Any, Field(description="The JSON value to store; needed by set.")] = None,
    session: Any = None,
) -> str:
    """Store and recall data that persists across this conversation's turns.
    Use it to remember facts, preferences or intermediate results under a key: set stores a
    value, get reads it back, delete removes it, list shows the keys, clear removes everything.
    Keys starting with "__" are reserved and cannot be used.
    """
    state: StateLike | None = getattr(session, "state", None)
    if state is None:
        return _error("session data is not available: this tool must run inside a session")
    if not action:
        return _error(f"missing 'action'; use one of: {', '.join(ACTIONS)}")
    if action not in ACTIONS:
        return _error(f"unknown action {action!r}; use one of: {', '.join(ACTIONS)}")
    if key and is_internal(key):
        # Internal keys hold conversa's own settings (the system prompt, user parts): a model
        # writing them would rewrite its own instructions for every later turn.
        return _error(f"key {key!r} is reserved: keys starting with '__' cannot be used")
    if action == "list":
        return _success(action, keys=_own_keys(state))
    if action == "clear":
        count = len(_own_keys(state))
        await state.clear()  # SessionState.clear leaves the internal keys alone
        return _success(action, cleared=count)
    if not key:
        return _error(f"action {action!r} needs a 'key'")
    if action == "set":
        if value is None:
            return _error("action 'set' needs a 'value' to store")
        await state.set(key, value)
        return _success(action, key=key, value=value)
    found = state.has(key)
    if action == "get":
        return _success(action, key=key, found=found, value=state.get(key) if found else None)
    if found:
        await state.delete(key)
    return _success(action, key=key, deleted=found)


def _own_keys(state: StateLike) -> list[str]:
    return [k for k in state.keys() if not is_internal(k)]  # noqa: SIM118 (a protocol, not a dict)


def _success(action: str, **fields: Any) -> str:
    return json.dumps({"status": "success", "action": action, **fields}, default=str)


def _error(message: str) -> str:
    return json.dumps({"status": "error", "message": message})
