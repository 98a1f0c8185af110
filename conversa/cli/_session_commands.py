"""Slash commands that move between sessions: list, switch, new, fork, search."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from ._format import ago, shorten, snippet
from .commands import command

if TYPE_CHECKING:
    from .repl import Repl

SEARCH_LIMIT = 20


@command("/sessions", "list the stored sessions")
async def _sessions(repl: Repl, argument: str) -> None:
    infos = await repl.storage.find_sessions()
    current = repl.session.session_id
    rows = [
        [
            ("* " if i.session_id == current else "  ") + i.session_id,
            str(i.message_count),
            ago(i.updated_at),
            shorten(i.title or "", 50),
        ]
        for i in infos
    ]
    repl.out.table(["session", "messages", "updated", "title"], rows)
    repl.session_ids[:] = [i.session_id for i in infos]


@command("/switch ID", "continue session ID", takes="session")
async def _switch(repl: Repl, argument: str) -> None:
    if not argument:
        repl.out.error("/switch needs a session id; /sessions lists them")
        return
    if argument == repl.session.session_id:
        repl.out.note(f"already in {argument}")
        return
    if not await repl.storage.exists(argument):
        repl.out.error(f"there is no session {argument!r}; /new {argument} starts it")
        return
    await repl.open(argument)


@command("/new [ID]", "start a new session (named ID, or a fresh name)", takes="session")
async def _new(repl: Repl, argument: str) -> None:
    session_id = argument or _fresh_id(repl.session.session_id)
    if await repl.storage.exists(session_id):
        repl.out.error(f"session {session_id!r} exists; /switch {session_id} continues it")
        return
    await repl.open(session_id)


@command("/fork [ID]", "copy this session to ID and continue in the copy", takes="session")
async def _fork(repl: Repl, argument: str) -> None:
    from ..storage.transfer import copy_session

    source = repl.session.session_id
    target = argument or _fresh_id(f"{source}-fork")
    if await repl.storage.exists(target):
        repl.out.error(f"session {target!r} exists; choose another id: /fork NEW_ID")
        return
    copied = await copy_session(repl.storage, repl.storage, source, target)
    repl.out.note(f"forked {source} into {target} ({copied.messages} messages)")
    await repl.open(target)


@command("/search TEXT", "find TEXT in every session", takes="text")
async def _search(repl: Repl, argument: str) -> None:
    if not argument:
        repl.out.error("/search needs some text to look for")
        return
    hits = await repl.storage.search(argument, limit=SEARCH_LIMIT)
    if not hits:
        repl.out.note(f"no message contains {argument!r}")
        return
    repl.out.matches(
        [
            (h.session_id, h.position, h.message.role, snippet(h.message.text, argument))
            for h in hits
        ]
    )


def _fresh_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
