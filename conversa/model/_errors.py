"""Translating what goes wrong in a model call (openai/httpx errors, a malformed answer, a
broken stream) into the one ModelError that tells the user what failed and what to check.

Callers chain the original: ``raise failures.translate(exc, tools) from exc``, so that
``--debug`` shows it. Every message shows the URL without its password and hides the API key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._redact import redact_text
from ..errors import ModelError, ToolsUnsupported
from ._parse import Malformed

if TYPE_CHECKING:
    import openai


def translatable() -> tuple[type[BaseException], ...]:
    """The exceptions a model call raises that ErrorTranslator.translate explains."""
    import openai

    return (openai.OpenAIError, json.JSONDecodeError, UnicodeDecodeError, Malformed)


@dataclass(frozen=True, slots=True)
class ErrorTranslator:
    """Builds the ModelErrors of one model: url (already redacted), model name, settings."""

    url: str
    model: str
    timeout: float
    max_retries: int
    api_key: str

    def translate(
        self, exc: BaseException, tools: Sequence[dict[str, Any]] | None = None
    ) -> ModelError:
        """The ModelError for one of the translatable() exceptions."""
        import openai

        url = self.url
        if isinstance(exc, Malformed):
            return self.invalid_answer(str(exc))
        if isinstance(exc, json.JSONDecodeError | openai.APIResponseValidationError):
            return self.invalid_answer(f"invalid JSON: {exc}")
        if isinstance(exc, UnicodeDecodeError):
            return self.invalid_answer(f"the body is not UTF-8 text: {exc}")
        if isinstance(exc, openai.APITimeoutError):
            return ModelError(
                f"timed out: no answer from {url} within {self.timeout:g}s (tried "
                f"{self.max_retries + 1} times); the server may be overloaded or the model slow "
                "to load. Try again, or raise the timeout (OpenAIChatModel(timeout=...))."
            )
        if isinstance(exc, openai.APIConnectionError):
            if _refused(exc):
                return ModelError(
                    f"no server answers at {url}; is it running? (check OPENAI_BASE_URL)"
                )
            return ModelError(
                f"could not talk to {url}: {self._scrub(_root_cause(exc))}; check the network and "
                "OPENAI_BASE_URL, then try again"
            )
        if isinstance(exc, openai.APIStatusError):
            return self._status(exc, tools)
        return ModelError(self._scrub(f"the model call to {url} failed: {exc}"))

    def invalid_answer(self, detail: str) -> ModelError:
        """The server answered, but not with a chat completion."""
        return ModelError(
            self._scrub(
                f"the server at {self.url} did not answer with a chat completion ({detail}); "
                "check that OPENAI_BASE_URL points to an OpenAI-compatible API (it usually ends "
                "in /v1)"
            )
        )

    def dropped(self, yielded: bool, *, stalled: bool = False) -> ModelError:
        """A stream broke (or went silent) and is not retried."""
        if yielded and stalled:
            return ModelError(
                f"timed out: the answer from {self.url} stalled (nothing for "
                f"{self.timeout:g}s); the text received so far is kept. Send the message again "
                "to retry, or raise the timeout (CONVERSA_TIMEOUT, in seconds)."
            )
        if yielded:
            return ModelError(
                f"the connection to {self.url} broke in the middle of the answer; "
                "the text received so far is kept. Send the message again to retry."
            )
        return ModelError(
            f"the answer stream from {self.url} broke before any text arrived and the "
            f"retries (max_retries={self.max_retries}) are used up; check the server's logs, "
            "then try again"
        )

    def _status(
        self, exc: openai.APIStatusError, tools: Sequence[dict[str, Any]] | None
    ) -> ModelError:
        url, status = self.url, exc.status_code
        said = self._scrub(_server_message(exc))
        if status == 401:
            return ModelError(
                f"the server at {url} rejected the API key (HTTP 401: {said}). Check "
                "OPENAI_API_KEY (or the api_key argument)."
            )
        if status == 403:
            return ModelError(
                f"the server at {url} refused access (HTTP 403: {said}). Check that the key in "
                f"OPENAI_API_KEY may use model {self.model!r}."
            )
        if status == 404:
            return ModelError(
                f"model {self.model!r} not found at {url} (HTTP 404: {said}). Check "
                "CONVERSA_MODEL (or the model argument) against the models the server lists at "
                f"{url}/models, and that OPENAI_BASE_URL ends in /v1."
            )
        if tools and status in (400, 422, 500, 501) and _rejects_tools(exc, said):
            return ToolsUnsupported(
                f"the endpoint at {url} does not accept the `tools` parameter for model "
                f"{self.model!r} ({said}); use the text tool protocol with this model"
            )
        if status == 429:
            return ModelError(
                f"rate limited by {url} (HTTP 429: {said}), still after {self.max_retries} "
                "retries. Wait a little and try again, or check your plan's limits."
            )
        if status >= 500:
            return ModelError(
                f"the server at {url} failed (HTTP {status}: {said}), still after "
                f"{self.max_retries} retries. Try again later."
            )
        return ModelError(f"the server at {url} rejected the request (HTTP {status}: {said})")

    def _scrub(self, text: str) -> str:
        return redact_text(text, [self.api_key])


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:500]
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return str(getattr(exc, "message", exc))[:500]


_TOOLS_REJECTED = re.compile(
    r"(does not support|doesn't support|not support|unsupported|not supported|unrecognized|"
    r"unknown|extra|not allowed|not permitted|requires|enable).{0,40}\btools\b"
    r"|\btools\b.{0,60}(not supported|unsupported|not allowed|unrecognized|unknown|requires)"
    r"|tool[ _-]choice.{0,40}requires|--jinja",
    re.IGNORECASE,
)


def _rejects_tools(exc: Any, said: str) -> bool:
    if getattr(exc, "param", None) == "tools":
        return True
    return bool(_TOOLS_REJECTED.search(said))


def _refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        # httpx's ConnectError, matched by name so that httpx need not be imported here
        if any(t.__name__ == "ConnectError" for t in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
