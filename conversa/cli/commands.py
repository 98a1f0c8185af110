"""The slash-command registry: every command, its usage and help, in one place.

Commands register themselves with ``@command(...)`` in the modules listed in
``_COMMAND_MODULES``; /help, completion and "did you mean" all read this registry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .repl import Repl

Handler = Callable[["Repl", str], Awaitable[bool | None]]
"""Runs a command with its argument text; returning False ends the REPL."""

_COMMAND_MODULES = (".commands", "._conversation_commands", "._session_commands")


@dataclass(frozen=True, slots=True)
class Command:
    """One slash command."""

    name: str
    usage: str
    help: str
    handler: Handler


_REGISTRY: dict[str, Command] = {}


def command(usage: str, help: str) -> Callable[[Handler], Handler]:
    """Register a handler for the command that ``usage`` starts with, e.g. "/history [N]"."""

    def register(handler: Handler) -> Handler:
        name = usage.split()[0]
        _REGISTRY[name] = Command(name, usage, help, handler)
        return handler

    return register


def registry() -> dict[str, Command]:
    """Every command by name (the handler modules are loaded on first use)."""
    for module in _COMMAND_MODULES:
        importlib.import_module(module, __package__)
    return _REGISTRY


def suggest(name: str) -> str | None:
    """The closest command name to a mistyped one, if any is close."""
    close = difflib.get_close_matches(name, list(registry()), n=1, cutoff=0.5)
    return close[0] if close else None


async def dispatch(repl: Repl, line: str) -> bool:
    """Run the command on ``line``; False when it ends the REPL."""
    name, _, argument = line.strip().partition(" ")
    found = registry().get(name.lower())
    if found is None:
        guess = suggest(name.lower())
        hint = f"did you mean {guess}? " if guess else ""
        repl.out.error(
            f"unknown command {name}; {hint}/help lists them (start a message with // to "
            "send a line that begins with /)"
        )
        return True
    return await found.handler(repl, argument.strip()) is not False


@command("/help", "show the commands and the keys")
async def _help(repl: Repl, argument: str) -> None:
    rows = [[c.usage, c.help] for c in registry().values()]
    repl.out.table(["command", "what it does"], rows)
    if repl.out.interactive:
        repl.out.note(
            "Enter sends · Esc+Enter new line · Ctrl-X Ctrl-E edit in $EDITOR · "
            "Ctrl-C cancels the answer or clears the line · Ctrl-D exits"
        )


@command("/exit", "leave (Ctrl-D does too)")
async def _exit(repl: Repl, argument: str) -> bool:
    return False


@command("/quit", "leave")
async def _quit(repl: Repl, argument: str) -> bool:
    return False
