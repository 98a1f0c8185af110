"""Running a command's coroutine: errors become one readable line, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

import click

from .._redact import redact_text
from ._format import terminal_text
from ._options import is_debug

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def describe(exc: BaseException) -> str:
    """One line (or the library's own explanation) saying what went wrong and what to do."""
    return shown(_describe(exc))


def _describe(exc: BaseException) -> str:
    from ..errors import ConversaError

    if isinstance(exc, ConversaError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    if isinstance(exc, (ValueError, OSError)):
        return str(exc) or type(exc).__name__
    return (
        f"unexpected {type(exc).__name__}: {exc} "
        "(run again with --debug to see the traceback, and please report it)"
    )


def shown(text: str) -> str:
    """``text`` fit for the terminal: credentials hidden, control characters escaped."""
    return terminal_text(redact_text(text, [os.environ.get("OPENAI_API_KEY")]))


def print_traceback(exc: BaseException) -> None:
    """The traceback of ``exc`` and of the exceptions it chains, on stderr (for --debug)."""
    sys.stderr.write(shown("".join(traceback.format_exception(exc))))
    sys.stderr.flush()


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 1."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILURE)


def report(exc: BaseException, debug: bool) -> None:
    """Print an exception as one line on stderr (after its traceback with --debug)."""
    if debug:
        print_traceback(exc)
    click.echo(f"error: {describe(exc)}", err=True)


def run(ctx: click.Context, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` in a fresh event loop; report failures and exit non-zero."""
    try:
        with warnings_as_lines():
            return asyncio.run(main())
    except (click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        report(exc, is_debug(ctx))
        sys.exit(EXIT_FAILURE)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show warnings (Python's and those conversa logs) as one ``warning: ...`` line each, and
    each text once, rather than as a source path and a line of code."""
    seen: set[str] = set()

    def show(text: str) -> None:
        line = " ".join(shown(text).split())
        if line not in seen:
            seen.add(line)
            click.echo(f"warning: {line}", err=True)

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            show(record.getMessage())

    def show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        show(str(message))

    logger = logging.getLogger("conversa")
    handler = Lines(logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            yield
    finally:
        logger.removeHandler(handler)
