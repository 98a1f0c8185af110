"""Slash commands about the current conversation: history, undo, model, prompt, export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._factory import MODEL_KEY, SYSTEM_KEY
from ._format import plural, role_counts, status_text, tokens_used, usage_text
from .commands import Argument, command

if TYPE_CHECKING:
    from ..messages import ChatMessage
    from ..session import Session
    from .repl import Repl

DEFAULT_HISTORY = 10
EXPORT_FORMATS = {".md": "md", ".markdown": "md", ".json": "json"}
"""The formats /export writes, by the file's extension."""


@command(
    "/clear [--yes]",
    "delete every message of this session, after asking (/undo brings them back)",
    flags=("--yes",),
)
async def _clear(repl: Repl, argument: Argument) -> None:
    session = repl.session
    messages = await session.load_history()
    if not messages:
        repl.out.note("no messages to clear")
        return
    question = f"delete all {plural(len(messages), 'message')} of {session.session_id}?"
    if not await repl.confirm(question, forced="--yes" in argument.flags, force="--yes"):
        repl.out.note("nothing deleted")
        return
    await session.clear_history()
    repl.cleared = messages
    repl.out.note(
        f"cleared {plural(len(messages), 'message')} from {session.session_id}; "
        "/undo brings them back (until you send a message or leave this session)"
    )


@command("/count", "messages by role, and the tokens used in this session")
async def _count(repl: Repl, argument: Argument) -> None:
    history = await repl.session.load_history()
    counts = role_counts(history)
    roles = ", ".join(f"{role} {n}" for role, n in sorted(counts.items()))
    repl.out.info(plural(len(history), "message") + (f" ({roles})" if roles else ""))
    repl.out.info(f"tokens used: {_tokens_text(history)}")
    info = await repl.storage.get_info(repl.session.session_id)
    if info is not None and info.usage.calls:  # what the turns recorded, summaries included
        repl.out.info(f"session totals: {usage_text(info.usage)}")
    repl.out.info(await seen_text(repl.session))


async def seen_text(session: Session) -> str:
    """What the model sees of the history now, in one line (for /count)."""
    status = await session.context_status()
    return status_text(status)


def _tokens_text(history: list[ChatMessage]) -> str:
    """The tokens used, saying "unknown" for answers whose server reported no usage."""
    answers = [m for m in history if m.role == "assistant"]
    unknown = sum(1 for m in answers if tokens_used([m]) == (0, 0))
    if answers and unknown == len(answers):
        return "unknown (the server reported no usage)"
    prompt, completion = tokens_used(answers)
    counted = f"prompt {prompt}, completion {completion}"
    if unknown:
        counted += f"; not counted: {plural(unknown, 'answer')} without reported usage"
    return f"{prompt + completion} ({counted})"


@command("/history [N]", "show the last N messages (default 10)", takes="count")
async def _history(repl: Repl, argument: Argument) -> None:
    n = int(argument) if argument else DEFAULT_HISTORY
    session = repl.session
    await session.refresh()
    # only the messages shown are read, however long the session
    total = session.message_count()
    start = max(0, total - n)
    if not total:
        repl.out.note("no messages yet")
    repl.out.transcript(await session.storage.read(session.session_id, start), start)


@command("/undo", "remove your last message and the answer to it (or undo /clear)")
async def _undo(repl: Repl, argument: Argument) -> None:
    session = repl.session
    cleared, repl.cleared = repl.cleared, None
    if cleared:
        await session.refresh()
        if not session.message_count():
            await repl.storage.save(session.session_id, cleared)
            await session.refresh()
            repl.out.note(f"brought back the {plural(len(cleared), 'message')} /clear deleted")
            return
    removed = await session.undo()
    if not removed:
        repl.out.note("nothing to undo")
        return
    repl.out.note(
        f"removed {plural(len(removed), 'message')}: {removed[0].text[:60]!r} and its answer"
    )


@command("/retry", "answer your last message again")
async def _retry(repl: Repl, argument: Argument) -> None:
    repl.cleared = None
    if repl.ensure_model():
        await repl.run_turn(repl.session.stream_retry())


@command("/tools", "the tools the model may call")
async def _tools(repl: Repl, argument: Argument) -> None:
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


@command("/model [NAME]", "show the model, or switch to model NAME", takes="word")
async def _model(repl: Repl, argument: Argument) -> None:
    if not argument:
        repl.ensure_model()
        repl.out.info(f"model: {repl.model_label()}")
        return
    await repl.set_model(argument)
    await repl.session.state.set(MODEL_KEY, argument)
    if repl.ensure_model():
        repl.out.note(f"model: {repl.model_label()}")


@command(
    "/system [TEXT]",
    "show the system prompt, set it to TEXT, or /system --clear",
    takes="text",
    flags=("--clear",),
)
async def _system(repl: Repl, argument: Argument) -> None:
    session = repl.session
    if "--clear" in argument.flags:
        session.system_prompt = None
        await session.state.delete(SYSTEM_KEY)
        repl.out.note("system prompt cleared")
        return
    if not argument:
        repl.out.info(session.system_prompt or "(no system prompt)")
        return
    session.system_prompt = argument
    await session.state.set(SYSTEM_KEY, argument)  # kept with the session for next time
    repl.out.note("system prompt set")


@command("/state", "show the session's key-value state")
async def _state(repl: Repl, argument: Argument) -> None:
    await repl.session.state.reload()
    values = repl.session.state.to_dict()
    if values:
        repl.out.data(values)
    else:
        repl.out.note("the state is empty")


@command(
    "/export [FILE] [--force]",
    "write this session to FILE (.md or .json; default ID.md), --force to overwrite",
    takes="word",
    flags=("--force",),
)
async def _export(repl: Repl, argument: Argument) -> None:
    from ._export import to_json, to_markdown, write_private

    session = repl.session
    path = Path(argument or f"{session.session_id}.md").expanduser()
    kind = EXPORT_FORMATS.get(path.suffix.lower())
    if kind is None:
        repl.out.error(f"/export writes .md (Markdown) or .json files, not {path.name!r}")
        return
    if path.exists() and not await repl.confirm(
        f"{path} exists; overwrite it?", forced="--force" in argument.flags, force="--force"
    ):
        repl.out.note("not exported")
        return
    history = await session.load_history()
    if kind == "json":
        info = await repl.storage.get_info(session.session_id)
        state = dict(session.state.items(internal=True))
        text = to_json(session.session_id, history, info, state)
    else:
        text = to_markdown(session.session_id, history, session.system_prompt)
    write_private(path, text)
    repl.out.note(f"exported {plural(session.message_count(), 'message')} to {path}")
