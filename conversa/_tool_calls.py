"""Running one tool call: its arguments parsed once, its approval, the run, and its result.

A result is stored with the sync state changes its tool made, in one write with a journal of
the result, so that a crash between the two writes loses neither (see
``restore_journaled_result``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidMessage, ToolError
from .events import Approver, maybe_await
from .messages import ChatMessage, ToolCall
from .state import JOURNAL_KEY, SessionState, StateChanges
from .text_protocol import json_value

if TYPE_CHECKING:
    from .tools import Tool, ToolRegistry
    from .transcript import Transcript

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Action:
    """One tool call, its arguments parsed once, and the error to answer it with if it can't run."""

    call: ToolCall
    tool: Tool | None
    arguments: dict[str, Any] | None
    error: str | None

    @property
    def action_input(self) -> dict[str, Any] | str:
        """The arguments as the turn's steps report them: parsed, else the text as sent."""
        return self.arguments if self.arguments is not None else self.call.arguments


def prepare(
    tools: ToolRegistry, call: ToolCall, arguments: Any, problem: str | None = None
) -> Action:
    """The call ready to run; ``arguments`` parsed (or the ValueError that parsing raised)."""
    args = arguments if isinstance(arguments, dict) else None
    tool = None if problem is not None else tools.get(call.name)
    if tool is None:
        names = ", ".join(tools.names()) or "none"
        problem = problem or f"there is no tool named {call.name!r}"
        return Action(call, None, args, f"Error: {problem}. Available tools: {names}.")
    if isinstance(arguments, ValueError):
        error = f"Error: the arguments for {call.name} are not valid JSON ({arguments})."
        return Action(call, tool, None, error)
    if args is None:
        error = f"Error: the arguments for {call.name} must be a JSON object."
        return Action(call, tool, None, error)
    return Action(call, tool, args, None)


def parse_arguments(call: ToolCall) -> Any:
    """The call's arguments decoded, or the ValueError that says why they are not JSON."""
    try:
        return json_value(call.arguments or "{}")
    except ValueError as exc:
        return exc


Outcome = tuple[str, bool, StateChanges | None]
"""A call's output, whether it succeeded, and the sync state changes it made."""


async def approved(action: Action, approve: Approver | None) -> bool:
    """Whether the call may run: asked of ``approve`` if its tool requires approval."""
    if action.tool is None or action.arguments is None or not action.tool.requires_approval:
        return True  # a call that cannot run is answered with its error, not asked about
    if approve is None:
        return False
    try:
        return bool(await maybe_await(approve(action.call.name, action.arguments)))
    except Exception:
        log.warning("the approve callback failed for %s; treating it as denied", action.call.name)
        return False


def denied(call: ToolCall) -> str:
    """The observation of a call the user did not approve."""
    return (
        f"The user did not approve running {call.name}. Do not call it again for this request; "
        "continue without it or ask the user."
    )


async def execute(action: Action, *, state: SessionState | None, context: Any) -> Outcome:
    """Run one approved call; every failure (or the call's own error) is an observation.

    The sync state changes the tool makes are collected (the tool's thread sees them, as it
    runs in a copy of this context) and returned, to be stored with its result; a tool that
    fails has them dropped.
    """
    if action.error is not None:
        return action.error, False, None
    if state is None:
        output, ok = await _run_tool(action, context)
        return output, ok, None
    (output, ok), changes = await state.collecting(lambda: _run_tool(action, context))
    if not ok:
        state.discard(changes)
    return output, ok, changes


async def _run_tool(action: Action, context: Any) -> tuple[str, bool]:
    assert action.tool is not None and action.arguments is not None  # no error: it can run
    try:
        return await action.tool.run(action.arguments, session=context), True
    except ToolError as exc:
        return f"Error: {exc}", False
    except Exception as exc:
        return f"Error: {action.call.name} failed: {type(exc).__name__}: {exc}", False


async def store_result(
    transcript: Transcript,
    state: SessionState | None,
    result: ChatMessage,
    changes: StateChanges | None,
) -> bool:
    """Store a tool's result, its sync state changes first, in one write with a journal of
    the result: a crash between the two writes leaves the journal, and the next turn stores
    the result from it (``restore_journaled_result``). True if a journal was written.
    """
    journaled = state is not None and changes is not None and bool(changes)
    if state is not None and changes is not None:
        newest = transcript.messages[-1].id if transcript.messages else None
        journal = {"after": newest, "message": result.to_dict()} if journaled else None
        await state.commit(changes, journal=journal)
    await transcript.append([result])
    return journaled


async def restore_journaled_result(transcript: Transcript, state: SessionState) -> None:
    """Store the result whose state changes a crash kept from being followed by it.

    Called before the next turn answers dangling calls: the journal names the message the
    result came after; if that is still the newest and the result answers one of its calls
    (or, for the text protocol, follows its reply), the result is stored as it was meant to
    be. The journal is removed either way.
    """
    journal = state.get(JOURNAL_KEY)
    if journal is None:
        return
    message = _journaled(journal)
    newest = transcript.messages[-1] if transcript.messages else None
    if message is not None and newest is not None and journal.get("after") == newest.id:
        if message.role == "tool":
            waiting = {m.tool_call_id for m in transcript.cache.dangling()}
            fits = message.tool_call_id in waiting
        else:
            fits = newest.role == "assistant" and not newest.tool_calls
        if fits:
            await transcript.append([message])
    await state.delete(JOURNAL_KEY)


def _journaled(journal: Any) -> ChatMessage | None:
    """The message of a journal, or None if it is not one (the state is anyone's to edit)."""
    if not isinstance(journal, dict) or not isinstance(journal.get("message"), dict):
        return None
    try:
        # built again through __init__ (replace): the full checks of a new message; a result
        # has no name or tool calls of its own
        message = ChatMessage.from_dict(journal["message"])
        return message.replace(name=None, tool_calls=())
    except (InvalidMessage, TypeError, ValueError):
        log.warning("ignoring a tool-result journal that is not a valid message")
        return None
