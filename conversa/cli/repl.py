"""The chat REPL: read a line, run a slash command or a turn, show the answer; repeat."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from ._factory import AgentOptions, model_spec, open_session
from ._format import approval_question, plural
from ._turn import explain_failure, report_error, show_events

if TYPE_CHECKING:
    from ..events import AgentResult, TurnEvent
    from ..messages import ChatMessage
    from ..model import ChatModel, RetryNotice
    from ..session import Session
    from ..storage import ConversationStorage
    from ..tools import Tool
    from ._input import LineReader
    from ._output import Output, TurnView

APPROVAL_ANSWERS = {"y": True, "yes": True, "n": False, "no": False, "a": None, "always": None}
WAITING_NOTE_AFTER = 1.0
"""Seconds a turn waits for the session's lease before the REPL says so."""
YES_NO = {"y": True, "yes": True, "n": False, "no": False}


class Repl:
    """One chat: the current session, how input is read and output shown, and its commands."""

    session: Session

    def __init__(
        self,
        storage: ConversationStorage,
        options: AgentOptions,
        tools: list[Tool],
        out: Output,
        reader: LineReader,
        *,
        session_ids: list[str] | None = None,
        debug: bool = False,
    ) -> None:
        self.storage = storage
        self.options = options
        self.tools = tools
        self.out = out
        self.reader = reader
        self.debug = debug
        self.model_name: str | None = None
        self.model: ChatModel | None = None
        """The resolved model; None until a message (or /model) needed it."""
        self.always_approved: set[str] = set()
        self.session_ids: list[str] = session_ids if session_ids is not None else []
        """The ids completion offers; updated in place, the input reader holds the same list."""
        self.cleared: list[ChatMessage] | None = None
        """What /clear deleted, until a message is sent or the session left (/undo restores)."""
        self.failed_turns = 0
        """Turns that ended in an error; piped chat exits non-zero when there were any."""
        self._view: TurnView | None = None
        self._turn_task: asyncio.Task[AgentResult | None] | None = None

    # -- sessions -------------------------------------------------------------------------

    async def open(self, session_id: str, *, first: bool = False) -> None:
        """Make ``session_id`` the current session (creating it) and say what it holds."""
        session, model = await open_session(
            session_id,
            self.storage,
            self.options,
            tools=self.tools,
            approve=self.approve,
            override=first,
        )
        await self.close_model()
        self.session = session
        self.model_name = model
        self.cleared = None
        count = session.message_count()
        if count:
            self.out.note(f"resumed {session_id}: {plural(count, 'message')}")
        else:
            self.out.note(f"new session {session_id}")
        if session.system_prompt:
            self.out.note(f"system prompt: {session.system_prompt}")
        await self.refresh_session_ids()

    async def refresh_session_ids(self) -> None:
        """Re-read the session ids that completion offers."""
        try:
            self.session_ids[:] = await self.storage.list_sessions()
        except Exception:  # completion is a convenience; it must never break the chat
            self.session_ids.clear()

    # -- the model ------------------------------------------------------------------------

    def ensure_model(self) -> bool:
        """Resolve the model, or explain how to configure one; True when there is one."""
        from ..errors import ModelNotConfigured

        if self.model is not None:
            return True
        from ..model import OpenAIChatModel

        try:
            self.session.model = model_spec(self.model_name, self.options.base_url)
            self.model = self.session.model  # resolving is what raises ModelNotConfigured
        except ModelNotConfigured as exc:
            self.out.warn(str(exc))
            self.out.note("until then /help, /history and /sessions still work")
            return False
        if isinstance(self.model, OpenAIChatModel):
            self.model.on_retry = self._retrying
        return True

    def _retrying(self, notice: RetryNotice) -> None:
        """Say why the answer is late instead of retrying silently behind the spinner."""
        view = self._view
        if view is not None:
            view.pause()
        self.out.warn(
            f"{notice.reason}, retrying in {notice.delay:.2g} s "
            f"(retry {notice.attempt} of {notice.retries})"
        )
        if view is not None:
            view.resume()

    async def close_model(self) -> None:
        """Release the HTTP connections of the model in use; the next message resolves anew."""
        model, self.model = self.model, None
        aclose = getattr(model, "aclose", None)
        if aclose is not None:
            await aclose()

    def model_label(self) -> str:
        """The model in use, e.g. "gpt-4o-mini via https://api.openai.com/v1"."""
        if self.model is None:
            return self.model_name or "(not configured)"
        return str(getattr(self.model, "description", None) or self.model.name)

    async def set_model(self, name: str) -> None:
        """Use ``name`` from the next message on (resolved then, by ensure_model)."""
        await self.close_model()
        self.model_name = name

    # -- turns ----------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        """Send one user message and show the answer as it streams."""
        self.cleared = None  # /undo now means this message
        if self.ensure_model():
            await self.run_turn(self.session.stream_message(text))
        else:
            self.failed_turns += 1

    async def run_turn(self, events: AsyncGenerator[TurnEvent, None]) -> AgentResult | None:
        """Show a turn's events; Ctrl-C cancels just this turn (the library keeps the partial
        answer, marked interrupted, and a valid history)."""
        view = self._view = self.out.turn()
        task = self._turn_task = asyncio.create_task(show_events(events, view))
        restore = self._catch_sigint()
        note = asyncio.get_running_loop().call_later(WAITING_NOTE_AFTER, self._say_waiting)
        try:
            result = await task
        except asyncio.CancelledError:
            view.close(interrupted=True)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the REPL itself is being stopped
            return None
        except Exception as exc:
            view.close()
            self.failed_turns += 1
            self.report(exc)
            return None
        finally:
            note.cancel()
            restore()
            self._view = self._turn_task = None
        view.close()
        if result is not None and not result.success:
            self.failed_turns += 1
            explain_failure(self.out, result, debug=self.debug)
        return result

    def _say_waiting(self) -> None:
        """Say why the turn has not started: another process's turn holds the session."""
        view = self._view
        if view is None or not self.session.waiting_for_lease:
            return
        view.pause()
        self.out.note(
            f"waiting for session {self.session.session_id} (in use by another process); "
            "Ctrl-C stops waiting"
        )
        view.resume()

    def interrupt(self) -> None:
        """Cancel the running turn (Ctrl-C)."""
        if self._turn_task is not None and not self._turn_task.done():
            self._turn_task.cancel()

    def _catch_sigint(self) -> Any:
        """While a turn runs, Ctrl-C cancels it instead of ending the program."""
        if not self.out.interactive:
            return lambda: None
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGINT)
        try:
            loop.add_signal_handler(signal.SIGINT, self.interrupt)
        except (NotImplementedError, RuntimeError, ValueError):
            return lambda: None

        def restore() -> None:
            loop.remove_signal_handler(signal.SIGINT)
            # remove_signal_handler installs Python's default; put back what was there
            signal.signal(signal.SIGINT, previous)

        return restore

    async def approve(self, name: str, arguments: dict[str, Any]) -> bool:
        """Ask before a tool that needs approval runs: y, n or always (for this tool)."""
        if name in self.always_approved:
            return True
        if not self.out.interactive:
            self.out.warn(f"{name} needs approval and there is no terminal to ask; not run")
            return False
        view = self._view
        if view is not None:
            view.pause()
        try:
            while True:
                question = approval_question(name, arguments)
                answer = await self.reader.ask(f"{question} [y/n/always] ")
                choice = APPROVAL_ANSWERS.get(answer.strip().lower(), "ask again")
                if choice is None:
                    self.always_approved.add(name)
                    return True
                if isinstance(choice, bool):
                    return choice
        except (KeyboardInterrupt, EOFError):
            self.interrupt()  # Ctrl-C at the question cancels the turn, as during a tool
            return False
        finally:
            if view is not None:
                view.resume()

    async def confirm(self, question: str, *, forced: bool, force: str) -> bool:
        """Ask ``question`` (y/n) before something that deletes or overwrites.

        ``forced`` (the command's ``force`` option was given) answers yes. Without a
        terminal no one can answer, so it is refused with a word on how to force it.
        """
        if forced:
            return True
        if not self.out.interactive:
            self.out.error(f"{question} there is no terminal to answer; add {force} to go ahead")
            return False
        try:
            while True:
                answer = await self.reader.ask(f"{question} [y/n] ")
                choice = YES_NO.get(answer.strip().lower())
                if choice is not None:
                    return choice
        except (KeyboardInterrupt, EOFError):
            return False

    # -- the loop -------------------------------------------------------------------------

    def report(self, exc: BaseException) -> None:
        """Show an error in one line (with its traceback under --debug)."""
        report_error(self.out, exc, debug=self.debug)

    async def handle(self, line: str) -> bool:
        """Act on one input line; False ends the REPL."""
        from .commands import dispatch

        stripped = line.strip()
        if not stripped:
            return True
        if stripped.startswith("//"):  # an escaped slash: a message that starts with "/"
            await self.send(stripped[1:])
            return True
        if stripped.startswith("/"):
            try:
                return await dispatch(self, stripped)
            except Exception as exc:
                self.report(exc)
                return True
        try:
            await self.send(line)
        except Exception as exc:
            self.report(exc)
        return True

    async def run(self) -> None:
        """Read and act until /exit, Ctrl-D or the end of piped input."""
        # once the prompt is up (not competing with it for the interpreter), import what the
        # first answer needs while the user types it: the SDK, the terminal renderer
        preload = [*self.out.preload, *(["openai"] if self.model is not None else [])]
        self.reader.when_shown(lambda: _import_in_background(preload))
        while True:
            try:
                line = await self.reader.read(f"{self.session.session_id}> ")
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            if not await self.handle(line):
                break
        await self.close_model()


def _import_in_background(modules: Sequence[str]) -> None:
    """Start importing ``modules`` in a thread, while the user types the first message."""
    import threading

    missing = [m for m in modules if m not in sys.modules]
    if missing:
        # daemon: an import still running must not keep the process alive at exit
        threading.Thread(target=_import_all, args=(missing,), daemon=True).start()


def _import_all(modules: Sequence[str]) -> None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return  # the import where the module is used says what is wrong, in its place
