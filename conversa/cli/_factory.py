"""Building a Session (model, tools, system prompt) from command-line options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..events import Approver, ReactMode
    from ..model import ChatModel
    from ..session import Session
    from ..storage import ConversationStorage
    from ..tools import Tool

SYSTEM_KEY = "__conversa.system_prompt"
"""The session-state key that keeps a session's system prompt across restarts."""
MODEL_KEY = "__conversa.model"
"""The session-state key that keeps the model chosen with /model."""
WINDOW_KEY = "__conversa.context_window"
"""The session-state key that keeps --context-window: ``{"tokens": N, "compaction": bool}``."""


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """What the command line says about the model and the agent."""

    model: str | None = None
    base_url: str | None = None
    system: str | None = None
    tool_names: str | None = None
    max_iterations: int = 10
    react_mode: ReactMode = "auto"
    allow_private_fetch: bool = False
    context_window: int | None = None
    """Tokens the prompt may take; 0 takes a stored window away; None: as stored."""
    no_compaction: bool = False


def load_tools(names: str | None, *, allow_private_fetch: bool = False) -> list[Tool]:
    """The built-in tools named in a comma-separated list ('all' for every one)."""
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    if not wanted:
        return []  # without importing the tools (pydantic, the built-ins)
    from ..tools import builtin_tools, get_builtin

    if wanted == ["all"]:
        return list(builtin_tools(allow_private_fetch=allow_private_fetch).values())
    return [get_builtin(name, allow_private_fetch=allow_private_fetch) for name in wanted]


def model_spec(name: str | None, base_url: str | None) -> str | ChatModel | None:
    """What to give Session.model: a name (resolved from the environment) or a built model.

    Building one with a base URL but no name asks the server for its models, so this can
    raise ModelNotConfigured; callers treat that as "no model yet", not as a crash.
    """
    if base_url is None:
        return name
    from ..model import OpenAIChatModel

    return OpenAIChatModel(name, base_url=base_url)


async def open_session(
    session_id: str,
    storage: ConversationStorage,
    options: AgentOptions,
    *,
    tools: list[Tool],
    approve: Approver | None,
    override: bool,
) -> tuple[Session, str | None]:
    """Open (or create) a session; returns it with the model name it should use.

    The system prompt, the model chosen with /model and the context window are kept in the
    session's state. With ``override`` the command line's --system, --model and
    --context-window/--no-compaction replace what is stored; otherwise they only fill in what
    the session does not have.
    """
    from ..session import create_session

    # the window decides how much of the history is read, so it is known before the session
    kept = stored_window(await storage.get_state(session_id), WINDOW_KEY)
    window = _chosen_window(kept, options, override=override)
    session = await create_session(
        session_id,
        storage,
        tools=tools,
        max_iterations=options.max_iterations,
        react_mode=options.react_mode,
        approve=approve,
        context_window=window["tokens"] if window else None,
        # with a window the CLI summarizes rather than forgets, unless told not to
        compaction=bool(window and window["compaction"]),
    )
    if window != kept:
        if window is None:
            await session.state.delete(WINDOW_KEY)
        else:
            await session.state.set(WINDOW_KEY, window)
    stored_system = _text(session.state.get(SYSTEM_KEY))
    given = options.system
    system = given if given is not None and (override or stored_system is None) else stored_system
    if system is not None and system != stored_system:
        await session.state.set(SYSTEM_KEY, system)
    session.system_prompt = system or None
    stored_model = _text(session.state.get(MODEL_KEY))
    model = options.model if (override and options.model) else (stored_model or options.model)
    return session, model


def stored_window(state: dict[str, Any], key: str = WINDOW_KEY) -> dict[str, Any] | None:
    """A stored window setting, if it is a well-formed one (else as if there were none)."""
    value = state.get(key)
    if not isinstance(value, dict):
        return None
    tokens, compaction = value.get("tokens"), value.get("compaction")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        return None
    return {"tokens": tokens, "compaction": compaction is not False}


def _chosen_window(
    stored: dict[str, Any] | None, options: AgentOptions, *, override: bool
) -> dict[str, Any] | None:
    """The window to use and keep: the command line's where it says one, else the stored."""
    given = options.context_window
    if given is not None and (override or stored is None):
        return {"tokens": given, "compaction": not options.no_compaction} if given else None
    if stored is not None and override and options.no_compaction:
        return {**stored, "compaction": False}
    return stored


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
