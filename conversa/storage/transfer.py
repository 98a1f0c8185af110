"""Writing whole sessions: /fork in the REPL, `sessions import` and `sessions migrate`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import StorageError
from ..messages import ChatMessage
from ._stored import (
    COMPLETED_AT_KEY,
    NO_FLOW,
    USAGE_KEYS,
    SessionFlow,
    StateEntry,
    UsageTotals,
    flow_reserved,
    summary_reserved,
    title_from,
    to_micros,
)
from .base import ConversationStorage


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
    state: Mapping[str, StateEntry],
    *,
    title: str | None = None,
    user_id: str | None = None,
    status: str = "active",
    metadata: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
    updated_at: datetime | None = None,
    usage: UsageTotals | None = None,
    flow: SessionFlow = NO_FLOW,
    completed_at: datetime | None = None,
) -> int:
    """Replace a session whole (history, state with expiry, info, usage totals, flow, and
    both times if given); return the message count it has now."""
    from ..compaction import newest_summary

    await target.save(session_id, history)
    await target.clear_state(session_id)
    by_expiry: dict[datetime | None, dict[str, Any]] = {}
    for key, entry in state.items():
        by_expiry.setdefault(entry.expires_at, {})[key] = entry.value
    for expires_at, values in by_expiry.items():
        await target.set_state(session_id, values, expires_at=expires_at)
    # A title equal to the derived default stays derived, so it follows later edits.
    await target.update_info(
        session_id,
        title=None if title == title_from(history) else title,
        user_id=user_id,
        status=status,
        metadata=metadata or {},
    )
    # the reserved info: set, not added, so a repeated copy gives the same totals
    totals = usage or UsageTotals()
    reserved: dict[str, Any] = dict(
        zip(USAGE_KEYS, (totals.prompt_tokens, totals.completion_tokens, totals.calls), strict=True)
    )
    reserved.update(summary_reserved(newest_summary(history)))
    reserved.update(flow_reserved(flow))
    if completed_at is not None and status != "active":  # the original's moment, not now
        reserved[COMPLETED_AT_KEY] = to_micros(completed_at)
    await target._change_reserved(session_id, {}, reserved)
    if created_at is not None and updated_at is not None:
        await target.set_times(session_id, created_at=created_at, updated_at=updated_at)
    return await target.count(session_id)


async def copy_session(
    source: ConversationStorage,
    target: ConversationStorage,
    session_id: str,
    new_id: str | None = None,
) -> Copied:
    """Copy one session's history, info, times and state; the target's copy is replaced whole.

    Every state key keeps its expiry, so it lives on in the copy for the rest of its time.
    Re-running it gives the same result, so an interrupted migration can simply be repeated.
    """
    dest = new_id or session_id
    history = await source.load(session_id)
    info = await source.get_info(session_id)
    state = await source.get_state_entries(session_id)
    count = await write_session(
        target,
        dest,
        history,
        state,
        title=info.title if info else None,
        user_id=info.user_id if info else None,
        status=info.status if info else "active",
        metadata=info.metadata if info else None,
        created_at=info.created_at if info else None,
        updated_at=info.updated_at if info else None,
        usage=info.usage if info else None,
        flow=info.flow if info else NO_FLOW,
        completed_at=info.completed_at if info else None,
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
