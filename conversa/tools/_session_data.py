"""session_data: the model's key-value access to the session's state (from the Distri design)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

from pydantic import Field

from ..state import is_internal

ACTIONS = ("set", "get", "delete", "list", "clear")


class StateLike(Protocol):
    """The part of SessionState session_data uses: sync reads, async writes."""

    def get(self, key: str, default: Any = None) -> Any: ...
    async def set(
        self, key: str, value: Any, *, ttl: float | None = None, expires_at: datetime | None = None
    ) -> Any: ...
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
    expiry: Annotated[
        str | None,
        Field(
            description="Optional, for set: when the value expires, an ISO 8601 date-time "
            "such as 2030-01-31T18:00:00Z (without a zone: UTC)."
        ),
    ] = None,
    session: Any = None,
) -> str:
    """Store and recall data that persists across this conversation's turns.
    Use it to remember facts, preferences or intermediate results under a key: set stores a
    value (optionally until an expiry), get reads it back, delete removes it, list shows the
    keys, clear removes everything. Keys starting with "__" are reserved and cannot be used.
    """
    # The answers are Distri's: {"status": "success"|"error", ...} with its fields and texts.
    state: StateLike | None = getattr(session, "state", None)
    if state is None:
        return _error("Session data is not available: this tool must run inside a session")
    if not action:
        return _error(f"Missing required parameter 'action'; use one of: {', '.join(ACTIONS)}")
    if action not in ACTIONS:
        return _error(f"Invalid action '{action}'; valid actions are: {', '.join(ACTIONS)}")
    if key and is_internal(key):
        # Internal keys hold conversa's own settings (the system prompt, user parts): a model
        # writing them would rewrite its own instructions for every later turn.
        return _error(f"Key '{key}' is reserved: keys starting with '__' cannot be used")
    if action == "list":
        keys = _own_keys(state)
        return _success(action, keys=keys, count=len(keys))
    if action == "clear":
        count = len(_own_keys(state))
        await state.clear()  # SessionState.clear leaves the internal keys alone
        return _success(action, message=f"Cleared {count} keys", cleared=count)
    if not key:
        return _error(f"Missing required parameter 'key' for action '{action}'")
    if action == "set":
        return await _set(state, key, value, expiry)
    found = state.has(key)
    if action == "get":
        if found:
            return _success(action, key=key, value=state.get(key), found=True)
        return _success(
            action, key=key, value=None, found=False, message=f"No data found for key '{key}'"
        )
    if found:
        await state.delete(key)
        return _success(
            action, key=key, deleted=True, message=f"Successfully deleted data for key '{key}'"
        )
    return _success(action, key=key, deleted=False, message=f"No data found for key '{key}'")


async def _set(state: StateLike, key: str, value: Any, expiry: str | None) -> str:
    if value is None:
        return _error("Missing required parameter 'value' for action 'set'")
    moment = None
    if expiry is not None:
        try:
            moment = datetime.fromisoformat(expiry)
        except (TypeError, ValueError):
            return _error(
                f"Invalid 'expiry' {expiry!r}: give an ISO 8601 date-time such as "
                "2030-01-31T18:00:00Z"
            )
        moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
        if moment <= datetime.now(UTC):
            return _error(f"Invalid 'expiry' {expiry!r}: it is in the past")
    try:
        await state.set(key, value, expires_at=moment)
    except ValueError as exc:  # StateValueError: not JSON, or a bad key
        return _error(str(exc))
    fields: dict[str, Any] = {"key": key, "value": value}
    if moment is not None:
        fields["expires_at"] = moment.isoformat()
    return _success("set", message=f"Successfully stored data for key '{key}'", **fields)


def _own_keys(state: StateLike) -> list[str]:
    return [k for k in state.keys() if not is_internal(k)]  # noqa: SIM118 (a protocol, not a dict)


def _success(action: str, **fields: Any) -> str:
    return json.dumps({"status": "success", "action": action, **fields}, default=str)


def _error(message: str) -> str:
    return json.dumps({"status": "error", "message": message})
