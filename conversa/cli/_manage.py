"""What the management commands share: opening the storage, output, existence checks."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import click

from ._options import storage_url

if TYPE_CHECKING:
    from ..storage import ConversationStorage
    from ._output import Output

T = TypeVar("T")


def with_storage(
    ctx: click.Context, storage: str | None, work: Callable[[ConversationStorage], Awaitable[T]]
) -> T:
    """Open the storage, run ``work`` on it, close it; errors and warnings become one line
    (``run`` shows the storage's warnings, such as a damaged session left out, as lines)."""
    from ._runner import run

    url = storage_url(ctx, storage)

    async def main() -> T:
        from ..storage import open_storage

        store = open_storage(url)
        try:
            return await work(store)
        finally:
            await store.close()

    return run(ctx, main)


def output() -> Output:
    """Rich output on a terminal, plain text otherwise."""
    from ._output import make_output

    return make_output(sys.stdout.isatty())


async def require(store: ConversationStorage, session_id: str) -> None:
    """Fail with a hint unless the session exists."""
    if not await store.exists(session_id):
        from ._runner import fail

        fail(f"there is no session {session_id!r}; `conversa sessions list` shows them")
