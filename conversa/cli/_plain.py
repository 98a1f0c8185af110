"""Plain-text output for pipes and scripts: answers on stdout, status on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from ..events import ToolDone, ToolRunning
from ..model import TextDelta
from ._format import message_lines, table_text, terminal_text, tool_call_line, tool_result_line
from ._output import Output, TurnView

if TYPE_CHECKING:
    from ..events import TurnEvent
    from ..messages import ChatMessage


class PlainTurn(TurnView):
    """A turn without a terminal: text as it arrives, tool calls on stderr."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.at_line_start = True

    def event(self, event: TurnEvent) -> None:
        """Write text deltas through; note tool calls on stderr."""
        if isinstance(event, TextDelta) and event.text:
            self.out.write(terminal_text(event.text))
            self.out.flush()
            self.at_line_start = event.text.endswith("\n")
        elif isinstance(event, ToolRunning):
            self._end_line()
            print(f"[tool] {tool_call_line(event.call)}", file=self.err, flush=True)
        elif isinstance(event, ToolDone):
            print(
                f"[tool] -> {tool_result_line(event.output, event.ok)}", file=self.err, flush=True
            )

    def _end_line(self) -> None:
        if not self.at_line_start:
            self.out.write("\n")
            self.out.flush()
            self.at_line_start = True

    def pause(self) -> None:
        """Nothing animates here."""
        self._end_line()

    def resume(self) -> None:
        """Nothing animates here."""

    def close(self, *, interrupted: bool = False) -> None:
        """End the answer's line."""
        self._end_line()
        if interrupted:
            print("[interrupted]", file=self.err, flush=True)


class PlainOutput(Output):
    """Output without a terminal."""

    interactive = False

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def _print(self, text: str, stream: TextIO) -> None:
        print(terminal_text(text), file=stream, flush=True)

    def info(self, text: str) -> None:
        """A result: stdout."""
        self._print(text, self.out)

    def note(self, text: str) -> None:
        """Status: stderr, so that stdout holds only answers and results."""
        self._print(text, self.err)

    def warn(self, text: str) -> None:
        """Something to act on: stderr."""
        self._print(text, self.err)

    def error(self, text: str) -> None:
        """One error line on stderr."""
        self._print(f"error: {text}", self.err)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """An aligned plain table."""
        self._print(table_text(headers, rows), self.out)

    def data(self, value: Any) -> None:
        """Indented JSON."""
        self._print(json.dumps(value, indent=2, ensure_ascii=False, default=str), self.out)

    def transcript(self, messages: Sequence[ChatMessage], start: int = 0) -> None:
        """``[n] role: text`` per message."""
        for number, message in enumerate(messages, start):
            label, text = message_lines(message)
            self._print(f"[{number}] {label}: {text}", self.out)

    def matches(self, rows: Sequence[tuple[str, int, str, tuple[str, str, str]]]) -> None:
        """``session #n role: ...match...`` per hit."""
        for session_id, position, role, (before, match, after) in rows:
            self._print(f"{session_id} #{position} {role}: {before}{match}{after}", self.out)

    def turn(self) -> PlainTurn:
        """Start showing a turn."""
        return PlainTurn(self.out, self.err)
