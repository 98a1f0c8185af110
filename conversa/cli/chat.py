"""`conversa chat`: the interactive REPL (or line-by-line when input is piped)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, cast

import click

from ._options import common_options, default_session_id, is_debug, model_options, storage_url

if TYPE_CHECKING:
    from ..events import ReactMode
    from ._factory import AgentOptions


@click.command()
@click.argument("session_id", metavar="[SESSION]", required=False)
@model_options
@common_options
@click.pass_context
def chat(
    ctx: click.Context,
    session_id: str | None,
    model: str | None,
    base_url: str | None,
    system: str | None,
    tool_names: str | None,
    allow_private_fetch: bool,
    max_iterations: int,
    react_mode: str,
    storage: str | None,
    debug: bool,
) -> None:
    """Chat in SESSION (default: your login name), continuing where it left off.

    Type /help inside for the commands. Without a terminal (piped input) every line is one
    message and answers are printed as plain text; the exit status is then 1 when a message
    got no answer (the server failed, no model is configured), like `conversa ask`.
    """
    from ._factory import AgentOptions
    from ._runner import run

    options = AgentOptions(
        model=model,
        base_url=base_url,
        system=system,
        tool_names=tool_names,
        allow_private_fetch=allow_private_fetch,
        max_iterations=max_iterations,
        react_mode=cast("ReactMode", react_mode),  # click.Choice checked it
    )
    url = storage_url(ctx, storage)
    sid = session_id or default_session_id()
    answered = run(ctx, lambda: _chat(url, sid, options, debug=is_debug(ctx)))
    if not answered:
        sys.exit(1)


async def _chat(url: str, session_id: str, options: AgentOptions, *, debug: bool) -> bool:
    """Run the chat; False when piped messages got no answer."""
    from ..storage import open_storage
    from ._factory import load_tools
    from ._input import LineReader, PipeReader
    from ._output import make_output
    from .repl import Repl

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    out = make_output(interactive)
    tools = load_tools(options.tool_names, allow_private_fetch=options.allow_private_fetch)
    storage = open_storage(url)
    session_ids: list[str] = []  # kept current by the REPL, offered by completion
    reader: LineReader
    if interactive:
        from ._input import TerminalReader
        from .commands import registry

        reader = TerminalReader(registry(), session_ids)
    else:
        reader = PipeReader()
    try:
        repl = Repl(storage, options, tools, out, reader, session_ids=session_ids, debug=debug)
        await repl.open(session_id, first=True)
        if repl.ensure_model():
            out.note(f"model: {repl.model_label()}")
        if interactive:
            out.note("/help for commands · Ctrl-D to leave")
        await repl.run()
        return interactive or not repl.failed_turns
    finally:
        await storage.close()
