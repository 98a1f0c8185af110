"""`conversa sessions export | import | migrate`: moving sessions in and out of storage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._manage import require, with_storage
from ._options import common_options, storage_url

if TYPE_CHECKING:
    from ..storage import ConversationStorage


@click.command("export")
@click.argument("session_id", metavar="ID")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["md", "json"]),
    help="Markdown to read, JSON to import elsewhere [default: by the extension of -o, else md].",
)
@click.option("-o", "--output", "path", metavar="FILE", help="Write here instead of stdout.")
@common_options
@click.pass_context
def export_session(
    ctx: click.Context,
    session_id: str,
    fmt: str | None,
    path: str | None,
    storage: str | None,
    debug: bool,
) -> None:
    """Export a session as Markdown or JSON."""
    from ._export import format_for, to_json, to_markdown, write_private
    from ._factory import SYSTEM_KEY
    from ._format import terminal_text

    async def work(store: ConversationStorage) -> str:
        await require(store, session_id)
        history = await store.load(session_id)
        entries = await store.get_state_entries(session_id)
        state = {k: e.value for k, e in entries.items()}
        if format_for(path, fmt) == "json":
            expires = {k: e.expires_at for k, e in entries.items() if e.expires_at is not None}
            return to_json(session_id, history, await store.get_info(session_id), state, expires)
        system = state.get(SYSTEM_KEY)
        return to_markdown(session_id, history, system if isinstance(system, str) else None)

    text = with_storage(ctx, storage, work)
    if path is None:
        # click.echo would strip some escape sequences from a pipe: write the text exactly
        sys.stdout.write(terminal_text(text) if sys.stdout.isatty() else text)
    else:
        write_private(Path(path), text)
        click.echo(f"exported {session_id} to {path}", err=True)


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--as", "as_id", metavar="ID", help="The id to store it under.")
@click.option("--replace", is_flag=True, help="Replace a session that has this id already.")
@common_options
@click.pass_context
def import_session(
    ctx: click.Context,
    file: str,
    as_id: str | None,
    replace: bool,
    storage: str | None,
    debug: bool,
) -> None:
    """Import a session from conversa's JSON export, or a JSON array of messages.

    The id is --as, else the one in the export, else the file's name without extension.
    """
    from ._export import parse_import
    from ._runner import fail

    text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    try:
        imported = parse_import(text, file)
    except ValueError as exc:
        fail(str(exc))
    session_id = as_id or imported.session_id or Path(file).stem
    if file == "-" and not (as_id or imported.session_id):
        fail("reading stdin, the session needs an id: add --as ID")

    async def work(store: ConversationStorage) -> None:
        from ..storage.base import StateEntry
        from ..storage.transfer import write_session

        if await store.exists(session_id) and not replace:
            fail(f"session {session_id!r} exists; import it --as another id, or --replace it")
        state = {k: StateEntry(v, imported.expires.get(k)) for k, v in imported.state.items()}
        await write_session(
            store, session_id, imported.messages, state, title=imported.title, **imported.info
        )

    with_storage(ctx, storage, work)
    click.echo(f"imported {len(imported.messages)} messages into {session_id}")


@click.command("migrate")
@click.option("--from", "source", metavar="URL", help="Copy from here [default: --storage].")
@click.option("--to", "target", metavar="URL", required=True, help="Copy into this storage.")
@common_options
@click.pass_context
def migrate_sessions(
    ctx: click.Context, source: str | None, target: str, storage: str | None, debug: bool
) -> None:
    """Copy every session (messages, state, info) to another storage, and verify the copy.

    Sessions already in the target are replaced by the source's version, so running it
    again after an interruption finishes the job.
    """
    from ._runner import fail, run

    source_url = source or storage_url(ctx, storage)
    if source_url == target:
        fail("--from and --to are the same storage; name another one with --to")
    copied, problems = run(ctx, lambda: _migrate(source_url, target))
    if problems:
        fail("the copy does not match for: " + "; ".join(problems) + " — run migrate again")
    messages = sum(c for c in copied.values())
    click.echo(
        f"migrated {len(copied)} sessions ({messages} messages); "
        "verified: every session has the same number of messages in both"
    )


async def _migrate(source_url: str, target_url: str) -> tuple[dict[str, int], list[str]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..storage import open_storage
    from ..storage.transfer import migrate

    source, target = open_storage(source_url), open_storage(target_url)
    try:
        total = len(await source.list_sessions())
        copied: dict[str, int] = {}
        with Progress(
            TextColumn("migrating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
        ) as progress:
            task = progress.add_task("", total=total)
            async for done in migrate(source, target):
                copied[done.session_id] = done.messages
                progress.update(task, advance=1, description=done.session_id)
        problems = []
        for session_id in await source.list_sessions():
            want, have = await source.count(session_id), await target.count(session_id)
            if want != have:
                problems.append(f"{session_id} ({want} messages, {have} copied)")
        return copied, problems
    finally:
        await source.close()
        await target.close()
