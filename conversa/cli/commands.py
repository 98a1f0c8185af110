"""The slash-command registry: every command, its usage and help, in one place.

Commands register themselves with ``@command(...)`` in the modules listed in
``_COMMAND_MODULES``; /help, completion and "did you mean" all read this registry.
"""

from __future__ import annotations

import difflib
import importlib
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .repl import Repl

Handler = Callable[["Repl", "Argument"], Awaitable[bool | None]]
"""Runs a command with its checked argument; returning False ends the REPL."""
Takes = Literal["nothing", "word", "session", "text", "count"]
"""What a command takes after its name: nothing, one word (quotes group words), a session id
(a word that completion offers from the stored ids), free text, or an optional positive
whole number."""

_COMMAND_MODULES = (".commands", "._conversation_commands", "._session_commands")


@dataclass(frozen=True, slots=True)
class Command:
    """One slash command."""

    name: str
    usage: str
    help: str
    handler: Handler
    takes: Takes = "nothing"
    flags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def parse(self, text: str) -> Argument:
        """The argument in ``text``, checked against what the command takes."""
        if self.takes == "text":
            if text in self.flags:
                return Argument("", frozenset({text}))
            return Argument(text)
        try:
            words = shlex.split(text)
        except ValueError as exc:  # an unclosed quote
            raise UsageError(f"{self.name}: {exc}") from exc
        flags = {w for w in words if w.startswith("--")}
        unknown = sorted(flags.difference(self.flags))
        if unknown:
            raise UsageError(f"{self.name} has no option {unknown[0]}")
        rest = [w for w in words if w not in flags]
        if rest and self.takes == "nothing":
            raise UsageError(f"{self.name} takes no argument, not {' '.join(rest)!r}")
        if len(rest) > 1:
            raise UsageError(f"{self.name} takes one argument, not {' '.join(rest)!r}")
        value = rest[0] if rest else ""
        if value and self.takes == "count" and not (value.isdigit() and int(value) > 0):
            raise UsageError(f"{self.name} takes a whole number from 1 up, not {value!r}")
        return Argument(value, frozenset(flags))


class Argument(str):
    """A command's argument text, without its options; ``flags`` holds the options given."""

    flags: frozenset[str]

    def __new__(cls, text: str, flags: frozenset[str] = frozenset()) -> Argument:
        self = super().__new__(cls, text)
        self.flags = flags
        return self


class UsageError(ValueError):
    """A command was given an argument it does not take."""


_REGISTRY: dict[str, Command] = {}


def command(
    usage: str,
    help: str,
    *,
    takes: Takes = "nothing",
    flags: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
) -> Callable[[Handler], Handler]:
    """Register a handler for the command that ``usage`` starts with, e.g. "/history [N]"."""

    def register(handler: Handler) -> Handler:
        name = usage.split()[0]
        _REGISTRY[name] = Command(name, usage, help, handler, takes, flags, aliases)
        return handler

    return register


def registry() -> dict[str, Command]:
    """Every command by name (the handler modules are loaded on first use)."""
    for module in _COMMAND_MODULES:
        importlib.import_module(module, __package__)
    return _REGISTRY


def names() -> dict[str, Command]:
    """Every command by each name it answers to, its aliases included."""
    return {n: c for c in registry().values() for n in (c.name, *c.aliases)}


def suggest(name: str) -> str | None:
    """The closest command name to a mistyped one, if any is close."""
    close = difflib.get_close_matches(name, list(names()), n=1, cutoff=0.5)
    return close[0] if close else None


async def dispatch(repl: Repl, line: str) -> bool:
    """Run the command on ``line``; False when it ends the REPL."""
    name, _, argument = line.strip().partition(" ")
    found = names().get(name.lower())
    if found is None:
        guess = suggest(name.lower())
        hint = f"did you mean {guess}? " if guess else ""
        repl.out.error(
            f"unknown command {name}; {hint}/help lists them (start a message with // to "
            "send a line that begins with /)"
        )
        return True
    try:
        parsed = found.parse(argument.strip())
    except UsageError as exc:
        repl.out.error(f"{exc} (usage: {found.usage})")
        return True
    return await found.handler(repl, parsed) is not False


@command("/help", "show the commands and the keys")
async def _help(repl: Repl, argument: Argument) -> None:
    rows = [[", ".join([c.usage, *c.aliases]), c.help] for c in registry().values()]
    repl.out.table(["command", "what it does"], rows)
    if repl.out.interactive:
        repl.out.note(
            "Enter sends · Esc+Enter new line · Ctrl-X Ctrl-E edit in $EDITOR · "
            "Ctrl-C cancels the answer or clears the line · Ctrl-D exits"
        )


@command("/compact", "summarize the oldest messages now (the stored history stays whole)")
async def _compact(repl: Repl, argument: Argument) -> None:
    from ._format import status_text

    result = await repl.session.compact()
    if result.summary is None:
        note = repl.out.error if result.failed else repl.out.note
        note(f"not compacted: {result.reason}")
        return
    repl.out.note(result.reason)
    repl.out.info(status_text(await repl.session.context_status()))


@command("/exit", "leave (Ctrl-D does too)", aliases=("/quit",))
async def _exit(repl: Repl, argument: Argument) -> bool:
    return False
