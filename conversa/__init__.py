"""conversa: persistent, multi-turn conversations with LLM agents.

Start at ``create_session`` (``session.py``): a Session keeps its history in a
``ConversationStorage`` (``storage/``) and answers each user message with the ReAct loop
(``agent.py``) over a ``ChatModel`` (``model.py``) and tools (``tools/``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy and IDEs see (`X as X`: re-exported); tests/test_public_api.py
    # checks that these imports, _EXPORTS and __all__ name the same things
    from ._session_options import SessionOptions as SessionOptions
    from .compaction import DEFAULT_SUMMARY_PROMPT as DEFAULT_SUMMARY_PROMPT
    from .compaction import Compaction as Compaction
    from .compaction import CompactionResult as CompactionResult
    from .context import ContextStatus as ContextStatus
    from .context import TokenCounter as TokenCounter
    from .context import estimate_tokens as estimate_tokens
    from .errors import BackendUnavailable as BackendUnavailable
    from .errors import ConversaError as ConversaError
    from .errors import CorruptSessionError as CorruptSessionError
    from .errors import EncryptionError as EncryptionError
    from .errors import EncryptionKeyError as EncryptionKeyError
    from .errors import FlowError as FlowError
    from .errors import InvalidMessage as InvalidMessage
    from .errors import InvalidSessionId as InvalidSessionId
    from .errors import ModelError as ModelError
    from .errors import ModelNotConfigured as ModelNotConfigured
    from .errors import SessionBusy as SessionBusy
    from .errors import StateValueError as StateValueError
    from .errors import StorageConfigError as StorageConfigError
    from .errors import StorageError as StorageError
    from .errors import ToolError as ToolError
    from .errors import ToolsUnsupported as ToolsUnsupported
    from .errors import UnsupportedStorageURL as UnsupportedStorageURL
    from .events import AgentResult as AgentResult
    from .events import Approver as Approver
    from .events import InterceptedResponse as InterceptedResponse
    from .events import ModelRequest as ModelRequest
    from .events import OnLimit as OnLimit
    from .events import ReactMode as ReactMode
    from .events import RequestInterceptor as RequestInterceptor
    from .events import ResponseInterceptor as ResponseInterceptor
    from .events import Step as Step
    from .events import StopReason as StopReason
    from .events import ToolDone as ToolDone
    from .events import ToolRunning as ToolRunning
    from .events import TurnDone as TurnDone
    from .events import TurnEvent as TurnEvent
    from .flow import Flow as Flow
    from .messages import ChatMessage as ChatMessage
    from .messages import Content as Content
    from .messages import Role as Role
    from .messages import ToolCall as ToolCall
    from .model import ChatModel as ChatModel
    from .model import ModelResponse as ModelResponse
    from .model import OpenAIChatModel as OpenAIChatModel
    from .model import RetryNotice as RetryNotice
    from .model import StreamEvent as StreamEvent
    from .model import TextDelta as TextDelta
    from .model import ToolCallStarted as ToolCallStarted
    from .model import Usage as Usage
    from .session import Session as Session
    from .session import create_session as create_session
    from .state import SessionState as SessionState
    from .storage import ConversationStorage as ConversationStorage
    from .storage import InMemoryStorage as InMemoryStorage
    from .storage import RouteVisit as RouteVisit
    from .storage import SessionFlow as SessionFlow
    from .storage import SessionInfo as SessionInfo
    from .storage import SummaryMark as SummaryMark
    from .storage import UsageTotals as UsageTotals
    from .storage import open_storage as open_storage
    from .storage.base import SearchHit as SearchHit
    from .storage.base import StateEntry as StateEntry
    from .sync import SyncSession as SyncSession
    from .sync import SyncState as SyncState
    from .sync import create_session_sync as create_session_sync
    from .tools import Tool as Tool
    from .tools import ToolRegistry as ToolRegistry
    from .tools import tool as tool

    __version__: str

# The distribution's name: its metadata holds the version (pyproject.toml is the one source).
_DISTRIBUTION = "conversa-ai"

# Public name -> the module that defines it. Imports happen on first access so that
# `import conversa` (and with it the `conversa` command) starts fast.
_EXPORTS: dict[str, str] = {
    "AgentResult": ".events",
    "Approver": ".events",
    "BackendUnavailable": ".errors",
    "ChatMessage": ".messages",
    "ChatModel": ".model",
    "Content": ".messages",
    "ConversaError": ".errors",
    "ConversationStorage": ".storage",
    "CorruptSessionError": ".errors",
    "EncryptionError": ".errors",
    "EncryptionKeyError": ".errors",
    "Flow": ".flow",
    "FlowError": ".errors",
    "InMemoryStorage": ".storage",
    "InvalidMessage": ".errors",
    "InvalidSessionId": ".errors",
    "ModelError": ".errors",
    "ModelNotConfigured": ".errors",
    "ModelRequest": ".events",
    "Compaction": ".compaction",
    "CompactionResult": ".compaction",
    "ContextStatus": ".context",
    "DEFAULT_SUMMARY_PROMPT": ".compaction",
    "InterceptedResponse": ".events",
    "ModelResponse": ".model",
    "OnLimit": ".events",
    "OpenAIChatModel": ".model",
    "ReactMode": ".events",
    "RequestInterceptor": ".events",
    "ResponseInterceptor": ".events",
    "RetryNotice": ".model",
    "Role": ".messages",
    "SearchHit": ".storage.base",
    "Session": ".session",
    "RouteVisit": ".storage",
    "SessionBusy": ".errors",
    "SessionFlow": ".storage",
    "SessionInfo": ".storage",
    "SessionOptions": "._session_options",
    "SessionState": ".state",
    "StateEntry": ".storage.base",
    "StateValueError": ".errors",
    "Step": ".events",
    "StopReason": ".events",
    "StorageConfigError": ".errors",
    "StorageError": ".errors",
    "StreamEvent": ".model",
    "SummaryMark": ".storage",
    "SyncSession": ".sync",
    "SyncState": ".sync",
    "TextDelta": ".model",
    "TokenCounter": ".context",
    "Tool": ".tools",
    "ToolCall": ".messages",
    "ToolCallStarted": ".model",
    "ToolDone": ".events",
    "ToolError": ".errors",
    "ToolRegistry": ".tools",
    "ToolRunning": ".events",
    "ToolsUnsupported": ".errors",
    "TurnDone": ".events",
    "TurnEvent": ".events",
    "UnsupportedStorageURL": ".errors",
    "Usage": ".model",
    "UsageTotals": ".storage",
    "create_session": ".session",
    "create_session_sync": ".sync",
    "estimate_tokens": ".context",
    "open_storage": ".storage",
    "tool": ".tools",
}

__all__ = [*_EXPORTS, "__version__"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(_DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif (module := _EXPORTS.get(name)) is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    else:
        raise AttributeError(f"module 'conversa' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
