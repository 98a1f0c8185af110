"""Reading the user's input: prompt_toolkit in a terminal, plain lines from a pipe."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prompt_toolkit.completion import CompleteEvent, Completer, Completion
    from prompt_toolkit.document import Document
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

    from .commands import Command


def history_path() -> Path:
    """Where the input history lives: $CONVERSA_HISTORY, $XDG_STATE_HOME/conversa/history,
    else ~/.conversa_history."""
    explicit = os.environ.get("CONVERSA_HISTORY")
    if explicit:
        return Path(explicit).expanduser()
    state_home = os.environ.get("XDG_STATE_HOME")
    if state_home:
        return Path(state_home) / "conversa" / "history"
    return Path.home() / ".conversa_history"


def private_history(path: Path) -> None:
    """Create the history file readable by the user alone (0600, like the session files), and
    tighten one that others can read: it holds every line the user typed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    mode = path.stat().st_mode
    if stat.S_ISREG(mode) and mode & 0o077:  # not /dev/null, say
        with contextlib.suppress(OSError):  # someone else's file: use it as it is
            path.chmod(0o600)


class LineReader(Protocol):
    """Where the REPL gets lines from."""

    async def read(self, prompt: str) -> str:
        """The next message; KeyboardInterrupt clears the line, EOFError ends the REPL."""
        ...

    async def ask(self, question: str) -> str:
        """A one-off answer (tool approval)."""
        ...

    def when_shown(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the next prompt is up (at once where there is none)."""
        ...


class PipeReader:
    """Lines from a pipe or file: no prompt, no editing; the end of input ends the REPL."""

    async def read(self, prompt: str) -> str:
        """The next line (without its newline)."""
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    async def ask(self, question: str) -> str:
        """No one to ask: an empty answer, which denies."""
        return ""

    def when_shown(self, callback: Callable[[], None]) -> None:
        """No prompt is shown: call ``callback`` now."""
        callback()


class TerminalReader:
    """prompt_toolkit input: history file, completion, multi-line editing, $EDITOR."""

    def __init__(self, commands: Mapping[str, Command], session_ids: list[str]) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        path = history_path()
        history: FileHistory | InMemoryHistory
        try:
            private_history(path)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()  # a read-only home must not stop the chat
        self._session: PromptSession[str] = PromptSession(
            history=history,
            completer=_completer(commands, session_ids),
            complete_while_typing=True,
            key_bindings=_key_bindings(),
            enable_open_in_editor=True,
            prompt_continuation=lambda width, line, wrap: "… ".rjust(width),
            tempfile_suffix=".md",
        )
        # built at the first question (tool approval, /clear's confirmation), not before the
        # first prompt: each PromptSession builds a whole application
        self._questions: PromptSession[str] | None = None
        self._when_shown: list[Callable[[], None]] = []

    def when_shown(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, right after the next prompt is on the screen."""
        if not self._when_shown:
            self._session.app.after_render += self._shown
        self._when_shown.append(callback)

    def _shown(self, _app: object) -> None:
        self._session.app.after_render -= self._shown
        callbacks, self._when_shown = self._when_shown, []
        for callback in callbacks:
            callback()

    async def read(self, prompt: str) -> str:
        """The next message; Enter sends, Esc+Enter adds a line, Ctrl-X Ctrl-E edits."""
        return await self._session.prompt_async([("bold ansigreen", prompt)])

    async def ask(self, question: str) -> str:
        """A short answer; the caller's SIGINT handler stays in place."""
        if self._questions is None:
            from prompt_toolkit import PromptSession

            self._questions = PromptSession()
        return await self._questions.prompt_async(question, handle_sigint=False)


def _key_bindings() -> KeyBindings:
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        # Enter sends; Esc+Enter (Alt+Enter) continues the message on a new line.
        event.current_buffer.insert_text("\n")

    return bindings


def _completer(commands: Mapping[str, Command], session_ids: list[str]) -> Completer:
    """Completes ``commands`` (by every name they answer to), and session ids after a
    command that takes one."""
    from prompt_toolkit.completion import Completer, Completion

    takes_session = {n for n, c in commands.items() if c.takes == "session"}

    class SlashCompleter(Completer):
        def get_completions(
            self, document: Document, complete_event: CompleteEvent
        ) -> Iterator[Completion]:
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                for name in sorted(commands):
                    if name.startswith(text):
                        yield Completion(name, start_position=-len(text))
                return
            command, _, argument = text.partition(" ")
            if command in takes_session:
                for sid in list(session_ids):
                    if sid.startswith(argument):
                        yield Completion(sid, start_position=-len(argument))

    return SlashCompleter()
