"""conversa: persistent, multi-turn conversations with LLM agents."""

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
from .storage import ConversationStorage, InMemoryStorage, SessionInfo, open_storage

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "ChatMessage",
    "ConversaError",
    "ConversationStorage",
    "CorruptSessionError",
    "InMemoryStorage",
    "InvalidMessage",
    "InvalidSessionId",
    "ModelError",
    "ModelNotConfigured",
    "SessionInfo",
    "StorageError",
    "ToolCall",
    "ToolError",
    "ToolsUnsupported",
    "UnsupportedStorageURL",
    "__version__",
    "open_storage",
]
