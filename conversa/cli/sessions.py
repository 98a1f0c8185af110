"""`conversa sessions ...`: list, show, delete, prune and search stored sessions."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import click

from ._manage import output, require, with_storage
from ._options import common_options, model_options
from ._sessions_io import export_session, import_session, migrate_sessions
from ._sessions_rekey import rekey_sessions

if TYPE_CHECKING:
    from ..storage import ConversationStorage
    from ._factory import AgentOptions

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise click.BadParameter(
            f"{text!r} is not a duration; use a number and a unit: 45s, 90m, 12h, 30d, 2w"
        )
    return timedelta(seconds=float(match.group(1)) * DURATION_UNITS[match.group(2)])


@click.group()
def sessions() -> None:
    """Manage stored sessions: list, show, compact, export, import, delete, prune, search,
    migrate, rekey."""


PAGE = 20
"""`sessions list` shows this many sessions unless told otherwise."""


@sessions.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=PAGE,
    show_default=True,
    help="Show the N most recently updated sessions.",
)
@click.option("--all", "show_all", is_flag=True, help="Show every session (overrides --limit).")
@common_options
@click.pass_context
def list_(
    ctx: click.Context,
    as_json: bool,
    limit: int,
    show_all: bool,
    storage: str | None,
    debug: bool,
) -> None:
    """List sessions, most recently updated first (the newest 20 unless --limit or --all)."""
    from ._format import ago, shorten

    # One more than shown tells whether there are more, without counting the store.
    wanted = None if show_all else limit + 1
    infos = with_storage(ctx, storage, lambda s: s.find_sessions(limit=wanted))
    more = wanted is not None and len(infos) > limit
    if more:
        del infos[limit:]
    hint = (
        f"showing the {limit} most recently updated sessions; there are more "
        "(--all shows every one, --limit N the newest N)"
    )
    if as_json:
        rows = [
            {
                "session_id": i.session_id,
                "messages": i.message_count,
                "created_at": i.created_at.isoformat(),
                "updated_at": i.updated_at.isoformat(),
                "title": i.title,
                "user_id": i.user_id,
                "status": i.status,
                "usage": i.usage.to_dict(),
            }
            for i in infos
        ]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        if more:
            click.echo(f"note: {hint}", err=True)
        return
    out = output()
    if not infos:
        out.note("no sessions yet; `conversa chat` starts one")
        return
    out.table(
        ["session", "messages", "updated", "title"],
        [
            [i.session_id, str(i.message_count), ago(i.updated_at), shorten(i.title or "", 60)]
            for i in infos
        ],
    )
    if more:
        out.note(hint)


@sessions.command()
@click.argument("session_id", metavar="ID")
@click.option("--last", type=click.IntRange(min=1), help="Show only the last N messages.")
@click.option(
    "--context-window",
    type=click.IntRange(min=1),
    metavar="TOKENS",
    help="Say what a prompt of this many tokens would hold [default: the session's own].",
)
@common_options
@click.pass_context
def show(
    ctx: click.Context,
    session_id: str,
    last: int | None,
    context_window: int | None,
    storage: str | None,
    debug: bool,
) -> None:
    """Show a session's info, what the model sees of it, and its messages."""
    from ..flow import info_lines
    from ..session import Session
    from ._format import status_text, usage_text

    out = output()

    async def work(store: ConversationStorage) -> None:
        await require(store, session_id)
        info = await store.get_info(session_id)
        state = await store.get_state(session_id)
        if info is not None:
            out.note(
                f"{session_id}: {info.message_count} messages, created "
                f"{info.created_at:%Y-%m-%d %H:%M}, updated {info.updated_at:%Y-%m-%d %H:%M} UTC"
            )
            out.note(f"usage: {usage_text(info.usage)}")
            for line in info_lines(info):  # status when not active, and the flow
                out.note(line)
        from ._factory import stored_window

        kept = stored_window(state)
        window = context_window or (kept["tokens"] if kept else None)
        compaction = kept["compaction"] if kept and not context_window else None
        viewer = Session(session_id, store, context_window=window, compaction=compaction)
        out.note(status_text(await viewer.context_status()))
        if state:
            out.note(f"state: {json.dumps(state, ensure_ascii=False)}")
        # only the messages shown are read (--last of a long session reads a page of it)
        total = info.message_count if info is not None else await store.count(session_id)
        start = max(0, total - last) if last else 0
        out.transcript(await store.read(session_id, start), start)

    with_storage(ctx, storage, work)


