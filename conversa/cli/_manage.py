"""What the management commands share: opening the storage, output, existence checks."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TextIO, TypeVar

import click

from ._options import storage_url

if TYPE_CHECKING:
    from ..storage import ConversationStorage
    from ._output import Output

T = TypeVar("T")


def with_storage(
    ctx: click.Context, storage: str | None, work: Callable[[ConversationStorage], Awaitable[T]]
) -> T:
    """Open the storage, run ``work`` on it, close it; errors and warnings become one line."""
    from ._runner import run

    url = storage_url(ctx, storage)

    async def main() -> T:
        from ..storage import open_storage

        store = open_storage(url)
        try:
            return await work(store)
        finally:
            await store.close()

    with warnings.catch_warnings():
        # The storage's warnings (a damaged session left out of a listing, a torn last line)
        # are for the user: one line each on stderr, not Python's file:line form.
        warnings.showwarning = _warning_line
        return run(ctx, main)


def _warning_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    click.echo(f"warning: {message}", err=True)


def output() -> Output:
    """Rich output on a terminal, plain text otherwise."""
    from ._output import make_output

    return make_output(sys.stdout.isatty())


async def require(store: ConversationStorage, session_id: str) -> None:
    """Fail with a hint unless the session exists."""
    if not await store.exists(session_id):
        from ._runner import fail

        fail(f"there is no session {session_id!r}; `conversa sessions list` shows them")
