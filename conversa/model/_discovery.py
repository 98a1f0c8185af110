"""Where to find a model: the arguments, else the environment (OPENAI_API_KEY, OPENAI_BASE_URL,
CONVERSA_MODEL, CONVERSA_TIMEOUT), else the first of LOCAL_SERVERS whose GET /models answers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .._redact import redact_text, redact_url
from ..errors import ModelNotConfigured

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT = 60.0
"""Seconds to wait for an answer (and for each piece of a stream); CONVERSA_TIMEOUT changes it."""
# Local servers ignore the key, but the SDK insists on having one.
PLACEHOLDER_API_KEY = "no-key-needed"
PROBE_TIMEOUT = 0.5
LOCAL_SERVERS: tuple[tuple[str, str], ...] = (
    ("Ollama", "http://127.0.0.1:11434/v1"),
    ("LM Studio", "http://127.0.0.1:1234/v1"),
)
"""Where resolve_model looks for a running local server when nothing is configured."""

HOW_TO_CONFIGURE = """\
No model is configured, and no local model server answers ({tried}).
Configure one with environment variables:
  OPENAI_API_KEY    your API key (for OpenAI; the default model is {default})
  OPENAI_BASE_URL   an OpenAI-compatible endpoint, e.g. a local server (which needs no key)
  CONVERSA_MODEL    the model to use
For example, with Ollama running on this machine:
  OPENAI_BASE_URL=http://localhost:11434/v1 CONVERSA_MODEL=llama3.2 conversa chat"""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The model to use and where: base_url without a trailing slash, the key to send."""

    model: str
    base_url: str
    api_key: str
    found_locally: str | None = None
    """The label of the local server this was found on (None when configured)."""


def configure(model: str | None, api_key: str | None, base_url: str | None) -> Endpoint:
    """The Endpoint of these arguments, completed from the environment or a local server.

    Without a key or a URL, the first of LOCAL_SERVERS that answers is used (ModelNotConfigured
    if none does); with only a URL, its first listed model is the default.
    """
    model = model or env("CONVERSA_MODEL")
    api_key = api_key or env("OPENAI_API_KEY")
    base_url = base_url or env("OPENAI_BASE_URL")
    found_locally: str | None = None
    if api_key is None and base_url is None:
        found_locally, base_url, first = discover_local_server()
        model = model or first
    elif model is None and api_key is None and base_url is not None:
        model = _first_model(base_url)
    return Endpoint(
        model=model or DEFAULT_MODEL,
        base_url=(base_url or DEFAULT_BASE_URL).rstrip("/"),
        api_key=api_key or PLACEHOLDER_API_KEY,
        found_locally=found_locally,
    )


def discover_local_server() -> tuple[str, str, str | None]:
    """(label, base_url, first model) of the first server in LOCAL_SERVERS that answers.

    Raises ModelNotConfigured, explaining how to configure a model, when none does.
    """
    for label, base_url in LOCAL_SERVERS:
        try:
            models = list_models(base_url)
        except (OSError, ValueError):
            continue
        return label, base_url, models[0] if models else None
    tried = ", ".join(f"{label} at {url}" for label, url in LOCAL_SERVERS) or "none to try"
    raise ModelNotConfigured(HOW_TO_CONFIGURE.format(tried=tried, default=DEFAULT_MODEL))


def list_models(base_url: str, timeout: float = PROBE_TIMEOUT) -> list[str]:
    """The model ids GET {base_url}/models lists (OSError if nothing answers in time)."""
    import urllib.parse
    import urllib.request

    host = urllib.parse.urlsplit(base_url).hostname or ""
    # a proxy would answer for a missing local server, so loopback probes go direct
    direct = host in ("127.0.0.1", "localhost", "::1")
    handlers = [urllib.request.ProxyHandler({})] if direct else []
    opener = urllib.request.build_opener(*handlers)
    with opener.open(base_url.rstrip("/") + "/models", timeout=timeout) as response:
        payload = json.loads(response.read())
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError(f"{redact_url(base_url)}/models did not answer with a model list")
    return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]


def _first_model(base_url: str) -> str:
    try:
        models = list_models(base_url, timeout=2.0)
    except (OSError, ValueError) as exc:
        raise ModelNotConfigured(
            f"no model name is set and {redact_url(base_url)}/models could not be read "
            f"({redact_text(str(exc))}); "
            "set CONVERSA_MODEL (or pass model=...) to the model to use"
        ) from exc
    if not models:
        raise ModelNotConfigured(
            f"the server at {redact_url(base_url)} lists no models; load or pull one "
            "(e.g. `ollama pull llama3.2`) or set CONVERSA_MODEL"
        )
    return models[0]


def env(name: str) -> str | None:
    """The environment variable's value; None when it is unset or empty."""
    return os.environ.get(name) or None


def timeout_from_env() -> float:
    """$CONVERSA_TIMEOUT in seconds, else DEFAULT_TIMEOUT (ModelNotConfigured if invalid)."""
    value = env("CONVERSA_TIMEOUT")
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ModelNotConfigured(
            f"CONVERSA_TIMEOUT must be a number of seconds above 0, not {value!r}"
        )
    return seconds
