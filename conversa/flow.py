"""A session's flow, as falai keeps it: the current route and step, the routes visited, and the
data collected per route, stored with the session's info (``SessionInfo.flow``).

``session.flow`` is a Flow. Each change re-reads the stored position, applies itself and
stores the whole position in one atomic write (``storage.set_flow``), so it survives restarts
and ``find_sessions(route=...)`` and ``get_info`` see it without loading the history. The
messages a turn stores carry the route and step in their metadata (``stamp``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .errors import FlowError
from .storage._stored import NO_FLOW, RouteVisit, SessionFlow, SessionInfo, copy_json
from .storage.base import FLOW_HISTORY_LIMIT, check_flow_id, check_json

if TYPE_CHECKING:
    from .messages import ChatMessage
    from .storage import ConversationStorage

__all__ = [
    "ROUTE_METADATA_KEY",
    "STEP_METADATA_KEY",
    "CurrentRoute",
    "Flow",
    "RouteVisit",
    "SessionFlow",
    "info_lines",
]

ROUTE_METADATA_KEY = "route"
"""The metadata key of a message that names the route it was stored in (falai's ``route``)."""
STEP_METADATA_KEY = "step"
"""The metadata key of a message that names the step it was stored in (falai's ``step``)."""

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class CurrentRoute:
    """Where a flow is now: the route, the step in it (None: none yet) and since when."""

    route: str
    step: str | None
    entered_at: datetime
    step_entered_at: datetime | None


class Flow:
    """The flow position of one session: ``enter``, ``step``, ``complete`` and ``collect``.

    The reads (``current``, ``history``, ``data``) give the position as of the last change
    or ``reload`` (a Session reloads it before every turn). Each change is async and stored
    before it returns; two processes changing one session's flow at the same moment may lose
    one change (the last write wins), as with ``update_info``.
    """

    def __init__(
        self, storage: ConversationStorage, session_id: str, *, clock: Clock | None = None
    ) -> None:
        self.storage = storage
        self.session_id = session_id
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        self._position: SessionFlow = NO_FLOW
        self._lock = asyncio.Lock()

    # -- reading ----------------------------------------------------------------------

    @property
    def position(self) -> SessionFlow:
        """The whole position: current route and step, history and data."""
        return self._position

    @property
    def current(self) -> CurrentRoute | None:
        """The current route and step (None: in no route)."""
        p = self._position
        if p.route is None or p.entered_at is None:
            return None
        return CurrentRoute(p.route, p.step, p.entered_at, p.step_entered_at)

    @property
    def route(self) -> str | None:
        """The id of the current route (None: in no route)."""
        return self._position.route

    @property
    def history(self) -> tuple[RouteVisit, ...]:
        """Every route visited, oldest first (the newest FLOW_HISTORY_LIMIT)."""
        return self._position.history

    def data(self, route: str | None = None) -> dict[str, Any]:
        """A copy of the data collected in ``route`` (default: the current one; {} if none)."""
        name = self._position.route if route is None else route
        return copy_json(self._position.data.get(name, {})) if name is not None else {}

    async def reload(self) -> SessionFlow:
        """Read the stored position (changed by another process, say) and return it."""
        info = await self.storage.get_info(self.session_id)
        self.use(info.flow if info is not None else NO_FLOW)
        return self._position

    def use(self, position: SessionFlow) -> None:
        """Take ``position``, just read from storage, as the current one (``reload`` without
        its read)."""
        self._position = position

    # -- changing ---------------------------------------------------------------------

    async def enter(self, route: str, step: str | None = None) -> None:
        """Enter ``route`` (at ``step``), leaving the current route uncompleted.

        The data collected in ``route`` on an earlier visit is kept, as falai resumes it.
        """
        check_flow_id(route, "route")
        if step is not None:
            check_flow_id(step, "step")

        def change(p: SessionFlow, now: datetime) -> SessionFlow:
            visits = (*_closed(p, now, completed=False), RouteVisit(route, now))
            return SessionFlow(
                route=route,
                step=step,
                entered_at=now,
                step_entered_at=now if step is not None else None,
                history=visits[-FLOW_HISTORY_LIMIT:],
                data=p.data,
            )

        await self._change(change)

    async def step(self, step: str) -> None:
        """Move to ``step`` of the current route (FlowError if in no route)."""
        check_flow_id(step, "step")
        await self._change(
            lambda p, now: dataclasses.replace(_in_route(p, "step"), step=step, step_entered_at=now)
        )

    async def complete(self) -> None:
        """Mark the current route completed and leave it (FlowError if in no route)."""
        await self._change(lambda p, now: _left(_in_route(p, "complete"), now, completed=True))

    async def leave(self) -> None:
        """Leave the current route without completing it (FlowError if in no route)."""
        await self._change(lambda p, now: _left(_in_route(p, "leave"), now, completed=False))

    async def collect(self, values: Mapping[str, Any], *, route: str | None = None) -> None:
        """Merge ``values`` into the data of ``route`` (default: the current one), as falai's
        mergeCollected does."""
        await self._set_data(values, route, merge=True)

    async def set_data(self, values: Mapping[str, Any], *, route: str | None = None) -> None:
        """Replace the data of ``route`` (default: the current one); ``{}`` clears it."""
        await self._set_data(values, route, merge=False)

    async def reset(self) -> None:
        """Forget the whole flow: no current route, no history, no data."""
        await self._change(lambda p, now: NO_FLOW)

    async def _set_data(self, values: Mapping[str, Any], route: str | None, *, merge: bool) -> None:
        if not isinstance(values, Mapping) or not all(isinstance(k, str) for k in values):
            raise FlowError("collected data must be a dict with string keys")
        check_json(dict(values), "collected data")
        if route is not None:
            check_flow_id(route, "route")

        def change(p: SessionFlow, now: datetime) -> SessionFlow:
            name = route if route is not None else _in_route(p, "collect").route
            assert name is not None
            old = p.data.get(name, {}) if merge else {}
            return dataclasses.replace(p, data={**p.data, name: {**old, **copy_json(values)}})

        await self._change(change)

    async def _change(self, change: Callable[[SessionFlow, datetime], SessionFlow]) -> None:
        """Apply ``change`` to the stored position and store the result whole."""
        async with self._lock:
            current = await self.reload()
            new = change(current, self._clock())
            await self.storage.set_flow(self.session_id, new)
            self._position = new

    # -- the turn's messages ------------------------------------------------------------

    def stamp(self, messages: Sequence[ChatMessage]) -> Sequence[ChatMessage]:
        """``messages`` with the current route and step in their metadata (falai's message
        ``route`` and ``step``); a message that names a route or step of its own is left as
        it is. A Session's turn stores its messages through this."""
        p = self._position
        if p.route is None:
            return messages
        stamp: dict[str, Any] = {ROUTE_METADATA_KEY: p.route}
        if p.step is not None:
            stamp[STEP_METADATA_KEY] = p.step
        return [m if _names_its_own(m) else _stamped(m, stamp) for m in messages]


def _names_its_own(message: ChatMessage) -> bool:
    meta = message.metadata
    return ROUTE_METADATA_KEY in meta or STEP_METADATA_KEY in meta


def _stamped(message: ChatMessage, stamp: dict[str, Any]) -> ChatMessage:
    return message.replace(metadata={**message.metadata, **stamp})


def _in_route(p: SessionFlow, doing: str) -> SessionFlow:
    if p.route is None:
        raise FlowError(f"cannot {doing}: the flow is in no route; enter one first")
    return p


def _closed(p: SessionFlow, now: datetime, *, completed: bool) -> tuple[RouteVisit, ...]:
    """The history with the open visit of the current route closed at ``now``."""
    visits = list(p.history)
    if p.route is not None:
        for i in range(len(visits) - 1, -1, -1):
            if visits[i].route == p.route and visits[i].exited_at is None:
                visits[i] = dataclasses.replace(visits[i], exited_at=now, completed=completed)
                break
    return tuple(visits)


def _left(p: SessionFlow, now: datetime, *, completed: bool) -> SessionFlow:
    return SessionFlow(history=_closed(p, now, completed=completed), data=p.data)


# -- showing it -------------------------------------------------------------------------------

_SHOWN_VISITS = 8
_SHOWN_DATA = 200


def info_lines(info: SessionInfo) -> Iterator[str]:
    """Lines for ``conversa sessions show``: the status when not active, and the flow."""
    if info.status != "active":
        when = f" at {info.completed_at:%Y-%m-%d %H:%M} UTC" if info.completed_at else ""
        yield f"status: {info.status}{when}"
    flow = info.flow
    if flow.route is None and not flow.history and not flow.data:
        return
    if flow.route is not None and flow.entered_at is not None:
        step = f", step {flow.step!r}" if flow.step is not None else ""
        yield f"flow: route {flow.route!r}{step} (entered {flow.entered_at:%Y-%m-%d %H:%M} UTC)"
    else:
        yield "flow: in no route"
    if flow.history:
        shown = [_visit_text(v) for v in flow.history[-_SHOWN_VISITS:]]
        earlier = len(flow.history) - len(shown)
        yield "routes: " + (f"… {earlier} earlier, " if earlier else "") + ", ".join(shown)
    if flow.data:
        text = json.dumps(flow.data, ensure_ascii=False)
        yield "collected: " + (text if len(text) <= _SHOWN_DATA else text[: _SHOWN_DATA - 1] + "…")


def _visit_text(visit: RouteVisit) -> str:
    if visit.exited_at is None:
        return f"{visit.route} (current)"
    return f"{visit.route} ({'completed' if visit.completed else 'left'})"
