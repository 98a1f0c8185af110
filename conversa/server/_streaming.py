"""A turn streamed to a client (SSE or NDJSON); a client that goes away cancels the turn.

The turn runs in its own task and hands its events over a queue, so the response can watch
the connection while the turn waits on the model or a tool: the moment the client is gone,
the turn is cancelled through ``Session.cancel`` and ends as the library ends any cancelled
turn (its partial answer stored and marked interrupted, the history valid).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ._errors import describe

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from ..events import TurnEvent
    from ..session import Session

_END = object()
CANCEL_GRACE = 10.0
"""Seconds a cancelled turn may take to store its partial answer before it is abandoned."""


class TurnRun:
    """One turn running in its own task; its events (or its exception) come out of a queue."""

    def __init__(
        self,
        session: Session,
        events: AsyncGenerator[TurnEvent, None],
        *,
        release: Callable[[Session], None] | None = None,
    ) -> None:
        self.session = session
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
        self._pending: TurnEvent | None = None
        self._release = release
        self._cancelled = False
        self._task = asyncio.create_task(self._run(events))

    async def _run(self, events: AsyncGenerator[TurnEvent, None]) -> None:
        try:
            async with aclosing(events) as stream:
                async for event in stream:
                    await self._queue.put(event)
        except Exception as exc:
            await self._queue.put(exc)
        else:
            # the session goes back for the thread's next request only after a whole turn
            if self._release is not None and not self._cancelled:
                self._release(self.session)
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(_END)

    async def first(self) -> TurnEvent | None:
        """The first event (None: the turn ended without one); raises what the turn raised."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, Exception):
            raise item
        self._pending = item
        return self._pending

    async def events(self) -> AsyncIterator[TurnEvent | Exception]:
        """Every event after ``first``'s, and an exception the turn ended with."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            yield pending
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            yield item

    async def cancel(self) -> None:
        """Stop the turn and wait (boundedly) until it has stored what it had."""
        task = self._task
        if task.done():
            return
        self._cancelled = True
        # the turn itself runs: end it with its result; else it still waits for the lease or
        # the history and nothing is stored yet
        if not self.session.cancel():
            task.cancel()
        # drain, so a turn blocked on a full queue can finish
        drain = asyncio.create_task(self._drain())
        try:
            await asyncio.wait({task}, timeout=CANCEL_GRACE)
        finally:
            drain.cancel()
        if not task.done():
            task.cancel()

    async def _drain(self) -> None:
        while True:
            await self._queue.get()


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def ndjson(data: Any) -> bytes:
    """One NDJSON line."""
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


class EventStream(Response):
    """A streamed response that cancels its turn when the client disconnects."""

    def __init__(
        self,
        run: TurnRun,
        encode: Callable[[TurnEvent | Exception], AsyncIterator[bytes]],
        *,
        media_type: str,
        error: Callable[[str], bytes],
    ) -> None:
        super().__init__(media_type=media_type)
        self.run = run
        self.encode = encode
        self.error = error
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", self.media_type.encode()),  # type: ignore[union-attr]
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():  # the client went away first
                self.disconnected = True
                await self.run.cancel()
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump
        finally:
            watch.cancel()
            if not pump.done():
                pump.cancel()
                await self.run.cancel()

    async def _pump(self, send: Send) -> None:
        try:
            async for event in self.run.events():
                if isinstance(event, Exception):
                    await send(_body(self.error(describe(event)[1])))
                    break
                async for chunk in self.encode(event):
                    await send(_body(chunk))
        except OSError:
            await self.run.cancel()  # the connection broke under a write
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _body(chunk: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (the request body was read before the stream)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
