"""What users need to test their own agents and backends.

- ``FakeOpenAIServer``: a real OpenAI-compatible HTTP server on 127.0.0.1 with scripted replies,
  fault injection, strict request validation and recorded requests.
- ``ScriptedModel``: an in-process ChatModel answering from the same script vocabulary.
- The reply vocabulary: ``text``, ``tool_call``, ``tool_calls`` and the faults ``error``,
  ``rate_limited``, ``server_error``, ``unauthorized``, ``model_not_found``,
  ``tools_unsupported``, ``slow``, ``drop_stream``, ``invalid_json``.
- The storage conformance suite lives in ``conversa.testing.conformance`` (it imports pytest
  and hypothesis, so it is not imported here).
"""

from .replies import (
    Fault,
    Reply,
    drop_stream,
    echo,
    error,
    invalid_json,
    model_not_found,
    rate_limited,
    server_error,
    slow,
    text,
    tool_call,
    tool_calls,
    tools_unsupported,
    unauthorized,
)
from .scripted import ScriptedModel, ScriptedRequest
from .server import FakeOpenAIServer

__all__ = [
    "FakeOpenAIServer",
    "Fault",
    "Reply",
    "ScriptedModel",
    "ScriptedRequest",
    "drop_stream",
    "echo",
    "error",
    "invalid_json",
    "model_not_found",
    "rate_limited",
    "server_error",
    "slow",
    "text",
    "tool_call",
    "tool_calls",
    "tools_unsupported",
    "unauthorized",
]
