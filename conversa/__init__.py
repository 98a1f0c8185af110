"""conversa: persistent, multi-turn conversations with LLM agents.

Start at ``create_session`` (``session.py``): a Session keeps its history in a
``ConversationStorage`` (``storage/``) and answers each user message with the ReAct loop
(``agent.py``) over a ``ChatModel`` (``model.py``) and tools (``tools/``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import AgentResult, ModelRequest, Step, ToolDone, ToolRunning, TurnDone, TurnEvent
    from .errors import (
        BackendUnavailable,
        ConversaError,
        CorruptSessionError,
        InvalidMessage,
        InvalidSessionId,
        ModelError,
        ModelNotConfigured,
        StorageError,
        ToolError,
        ToolsUnsupported,
        UnsupportedStorageURL,
    )
    from .messages import ChatMessage, ToolCall
    from .model import ChatModel, ModelResponse, OpenAIChatModel, TextDelta, ToolCallStarted, Usage
    from .session import Session, create_session
    from .state import SessionState
    from .storage import ConversationStorage, InMemoryStorage, SessionInfo, open_storage
    from .sync import SyncSession, create_session_sync
    from .tools import Tool, ToolRegistry, tool

__version__ = "0.1.0"

# Public name -> the module that defines it. Imports happen on first access so that
# `import conversa` (and with it the `conversa` command) starts fast.
_EXPORTS: dict[str, str] = {
    "AgentResult": ".agent",
    "BackendUnavailable": ".errors",
    "ChatMessage": ".messages",
    "ChatModel": ".model",
    "ConversaError": ".errors",
    "ConversationStorage": ".storage",
    "CorruptSessionError": ".errors",
    "InMemoryStorage": ".storage",
    "InvalidMessage": ".errors",
    "InvalidSessionId": ".errors",
    "ModelError": ".errors",
    "ModelNotConfigured": ".errors",
    "ModelRequest": ".agent",
    "ModelResponse": ".model",
    "OpenAIChatModel": ".model",
    "Session": ".session",
    "SessionInfo": ".storage",
    "SessionState": ".state",
    "Step": ".agent",
    "StateValueError": ".errors",
    "StorageError": ".errors",
    "SyncSession": ".sync",
    "TextDelta": ".model",
    "Tool": ".tools",
    "ToolCall": ".messages",
    "ToolCallStarted": ".model",
    "ToolDone": ".agent",
    "ToolError": ".errors",
    "ToolRegistry": ".tools",
    "ToolRunning": ".agent",
    "ToolsUnsupported": ".errors",
    "TurnDone": ".agent",
    "TurnEvent": ".agent",
    "UnsupportedStorageURL": ".errors",
    "Usage": ".model",
    "create_session": ".session",
    "create_session_sync": ".sync",
    "open_storage": ".storage",
    "tool": ".tools",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'conversa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AgentResult",
    "BackendUnavailable",
    "ChatMessage",
    "ChatModel",
    "ConversaError",
    "ConversationStorage",
    "CorruptSessionError",
    "InMemoryStorage",
    "InvalidMessage",
    "InvalidSessionId",
    "ModelError",
    "ModelNotConfigured",
    "ModelRequest",
    "ModelResponse",
    "OpenAIChatModel",
    "Session",
    "SessionInfo",
    "SessionState",
    "Step",
    "StorageError",
    "SyncSession",
    "TextDelta",
    "Tool",
    "ToolCall",
    "ToolCallStarted",
    "ToolDone",
    "ToolError",
    "ToolRegistry",
    "ToolRunning",
    "ToolsUnsupported",
    "TurnDone",
    "TurnEvent",
    "UnsupportedStorageURL",
    "Usage",
    "__version__",
    "create_session",
    "create_session_sync",
    "open_storage",
    "tool",
]
