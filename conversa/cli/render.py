"""Rich output for a terminal: streamed Markdown, a spinner, compact tool calls, tables."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

# rich is not imported here: the status lines before the first prompt are written without it
# (see RichOutput._line), and the REPL imports rich in the background once the prompt is up.
from ..events import ToolDone, ToolRunning
from ..model import TextDelta, ToolCallStarted
from ._format import message_lines, terminal_text, tool_call_line, tool_result_line
from ._output import Output, TurnView

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.live import Live
    from rich.markdown import Markdown

    from ..events import TurnEvent
    from ..messages import ChatMessage

ROLE_STYLES = {"user": "bold green", "assistant": "bold blue", "system": "bold magenta"}
FENCES = ("```", "~~~")


def markdown(text: str) -> Markdown:
    """``text`` as Markdown, its line breaks kept as written (poems, addresses, logs).

    Markdown joins a paragraph's lines into one; a line that ends in two spaces is a hard
    break, so every line that another line follows gets them, outside fenced code.
    """
    from rich.markdown import Markdown

    lines = text.split("\n")
    fence: str | None = None
    for number, line in enumerate(lines[:-1]):
        marker = line.lstrip()[:3]
        if fence is None and marker in FENCES:
            fence = marker
        elif fence is not None:
            if marker == fence:
                fence = None
        elif line.strip() and lines[number + 1].strip():
            lines[number] = line + "  "
    return Markdown("\n".join(lines))


class _Tail:
    """The last lines of a renderable that fit on the screen with a line to spare.

    A live area must never be as tall as the screen: what scrolls off the top cannot be
    erased, so it would stay in the scrollback and be printed a second time when the answer
    settles.
    """

    def __init__(self, renderable: Any) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options, pad=False)
        room = max(1, options.size.height - 1)
        new_line = Segment.line()
        for number, line in enumerate(lines[-room:]):
            if number:
                yield new_line
            yield from line


class _LiveAnswer:
    """The answer streamed so far, parsed as Markdown when the live area redraws.

    The live area redraws at most refresh_per_second; parsing at every delta instead would
    cost a parse of the whole answer per delta, quadratic in a long answer.
    """

    def __init__(self) -> None:
        self.text = ""
        self._parsed: tuple[str, Markdown] | None = None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self._parsed is None or self._parsed[0] != self.text:
            self._parsed = (self.text, markdown(self.text))
        yield _Tail(self._parsed[1])


def _stop_echo() -> Callable[[], None]:
    """Stop the terminal echoing keys while a turn is shown; returns what restores it.

    An echoed key (or the "^C" of Ctrl-C) moves the cursor under the live area, which then
    erases the wrong lines and leaves a copy of the answer's first lines behind. Keys typed
    meanwhile are still read: they appear at the next prompt.
    """
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        return lambda: None
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        quiet = list(saved)
        quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except (OSError, ValueError, termios.error):  # stdin is no terminal
        return lambda: None
    return lambda: termios.tcsetattr(fd, termios.TCSANOW, saved)


class RichTurn(TurnView):
    """A turn in a terminal: a spinner until text arrives, then live Markdown."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._restore_echo = _stop_echo() if console.is_terminal else lambda: None
        self.segment = ""
        self._answer = _LiveAnswer()
        self.answered = False
        """Text of the current model call arrived (an interrupted turn keeps it)."""
        self.live: Live | None = None
        self.label = "thinking…"
        self.resume()

    def _show(self, renderable: Any) -> None:
        from rich.live import Live

        if self.live is None:
            # transient: the live area is replaced by the final render, which may be taller
            self.live = Live(
                renderable, console=self.console, transient=True, refresh_per_second=10
            )
            self.live.start()
        else:
            self.live.update(renderable)

    def _settle(self) -> None:
        """End the live area and print the text streamed so far for good."""
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.segment.strip():
            self.console.print(markdown(self.segment))
        self.segment = ""
        self._answer = _LiveAnswer()

    def event(self, event: TurnEvent) -> None:
        """Show one event of the turn."""
        from rich.markup import escape
        from rich.spinner import Spinner

        if isinstance(event, TextDelta):
            self.segment += terminal_text(event.text)
            self.answered = self.answered or bool(event.text.strip())
            self._answer.text = self.segment
            self._show(self._answer)
        elif isinstance(event, ToolCallStarted) and not self.segment:
            self.label = f"calling {event.name}…"
            self._show(Spinner("dots", text=self.label, style="cyan"))
        elif isinstance(event, ToolRunning):
            self._settle()
            self.answered = False  # that model call's message is stored whole
            line = escape(tool_call_line(event.call))
            self.console.print(f"[cyan]⚙ {line}[/cyan]")
            self.label = f"running {event.call.name}…"
            self.resume()
        elif isinstance(event, ToolDone):
            self._settle()
            style = "dim" if event.ok else "yellow"
            line = escape(tool_result_line(event.output, event.ok))
            self.console.print(f"[{style}]  ↳ {line}[/{style}]")
            self.label = "thinking…"
            self.resume()

    def pause(self) -> None:
        """Stop the animation (and keep the text) so that a question can be asked."""
        self._settle()

    def resume(self) -> None:
        """Show the spinner."""
        from rich.spinner import Spinner

        self._show(Spinner("dots", text=self.label, style="cyan"))

    def close(self, *, interrupted: bool = False) -> None:
        """Print the final Markdown of the answer."""
        self._settle()
        self._restore_echo()
        if interrupted and self.answered:
            self.console.print("[yellow]⏹ interrupted: the partial answer is kept[/yellow]")
        elif interrupted:
            self.console.print("[yellow]⏹ interrupted[/yellow]")


