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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy and IDEs see; at run time each name loads its module (below)
    from ._discovery import DEFAULT_BASE_URL as DEFAULT_BASE_URL
    from ._discovery import DEFAULT_MODEL as DEFAULT_MODEL
    from ._discovery import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
    from ._discovery import LOCAL_SERVERS as LOCAL_SERVERS
    from ._discovery import discover_local_server as discover_local_server
    from ._discovery import list_models as list_models
    from ._openai import OpenAIChatModel as OpenAIChatModel
    from ._protocol import INVALID_CALLS_KEY as INVALID_CALLS_KEY
    from ._protocol import INVALID_TOOL_NAME as INVALID_TOOL_NAME
    from ._protocol import ChatModel as ChatModel
    from ._protocol import ModelResponse as ModelResponse
    from ._protocol import RetryNotice as RetryNotice
    from ._protocol import StreamEvent as StreamEvent
    from ._protocol import TextDelta as TextDelta
    from ._protocol import ToolCallStarted as ToolCallStarted
    from ._protocol import Usage as Usage
    from ._protocol import WireMessage as WireMessage
    from ._protocol import build_response as build_response
    from ._resolve import resolve_model as resolve_model

# Each name's module. A session needs the protocol's types and resolve_model; OpenAIChatModel
# (with the parsing of its answers, its errors and the discovery of servers) is imported when
# a model is built or asked for by name: a session given its own model never loads it.
_EXPORTS = {
    **dict.fromkeys(
        [
            "DEFAULT_BASE_URL",
            "DEFAULT_MODEL",
            "DEFAULT_TIMEOUT",
            "LOCAL_SERVERS",
            "discover_local_server",
            "list_models",
        ],
        "_discovery",
    ),
    "OpenAIChatModel": "_openai",
    **dict.fromkeys(
        [
            "INVALID_CALLS_KEY",
            "INVALID_TOOL_NAME",
            "ChatModel",
            "ModelResponse",
            "RetryNotice",
            "StreamEvent",
            "TextDelta",
            "ToolCallStarted",
            "Usage",
            "WireMessage",
            "build_response",
        ],
        "_protocol",
    ),
    "resolve_model": "_resolve",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = list(_EXPORTS)
