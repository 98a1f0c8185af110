"""Showing one turn: its events in a TurnView, then what went wrong, if anything."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from ._runner import describe, print_traceback

if TYPE_CHECKING:
    from ..events import AgentResult, TurnEvent
    from ._output import Output, TurnView


async def show_events(
    events: AsyncGenerator[TurnEvent, None], view: TurnView
) -> AgentResult | None:
    """Show every event of a turn in ``view``; the turn's result (None if it sent none)."""
    from contextlib import aclosing

    from ..events import TurnDone

    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, TurnDone):
                return event.result
            view.event(event)
    return None


def report_error(out: Output, exc: BaseException, *, debug: bool) -> None:
    """Show an error in one line (with its traceback under --debug)."""
    if debug:
        print_traceback(exc)
    out.error(describe(exc))


def explain_failure(out: Output, result: AgentResult, *, debug: bool) -> None:
    """Say why a turn that ended did not succeed, and what the user can do."""
    if result.stop_reason == "max_iterations":
        out.warn(
            f"stopped after {result.iterations} model calls (the limit); "
            "send another message to continue or raise --max-iterations"
        )
        return
    if debug and result.exception is not None:
        print_traceback(result.exception)
    out.error(result.error or f"the turn failed ({result.stop_reason})")
