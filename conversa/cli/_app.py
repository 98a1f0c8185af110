"""The click group: global options and the command groups it is made of."""

from __future__ import annotations

import click

from ._options import DEBUG_HELP, STORAGE_HELP, AppConfig
from .ask import ask
from .chat import chat
from .serve import serve
from .sessions import sessions


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--storage", metavar="URL", help=STORAGE_HELP)
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
# the version is read from the package metadata only when --version is given
@click.version_option(None, "--version", "-V", package_name="conversa-ai", prog_name="conversa")
@click.pass_context
def cli(ctx: click.Context, storage: str | None, debug: bool) -> None:
    """Persistent, multi-turn conversations with LLM agents.

    Start chatting with `conversa chat`; manage stored conversations with
    `conversa sessions`. Configure the model with OPENAI_API_KEY, OPENAI_BASE_URL and
    CONVERSA_MODEL, and the storage with --storage or CONVERSA_STORAGE.
    """
    ctx.obj = AppConfig(storage=storage, debug=debug)


cli.add_command(chat)
cli.add_command(ask)
cli.add_command(sessions)
cli.add_command(serve)
