"""Writing whole sessions: /fork in the REPL, `sessions import` and `sessions migrate`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import StorageError
from ..messages import ChatMessage
from .base import ConversationStorage, title_from


@dataclass(frozen=True, slots=True)
class Copied:
    """What copy_session wrote."""

    session_id: str
    messages: int
    state_keys: int


async def write_session(
    target: ConversationStorage,
    session_id: str,
    history: Sequence[ChatMessage],
    state: Mapping[str, Any],
    *,
    title: str | None = None,
    user_id: str | None = None,
    status: str = "active",
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Replace a session whole (history, state, info) and return the message count it has now."""
    await target.save(session_id, history)
    await target.clear_state(session_id)
    if state:
        await target.set_state(session_id, state)
    # A title equal to the derived default stays derived, so it follows later edits.
    await target.update_info(
        session_id,
        title=None if title == title_from(history) else title,
        user_id=user_id,
        status=status,
        metadata=metadata or {},
    )
    return await target.count(session_id)


async def copy_session(
    source: ConversationStorage,
    target: ConversationStorage,
    session_id: str,
    new_id: str | None = None,
) -> Copied:
    """Copy one session's history, info and state; the target's copy is replaced whole.

    Re-running it gives the same result, so an interrupted migration can simply be repeated.
    Keys with a time to live are copied without it.
    """
    dest = new_id or session_id
    history = await source.load(session_id)
    info = await source.get_info(session_id)
    state = await source.get_state(session_id)
    count = await write_session(
        target,
        dest,
        history,
        state,
        title=info.title if info else None,
        user_id=info.user_id if info else None,
        status=info.status if info else "active",
        metadata=info.metadata if info else None,
    )
    if count != len(history):
        raise StorageError(
            f"copying {session_id!r} wrote {count} messages instead of {len(history)}; "
            "the target was changed meanwhile or is damaged: run the copy again"
        )
    return Copied(dest, count, len(state))


async def migrate(
    source: ConversationStorage, target: ConversationStorage
) -> AsyncIterator[Copied]:
    """Copy every session of ``source`` into ``target``, yielding each as it is done."""
    for session_id in reversed(await source.list_sessions()):
        # oldest first, so the target lists them in the same order of last update
        yield await copy_session(source, target, session_id)