STYLE_CODES = {"": "", "dim": "2", "yellow": "33", "bold red": "1;31"}
"""The SGR codes rich writes for the styles of the status lines (RichOutput._line)."""
RICH_SETTINGS = ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")
"""Variables that change how rich writes; with any of them set, rich writes every line."""


def _one_cell(char: str) -> bool:
    """True for a printable character one terminal cell wide (as rich counts it: ambiguous
    widths are one cell)."""
    if " " <= char <= "~":
        return True
    import unicodedata

    return (
        char.isprintable()
        and unicodedata.east_asian_width(char) in ("N", "Na", "H", "A")
        and not unicodedata.combining(char)
        and unicodedata.category(char)[0] not in "CM"
    )


class RichOutput(Output):
    """Output for a terminal."""

    interactive = True
    # what a turn shows with: imported while the user types the first message
    preload = ("rich.console", "rich.live", "rich.spinner", "rich.markdown")

    def __init__(self, console: Console | None = None) -> None:
        self._console = console

    @property
    def console(self) -> Console:
        """The rich console, made (and rich imported) when something needs it."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False)
        return self._console

    def _line(self, text: str, style: str = "") -> None:
        """Print one line of ``text`` in ``style``.

        rich costs a noticeable part of the start-up to import, and the chat prints a few
        status lines before its first prompt; a short ASCII line on a plain terminal is written
        here with the same escape codes rich would use. Anything else goes through rich.
        """
        if self._console is None and self._plain_terminal(text):
            code = STYLE_CODES[style]
            sys.stdout.write(f"\x1b[{code}m{text}\x1b[0m\n" if code else f"{text}\n")
            sys.stdout.flush()
            return
        from rich.text import Text

        self.console.print(Text(text, style=style))

    @staticmethod
    def _plain_terminal(text: str) -> bool:
        """True when rich would write ``text`` as one line with plain SGR codes."""
        if os.name == "nt" or any(os.environ.get(name) for name in RICH_SETTINGS):
            return False
        if os.environ.get("TERM", "").lower() in ("", "dumb", "unknown"):
            return False
        try:
            if not sys.stdout.isatty():
                return False
        except (AttributeError, ValueError):  # no stdout, or a closed one
            return False
        width = shutil.get_terminal_size().columns
        return len(text) < width and all(map(_one_cell, text))

    def info(self, text: str) -> None:
        """A result the user asked for."""
        self._line(terminal_text(text))

    def note(self, text: str) -> None:
        """A status line."""
        self._line(terminal_text(text), "dim")

    def warn(self, text: str) -> None:
        """Something to act on."""
        self._line(terminal_text(text), "yellow")

    def error(self, text: str) -> None:
        """One readable error line."""
        self._line(f"error: {terminal_text(text)}", "bold red")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table."""
        from rich.table import Table
        from rich.text import Text

        table = Table(*headers, box=None, header_style="bold", pad_edge=False)
        for row in rows:
            table.add_row(*(Text(terminal_text(c)) for c in row))
        self.console.print(table)

    def data(self, value: Any) -> None:
        """Pretty-printed data."""
        from rich.pretty import Pretty

        self.console.print(Pretty(value, expand_all=True))

    def transcript(self, messages: Sequence[ChatMessage], start: int = 0) -> None:
        """Messages, numbered, each under its role."""
        from rich.text import Text

        for number, message in enumerate(messages, start):
            label, text = message_lines(message)
            style = ROLE_STYLES.get(message.role, "dim")
            self.console.print(Text.assemble((f"[{number}] ", "dim"), (label, style)))
            if message.role == "assistant" and not message.tool_calls:
                self.console.print(markdown(text))
            else:
                self.console.print(Text(text, style="dim" if message.role == "tool" else ""))

    def matches(self, rows: Sequence[tuple[str, int, str, tuple[str, str, str]]]) -> None:
        """Search hits with the match highlighted."""
        from rich.text import Text

        for session_id, position, role, (before, match, after) in rows:
            self.console.print(
                Text.assemble(
                    (f"{session_id} #{position} {role}: ", "cyan"),
                    before,
                    (match, "bold reverse"),
                    after,
                )
            )

    def turn(self) -> RichTurn:
        """Start showing a turn."""
        return RichTurn(self.console)
