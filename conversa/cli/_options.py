"""Options shared by several commands, and how their values are resolved."""

from __future__ import annotations

import functools
import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import click

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_STORAGE = "sessions"
STORAGE_ENV = "CONVERSA_STORAGE"
STORAGE_HELP = (
    "Where sessions are stored: a directory, file://DIR, sqlite:///PATH.db, redis://..., "
    "postgresql://... [default: $CONVERSA_STORAGE or ./sessions]"
)
DEBUG_HELP = "Show full tracebacks of errors."


@dataclass(slots=True)
class AppConfig:
    """The global options, kept on the click context for the subcommands."""

    storage: str | None = None
    debug: bool = False


def app_config(ctx: click.Context) -> AppConfig:
    """The global options (defaults when a command runs without the group)."""
    root = ctx.find_root()
    if not isinstance(root.obj, AppConfig):
        root.obj = AppConfig()
    return root.obj


def storage_url(ctx: click.Context, given: str | None) -> str:
    """The storage to use: the command's --storage, the group's, $CONVERSA_STORAGE, ./sessions."""
    return given or app_config(ctx).storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def is_debug(ctx: click.Context) -> bool:
    """Whether --debug was given to the group or the command (or CONVERSA_DEBUG is set)."""
    flag = bool(ctx.params.get("debug")) or app_config(ctx).debug
    return flag or os.environ.get("CONVERSA_DEBUG", "") not in ("", "0")


def default_session_id() -> str:
    """The user's login name: each person gets their own chat by default."""
    try:
        return getpass.getuser() or "default"
    except (OSError, KeyError):
        return "default"


def common_options(fn: F) -> F:
    """--storage and --debug, accepted by every command as well as by the group."""
    fn = click.option("--debug", is_flag=True, help=DEBUG_HELP)(fn)
    return click.option("--storage", metavar="URL", help=STORAGE_HELP)(fn)


def model_options(fn: F) -> F:
    """The options that choose the model and how the agent works, given to ``fn`` as one
    ``options: AgentOptions`` argument."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        from dataclasses import fields

        from ._factory import AgentOptions

        # the options below are AgentOptions' fields (click.Choice checks --react-mode)
        given = {f.name: kwargs.pop(f.name) for f in fields(AgentOptions)}
        return fn(*args, options=AgentOptions(**given), **kwargs)

    options = [
        click.option(
            "--react-mode",
            type=click.Choice(["auto", "tools", "text"]),
            default="auto",
            show_default=True,
            help="Native tool calling, the JSON text protocol, or auto-detect.",
        ),
        click.option(
            "--max-iterations",
            type=click.IntRange(min=1),
            default=10,
            show_default=True,
            help="Model calls allowed per user message.",
        ),
        click.option(
            "--tools",
            "tool_names",
            metavar="NAMES",
            help="Comma-separated built-in tools to enable (or 'all'): calculator, "
            "current_time, session_data, list_files, read_file, fetch_url.",
        ),
        click.option(
            "--allow-private-fetch",
            is_flag=True,
            help="Let fetch_url reach loopback, private and link-local addresses.",
        ),
        click.option(
            "--context-window",
            type=click.IntRange(min=0),
            metavar="TOKENS",
            help="Tokens the prompt may take; older messages are summarized (compaction) or, "
            "with --no-compaction, left out of the prompt. Stored history is never changed. "
            "Kept with the session (0 takes it away).",
        ),
        click.option(
            "--no-compaction",
            is_flag=True,
            help="Only trim the prompt to the context window, never summarize (kept too).",
        ),
        click.option("--system", metavar="TEXT", help="The system prompt (kept with the session)."),
        click.option(
            "--base-url", metavar="URL", help="An OpenAI-compatible endpoint [$OPENAI_BASE_URL]."
        ),
        click.option("--model", metavar="NAME", help="The model name [$CONVERSA_MODEL]."),
    ]
    for option in options:
        command = option(command)
    return cast("F", command)