@sessions.command()
@click.argument("session_id", metavar="ID")
@model_options
@common_options
@click.pass_context
def compact(
    ctx: click.Context,
    session_id: str,
    options: AgentOptions,
    storage: str | None,
    debug: bool,
) -> None:
    """Summarize the oldest messages of session ID now (its stored history stays whole).

    The summary is appended to the session; later prompts carry it in place of the messages
    it covers. --context-window sizes the part kept verbatim (30 % of it).
    """
    from ._format import status_text

    out = output()

    async def work(store: ConversationStorage) -> None:
        from ._factory import model_spec, open_session

        await require(store, session_id)
        session, name = await open_session(
            session_id, store, options, tools=[], approve=None, override=False
        )
        session.model = model_spec(name, options.base_url)
        result = await session.compact()
        if result.summary is None:
            message = f"{session_id}: not compacted: {result.reason}"
            if result.failed:
                raise click.ClickException(message)
            out.note(message)
            return
        out.note(f"{session_id}: {result.reason}")
        out.note(status_text(await session.context_status()))

    with_storage(ctx, storage, work)


@sessions.command()
@click.argument("session_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@common_options
@click.pass_context
def delete(
    ctx: click.Context, session_id: str, yes: bool, storage: str | None, debug: bool
) -> None:
    """Delete a session: its messages, state and info."""

    async def work(store: ConversationStorage) -> None:
        await require(store, session_id)
        count = await store.count(session_id)
        if not yes:
            click.confirm(f"delete session {session_id} ({count} messages)?", abort=True)
        await store.delete(session_id)
        click.echo(f"deleted {session_id} ({count} messages)")

    with_storage(ctx, storage, work)


@sessions.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="AGE",
    help="Delete sessions not updated for this long: 45s, 90m, 12h, 30d, 2w.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@common_options
@click.pass_context
def prune(
    ctx: click.Context,
    older_than: str,
    dry_run: bool,
    yes: bool,
    storage: str | None,
    debug: bool,
) -> None:
    """Delete the sessions that have not been updated for a while."""
    age = parse_duration(older_than)
    cutoff = datetime.now(UTC) - age

    async def work(store: ConversationStorage) -> None:
        old = await store.find_sessions(updated_before=cutoff)
        if not old:
            click.echo(f"no session is older than {older_than}")
            return
        for info in old:
            click.echo(
                f"{info.session_id}  {info.message_count} messages  "
                f"updated {info.updated_at:%Y-%m-%d %H:%M}"
            )
        if dry_run:
            click.echo(f"{len(old)} sessions would be deleted")
            return
        if not yes:
            click.confirm(f"delete these {len(old)} sessions?", abort=True)
        for info in old:
            await store.delete(info.session_id)
        click.echo(f"deleted {len(old)} sessions")

    with_storage(ctx, storage, work)


@sessions.command()
@click.argument("text")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@common_options
@click.pass_context
def search(ctx: click.Context, text: str, limit: int, storage: str | None, debug: bool) -> None:
    """Find messages with every word of TEXT (or a word starting with it), newest first."""
    from ._format import snippet

    hits = with_storage(ctx, storage, lambda s: s.search(text, limit=limit))
    out = output()
    if not hits:
        out.note(f"no message contains {text!r}")
        return
    out.matches(
        [(h.session_id, h.position, h.message.role, snippet(h.message.text, text)) for h in hits]
    )


sessions.add_command(export_session)
sessions.add_command(import_session)
sessions.add_command(migrate_sessions)
sessions.add_command(rekey_sessions)
