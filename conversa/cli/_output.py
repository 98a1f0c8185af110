"""The output interface the REPL and commands write to; rich and plain versions implement it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..events import TurnEvent
    from ..messages import ChatMessage


class TurnView(ABC):
    """Shows one turn as it happens: a spinner, streamed text, tool calls."""

    @abstractmethod
    def event(self, event: TurnEvent) -> None:
        """Show one event of the turn."""

    @abstractmethod
    def pause(self) -> None:
        """Stop any animation so that the user can be asked something."""

    @abstractmethod
    def resume(self) -> None:
        """Show the spinner again after pause()."""

    @abstractmethod
    def close(self, *, interrupted: bool = False) -> None:
        """End the turn's display, keeping what was shown."""


class Output(ABC):
    """Where the REPL and the commands write."""

    interactive: bool
    preload: tuple[str, ...] = ()
    """Modules the first turn will need, imported in the background once the prompt is up."""

    @abstractmethod
    def info(self, text: str) -> None:
        """A result the user asked for."""

    @abstractmethod
    def note(self, text: str) -> None:
        """A status line (resumed, switched, saved ...)."""

    @abstractmethod
    def warn(self, text: str) -> None:
        """Something the user should act on, that is not an error of their command."""

    @abstractmethod
    def error(self, text: str) -> None:
        """One readable error line."""

    @abstractmethod
    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table of plain strings."""

    @abstractmethod
    def data(self, value: Any) -> None:
        """JSON-like data, pretty-printed."""

    @abstractmethod
    def transcript(self, messages: Sequence[ChatMessage], start: int = 0) -> None:
        """Messages one after another, numbered from ``start``."""

    @abstractmethod
    def matches(self, rows: Sequence[tuple[str, int, str, tuple[str, str, str]]]) -> None:
        """Search hits: (session id, position, role, (before, match, after))."""

    @abstractmethod
    def turn(self) -> TurnView:
        """Start showing a turn."""


def make_output(interactive: bool) -> Output:
    """Rich output for a terminal, plain text for pipes and files."""
    if interactive:
        from .render import RichOutput

        return RichOutput()
    from ._plain import PlainOutput

    return PlainOutput()
