"""`conversa ask`: one question, the answer streamed to stdout; for scripts."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

import click

from ._options import common_options, model_options, storage_url

if TYPE_CHECKING:
    from ..events import ReactMode
    from ._factory import AgentOptions


@click.command()
@click.argument("question", required=False)
@click.option(
    "--session",
    "session_id",
    metavar="ID",
    help="Ask within this stored session (it keeps the turn); without it nothing is stored.",
)
@model_options
@common_options
@click.pass_context
def ask(
    ctx: click.Context,
    question: str | None,
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
    """Ask QUESTION (or read it from stdin) and print the answer as it arrives.

    The exit status is 0 when the model answered, 1 with a message on stderr otherwise.
    """
    from ._factory import AgentOptions
    from ._options import is_debug
    from ._runner import fail, run

    if question is None or question == "-":
        question = "" if sys.stdin.isatty() else sys.stdin.read()
    if not question.strip():
        fail('ask needs a question: conversa ask "..." (or pipe it in)')
    options = AgentOptions(
        model=model,
        base_url=base_url,
        system=system,
        tool_names=tool_names,
        allow_private_fetch=allow_private_fetch,
        max_iterations=max_iterations,
        react_mode=cast("ReactMode", react_mode),  # click.Choice checked it
    )
    url = storage_url(ctx, storage) if session_id else "memory://"
    ok = run(ctx, lambda: _ask(url, session_id or "ask", question, options, is_debug(ctx)))
    if not ok:
        sys.exit(1)


async def _ask(
    url: str, session_id: str, question: str, options: AgentOptions, debug: bool
) -> bool:
    from ..storage import open_storage
    from ._factory import load_tools, model_spec, open_session
    from ._input import PipeReader
    from ._plain import PlainOutput
    from .repl import Repl

    out = PlainOutput()
    storage = open_storage(url)
    try:
        session, name = await open_session(
            session_id,
            storage,
            options,
            tools=load_tools(options.tool_names, allow_private_fetch=options.allow_private_fetch),
            approve=_approve_on_terminal,
            override=True,
        )
        session.model = model_spec(name, options.base_url)
        repl = Repl(storage, options, [], out, PipeReader(), debug=debug)
        repl.session, repl.model_name = session, name
        result = await repl.run_turn(session.stream_message(question))
        return result is not None and result.success
    finally:
        await storage.close()


def _approve_on_terminal(name: str, arguments: dict[str, Any]) -> bool:
    """Ask on the terminal when there is one; a script cannot answer, so it is denied."""
    if not sys.stdin.isatty():
        click.echo(f"{name} needs approval and there is no terminal to ask; not run", err=True)
        return False
    from ._format import approval_question

    return click.confirm(approval_question(name, arguments), default=False, err=True)
