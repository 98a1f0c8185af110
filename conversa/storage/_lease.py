"""The session lease: the pieces every backend's ``_lease`` is built from.

A lease is taken in two steps: first an asyncio lock per session in the storage object, so
that the turns of one process queue up in order without polling; then, on the backends shared
by several processes, the cross-process lock (an OS file lock, a Redis key, a PostgreSQL
advisory lock), tried without blocking and polled with a growing pause until the deadline.
Polling keeps every wait cancellable (Ctrl-C, a cancelled turn) and never leaves a blocked
call behind in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SessionBusy, StorageError

DEFAULT_WAIT = 30.0
"""Seconds ``lease()`` waits for another holder by default."""
_FIRST_PAUSE = 0.002
_LONGEST_PAUSE = 0.05
"""The longest pause between two tries of a cross-process lock (the latency of a hand-over)."""


@dataclass(frozen=True, slots=True)
class Waiting:
    """How long a ``lease()`` call may wait, as its hooks receive it."""

    session_id: str
    wait: float | None
    """Seconds (>= 0) as given, or None for no limit."""
    until: float | None
    """The deadline on the monotonic clock, or None."""

    @classmethod
    def start(cls, session_id: str, wait: float | None) -> Waiting:
        """A wait of ``wait`` seconds (None: no limit) from now."""
        return cls(session_id, wait, None if wait is None else time.monotonic() + wait)

    def left(self) -> float | None:
        """Seconds left until the deadline (0 when it has passed), or None for no limit."""
        return None if self.until is None else max(0.0, self.until - time.monotonic())

    def busy(self) -> SessionBusy:
        """The error to raise once the deadline passed."""
        waited = f" (waited {self.wait:g} s)" if self.wait else ""
        return SessionBusy(
            f"session {self.session_id!r} is in use elsewhere: another turn, in this or "
            f"another process, holds its lease{waited}; try again when it has finished"
        )


def check_wait(wait: float | None) -> float | None:
    """``wait`` if it is None or a number of seconds >= 0; ValueError otherwise."""
    if wait is None:
        return None
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
        raise ValueError(f"wait must be a number of seconds >= 0 or None, not {wait!r}")
    return float(wait)


def check_ttl(ttl: float | None) -> float | None:
    """``ttl`` if it is None or a positive number of seconds; ValueError otherwise."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
    return float(ttl)


@contextlib.asynccontextmanager
async def local_lease(storage: object, waiting: Waiting) -> AsyncIterator[None]:
    """Hold the session's asyncio lock in ``storage`` (exclusive within this process only)."""
    locks: dict[str, list[Any]] = storage.__dict__.setdefault("_conversa_leases", {})
    sid = waiting.session_id
    entry = locks.get(sid)
    if entry is None:
        entry = locks[sid] = [asyncio.Lock(), 0]
    lock: asyncio.Lock = entry[0]
    entry[1] += 1  # users; the entry goes with the last, so idle sessions cost nothing
    try:
        if lock.locked():
            try:
                async with asyncio.timeout(waiting.left()):
                    await lock.acquire()
            except TimeoutError as exc:
                raise waiting.busy() from exc
        else:
            await lock.acquire()  # free: returns at once
        try:
            yield
        finally:
            lock.release()
    finally:
        entry[1] -= 1
        if not entry[1]:
            del locks[sid]


async def poll(take: Callable[[], Awaitable[bool]], waiting: Waiting) -> None:
    """Call ``take()`` until it returns True, pausing ever longer; SessionBusy at the deadline."""
    pause = _FIRST_PAUSE
    while not await take():
        left = waiting.left()
        if left == 0:
            raise waiting.busy()
        await asyncio.sleep(pause if left is None else min(pause, left))
        pause = min(pause * 2, _LONGEST_PAUSE)


def _make_private_dirs(directory: str) -> None:
    """Create ``directory`` and its missing parents, each with mode 0700."""
    missing: list[str] = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for d in reversed(missing):
        os.makedirs(d, mode=0o700, exist_ok=True)


def _open_lock_file(path: str) -> int:
    """Open (creating it and its directory, mode 0700/0600) the lock file at ``path``."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            _make_private_dirs(os.path.dirname(path))
            return os.open(path, flags, 0o600)
    except OSError as exc:
        raise StorageError(
            f"cannot open the session lease file {path}: {exc.strerror or exc}; check that "
            "its directory is writable by this user"
        ) from exc


@contextlib.asynccontextmanager
async def file_lease(path: str, waiting: Waiting) -> AsyncIterator[None]:
    """Hold ``flock(LOCK_EX)`` on the lock file at ``path``; the kernel drops it if we die.

    Lock files are never removed: unlinking one while another process waits on it would let
    two holders lock two different files.
    """
    fd = _open_lock_file(path)
    try:

        async def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        await poll(take, waiting)
        yield  # closing the descriptor releases the lock
    finally:
        os.close(fd)
