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

    The system prompt and the model chosen with /model are kept in the session's state.
    With ``override`` the command line's --system and --model replace what is stored;
    otherwise they only fill in what the session does not have.
    """
    from ..session import create_session

    session = await create_session(
        session_id,
        storage,
        tools=tools,
        max_iterations=options.max_iterations,
        react_mode=options.react_mode,
        approve=approve,
        context_window=options.context_window,
        # with a window the CLI summarizes rather than forgets, unless told not to
        compaction=options.context_window is not None and not options.no_compaction,
    )
    stored_system = _text(session.state.get(SYSTEM_KEY))
    given = options.system
    system = given if given is not None and (override or stored_system is None) else stored_system
    if system is not None and system != stored_system:
        await session.state.set(SYSTEM_KEY, system)
    session.system_prompt = system or None
    stored_model = _text(session.state.get(MODEL_KEY))
    model = options.model if (override and options.model) else (stored_model or options.model)
    return session, model


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
