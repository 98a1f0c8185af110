"""Copying sessions within or between storages: /fork in the REPL and `sessions migrate`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..errors import StorageError
from .base import ConversationStorage, title_from


@dataclass(frozen=True, slots=True)
class Copied:
    """What copy_session wrote."""

    session_id: str
    messages: int
    state_keys: int


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
    await target.save(dest, history)
    await target.clear_state(dest)
    if state:
        await target.set_state(dest, state)
    if info is not None:
        # A title equal to the derived default stays derived, so it follows later edits.
        stored_title = None if info.title == title_from(history) else info.title
        await target.update_info(
            dest,
            title=stored_title,
            user_id=info.user_id,
            status=info.status,
            metadata=info.metadata,
        )
    count = await target.count(dest)
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
