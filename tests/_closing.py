"""What a test opened and must close on its own event loop: sessions and models.

A module that uses ``opened`` marks its tests with ``pytest.mark.usefixtures("close_opened")``
(the fixture is in conftest.py), so nothing, a storage thread or a connection pool, outlives
the test's event loop.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")
_opened: list[Any] = []


def opened(thing: T) -> T:
    """``thing`` (a Session, an OpenAIChatModel), closed when the test ends."""
    _opened.append(thing)
    return thing


async def close_all() -> None:
    """Close everything ``opened`` holds, newest first."""
    while _opened:
        thing = _opened.pop()
        await (thing.aclose() if hasattr(thing, "aclose") else thing.close())
