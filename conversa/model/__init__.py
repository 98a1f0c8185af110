"""Model access: the ChatModel protocol, OpenAIChatModel and configuration from the environment.

    model = resolve_model(None)        # OPENAI_API_KEY / OPENAI_BASE_URL / CONVERSA_MODEL,
                                       # else a local Ollama or LM Studio server
    response = await model.complete([{"role": "user", "content": "Hi"}])
    async for event in model.stream(messages):   # TextDelta | ToolCallStarted ..., ModelResponse
        ...

The modules: ``_protocol`` (what a model answers), ``_parse`` (reading untrusted answers),
``_errors`` (what failed, as a ModelError), ``_discovery`` (the environment and local servers),
``_openai`` (OpenAIChatModel). The openai SDK is imported on first use, so that
``import conversa.model`` stays cheap.
"""

from __future__ import annotations

from ._discovery import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    LOCAL_SERVERS,
    discover_local_server,
    list_models,
)
from ._openai import OpenAIChatModel, resolve_model
from ._protocol import (
    INVALID_CALLS_KEY,
    INVALID_TOOL_NAME,
    ChatModel,
    ModelResponse,
    RetryNotice,
    StreamEvent,
    TextDelta,
    ToolCallStarted,
    Usage,
    WireMessage,
    build_response,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT",
    "INVALID_CALLS_KEY",
    "INVALID_TOOL_NAME",
    "LOCAL_SERVERS",
    "ChatModel",
    "ModelResponse",
    "OpenAIChatModel",
    "RetryNotice",
    "StreamEvent",
    "TextDelta",
    "ToolCallStarted",
    "Usage",
    "WireMessage",
    "build_response",
    "discover_local_server",
    "list_models",
    "resolve_model",
]
