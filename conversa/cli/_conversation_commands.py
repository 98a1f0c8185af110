"""Slash commands about the current conversation: history, undo, model, prompt, export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._factory import MODEL_KEY, SYSTEM_KEY
from ._format import plural, role_counts, tokens_used
from .commands import command

if TYPE_CHECKING:
    from .repl import Repl

DEFAULT_HISTORY = 10


@command("/clear", "delete every message of this session (its state stays)")
async def _clear(repl: Repl, argument: str) -> None:
    count = repl.session.message_count()
    await repl.session.clear_history()
    repl.out.note(f"cleared {plural(count, 'message')} from {repl.session.session_id}")


@command("/count", "messages by role, and the tokens used in this session")
async def _count(repl: Repl, argument: str) -> None:
    await repl.session.refresh()
    history = repl.session.history
    counts = role_counts(history)
    roles = ", ".join(f"{role} {n}" for role, n in sorted(counts.items()))
    prompt, completion = tokens_used(history)
    repl.out.info(plural(len(history), "message") + (f" ({roles})" if roles else ""))
    repl.out.info(f"tokens used: {prompt + completion} (prompt {prompt}, completion {completion})")


@command("/history", "show the last N messages (default 10)")
async def _history(repl: Repl, argument: str) -> None:
    try:
        n = int(argument) if argument else DEFAULT_HISTORY
    except ValueError:
        repl.out.error(f"/history takes a number of messages, not {argument!r}")
        return
    await repl.session.refresh()
    history = repl.session.history
    start = max(0, len(history) - max(n, 0))
    if not history:
        repl.out.note("no messages yet")
    repl.out.transcript(history[start:], start)


@command("/undo", "remove your last message and the answer to it")
async def _undo(repl: Repl, argument: str) -> None:
    removed = await repl.session.undo()
    if not removed:
        repl.out.note("nothing to undo")
        return
    repl.out.note(
        f"removed {plural(len(removed), 'message')}: {removed[0].text[:60]!r} and its answer"
    )


@command("/retry", "answer your last message again")
async def _retry(repl: Repl, argument: str) -> None:
    if repl.ensure_model():
        await repl.run_turn(repl.session.stream_retry())


@command("/tools", "the tools the model may call")
async def _tools(repl: Repl, argument: str) -> None:
    from ..tools import builtin_tools

    tools = list(repl.session.tools)
    if tools:
        rows = [
            [t.name, "asks first" if t.requires_approval else "", t.description or ""]
            for t in tools
        ]
        repl.out.table(["tool", "approval", "description"], rows)
    else:
        repl.out.note("no tools enabled")
    repl.out.note(
        f"built-in: {', '.join(builtin_tools())} (enable with: conversa chat --tools NAMES)"
    )


@command("/model", "show the model, or switch to model NAME")
async def _model(repl: Repl, argument: str) -> None:
    if not argument:
        repl.ensure_model()
        repl.out.info(f"model: {repl.model_label()}")
        return
    await repl.set_model(argument)
    await repl.session.state.set(MODEL_KEY, argument)
    if repl.ensure_model():
        repl.out.note(f"model: {repl.model_label()}")


@command("/system", "show the system prompt, set it to TEXT, or /system --clear")
async def _system(repl: Repl, argument: str) -> None:
    session = repl.session
    if not argument:
        repl.out.info(session.system_prompt or "(no system prompt)")
        return
    if argument == "--clear":
        session.system_prompt = None
        await session.state.delete(SYSTEM_KEY)
        repl.out.note("system prompt cleared")
        return
    session.system_prompt = argument
    await session.state.set(SYSTEM_KEY, argument)  # kept with the session for next time
    repl.out.note("system prompt set")


@command("/state", "show the session's key-value state")
async def _state(repl: Repl, argument: str) -> None:
    await repl.session.state.reload()
    values = repl.session.state.to_dict()
    if values:
        repl.out.data(values)
    else:
        repl.out.note("the state is empty")


@command("/export", "write this session to FILE (.md or .json; default ID.md)")
async def _export(repl: Repl, argument: str) -> None:
    from ._export import format_for, to_json, to_markdown, write_private

    session = repl.session
    await session.refresh()
    path = Path(argument or f"{session.session_id}.md").expanduser()
    if format_for(str(path)) == "json":
        info = await repl.storage.get_info(session.session_id)
        state = dict(session.state.items(internal=True))
        text = to_json(session.session_id, session.history, info, state)
    else:
        text = to_markdown(session.session_id, session.history, session.system_prompt)
    write_private(path, text)
    repl.out.note(f"exported {plural(session.message_count(), 'message')} to {path}")
