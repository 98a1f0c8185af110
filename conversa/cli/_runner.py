"""Running a command's coroutine: errors become one readable line, never a traceback."""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click

from ._options import is_debug

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def describe(exc: BaseException) -> str:
    """One line (or the library's own explanation) saying what went wrong and what to do."""
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


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 1."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILURE)


def report(exc: BaseException, debug: bool) -> None:
    """Print an exception as one line on stderr (after its traceback with --debug)."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {describe(exc)}", err=True)


def run(ctx: click.Context, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` in a fresh event loop; report failures and exit non-zero."""
    try:
        return asyncio.run(main())
    except (click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        report(exc, is_debug(ctx))
        sys.exit(EXIT_FAILURE)
