"""Model access: the ChatModel protocol, OpenAIChatModel and configuration from the environment.

    model = resolve_model(None)        # OPENAI_API_KEY / OPENAI_BASE_URL / CONVERSA_MODEL,
                                       # else a local Ollama or LM Studio server
    response = await model.complete([{"role": "user", "content": "Hi"}])
    async for event in model.stream(messages):   # TextDelta | ToolCallStarted ..., ModelResponse
        ...

The openai SDK is imported on first use so that `import conversa.model` stays cheap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._redact import redact_text, redact_url
from .errors import ModelError, ModelNotConfigured, ToolsUnsupported
from .messages import ChatMessage, ToolCall

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

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

WireMessage = dict[str, Any]

INVALID_TOOL_NAME = "invalid_tool_call"
"""The name a tool call without a usable function name is stored under (the API needs one)."""
INVALID_CALLS_KEY = "invalid_tool_calls"
"""The assistant metadata key mapping the id of each such call to what was wrong with it."""


# -- results and stream events ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one or more model calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def to_dict(self) -> dict[str, int]:
        """The OpenAI shape: prompt_tokens, completion_tokens, total_tokens."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total,
        }

    @classmethod
    def from_openai(cls, usage: Any) -> Usage:
        """From an SDK usage object or dict (None gives zero usage)."""
        if usage is None:
            return cls()
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        else:
            prompt = getattr(usage, "prompt_tokens", None)
            completion = getattr(usage, "completion_tokens", None)
        return cls(_token_count(prompt), _token_count(completion))


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """One model answer: the assistant message (with model, usage, latency metadata)."""

    message: ChatMessage
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        """The answer's text ("" when it only calls tools)."""
        return self.message.text

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tool calls the model asked for."""
        return self.message.tool_calls


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of answer text, as it arrives."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    """The model began a tool call (its arguments are still arriving)."""

    index: int
    id: str
    name: str


StreamEvent = TextDelta | ToolCallStarted | ModelResponse


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """A model call is about to be retried: why, after how long, and which retry it is."""

    reason: str
    delay: float
    attempt: int
    retries: int


@runtime_checkable
class ChatModel(Protocol):
    """Anything that answers chat messages in the OpenAI wire form."""

    name: str

    async def complete(
        self,
        messages: Sequence[WireMessage],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> ModelResponse:
        """The whole answer to these messages."""
        ...

    def stream(
        self,
        messages: Sequence[WireMessage],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Deltas as they arrive, then the final ModelResponse."""
        ...


def build_response(
    *,
    text: str | None,
    tool_calls: Sequence[ToolCall],
    model: str,
    usage: Usage,
    finish_reason: str | None,
    started: float,
    invalid_calls: Mapping[str, str] | None = None,
) -> ModelResponse:
    """A ModelResponse whose assistant message carries model, usage, latency and finish reason.

    invalid_calls maps the ids of tool calls the model got wrong to what was wrong with them
    (stored under INVALID_CALLS_KEY, for the agent to answer each with that error).
    """
    metadata: dict[str, Any] = {
        "model": model,
        "usage": usage.to_dict(),
        "latency_ms": round((time.monotonic() - started) * 1000),
        "finish_reason": finish_reason,
    }
    if invalid_calls:
        metadata[INVALID_CALLS_KEY] = dict(invalid_calls)
    message = ChatMessage.assistant(
        content=text if text or not tool_calls else None,
        tool_calls=tuple(tool_calls),
        metadata=metadata,
    )
    return ModelResponse(message=message, usage=usage, finish_reason=finish_reason)


# -- the OpenAI-compatible model -------------------------------------------------------


class _StreamDropped(Exception):
    """The stream ended before the server said it was finished."""


class OpenAIChatModel:
    """A ChatModel on any OpenAI-compatible chat-completions endpoint (openai.AsyncOpenAI).

    max_retries is the number of retries after the first attempt, so one call makes at most
    max_retries + 1 requests, whatever failed (429, 5xx, timeouts, a dropped stream).
    retry_backoff is the first retry's delay in seconds when the server sends no Retry-After;
    it doubles on each further retry. on_retry, when set, is told of each retry before its
    wait (so that a user is not left wondering). timeout defaults to $CONVERSA_TIMEOUT, else
    60 s; it also bounds a stream's silence between two pieces.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = None,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        client: openai.AsyncOpenAI | None = None,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        model = model or _env("CONVERSA_MODEL")
        api_key = api_key or _env("OPENAI_API_KEY")
        base_url = base_url or _env("OPENAI_BASE_URL")
        found_locally: str | None = None
        if client is not None:
            base_url = str(client.base_url)
            max_retries = client.max_retries
        elif api_key is None and base_url is None:
            label, base_url, first_model = discover_local_server()
            found_locally = label
            model = model or first_model
        elif model is None and api_key is None and base_url is not None:
            model = _first_model(base_url)
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.name: str = model or DEFAULT_MODEL
        self.timeout = timeout if timeout is not None else _timeout_from_env()
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.on_retry = on_retry
        self._api_key = (client.api_key if client is not None else api_key) or PLACEHOLDER_API_KEY
        self._client = client
        self._owns_client = client is None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._shown_url = redact_url(self.base_url)  # what messages show: no password
        where = f"{found_locally} at {self._shown_url}" if found_locally else self._shown_url
        self.description = f"{self.name} via {where}"
        if found_locally:
            self.description += " (found running locally)"
            log.info("using %s", self.description)

    def __repr__(self) -> str:
        return f"OpenAIChatModel({self.name!r}, base_url={self._shown_url!r})"

    # -- calls ------------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[WireMessage],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> ModelResponse:
        """The whole answer; retries transient failures, then raises ModelError."""
        import openai

        params = self._params(messages, tools, options)
        started = time.monotonic()
        try:
            completion = await self._get_client().chat.completions.create(**params)
        except (openai.OpenAIError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._translate(exc, tools) from exc
        try:
            return _read_completion(completion, self.name, started)
        except _Malformed as exc:
            raise ModelError(self._invalid_answer(str(exc))) from exc

    async def stream(
        self,
        messages: Sequence[WireMessage],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Text and tool-call events as they arrive, then the final ModelResponse.

        A stream that breaks before anything was yielded is retried (within max_retries);
        one that breaks later raises ModelError and the caller keeps the text it got.
        """
        import openai

        params = self._params(messages, tools, options)
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
        started = time.monotonic()
        attempts_left = self.max_retries + 1
        drops = 0
        while True:
            state = _StreamState()
            connected = False
            try:
                client = self._get_client(max_retries=attempts_left - 1)
                raw = await client.chat.completions.with_raw_response.create(**params)
                connected = True
                attempts_left -= raw.retries_taken + 1
                chunks = raw.parse()
                try:
                    async for chunk in chunks:
                        for event in state.feed(chunk):
                            yield event
                finally:
                    await chunks.close()
                if state.finish_reason is None:
                    raise _StreamDropped
            except (_StreamDropped, openai.APIConnectionError) as exc:
                if not connected:
                    # the SDK has already retried failures to connect
                    raise self._translate(exc, tools) from exc
                if state.yielded or attempts_left <= 0:
                    stalled = isinstance(exc, openai.APITimeoutError)
                    raise self._dropped(state.yielded, stalled=stalled) from exc
                drops += 1
                delay = self.retry_backoff * 2 ** (drops - 1)
                log.info("stream from %s dropped; retrying in %.3gs", self._shown_url, delay)
                notice = RetryNotice("the answer stream broke", delay, drops, self.max_retries)
                self._notify_retry(notice)
                await asyncio.sleep(delay)
                continue
            except (openai.OpenAIError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise self._translate(exc, tools) from exc
            except _Malformed as exc:
                raise ModelError(self._invalid_answer(str(exc))) from exc
            calls, invalid = state.calls()
            yield build_response(
                text=state.text,
                tool_calls=calls,
                model=state.model or self.name,
                usage=state.usage,
                finish_reason=state.finish_reason,
                started=started,
                invalid_calls=invalid,
            )
            return

    async def __aenter__(self) -> OpenAIChatModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections of the underlying client."""
        if self._client is None:
            return
        if not self._owns_client:
            await self._client.close()
            return
        client, self._client = self._client, None
        # a client opened on another (now finished) loop cannot be closed from this one
        if self._client_loop is asyncio.get_running_loop():
            await client.close()

    # -- helpers ----------------------------------------------------------------------

    def _params(
        self,
        messages: Sequence[WireMessage],
        tools: Sequence[dict[str, Any]] | None,
        options: dict[str, Any],
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.name, "messages": list(messages), **options}
        if tools:
            params["tools"] = list(tools)
        return params

    def _get_client(self, max_retries: int | None = None) -> openai.AsyncOpenAI:
        import openai

        loop = asyncio.get_running_loop()
        if self._client is None or (self._owns_client and self._client_loop is not loop):
            # connections belong to the loop that opened them: a model used from a new
            # event loop (another asyncio.run) needs a new client
            self._client = _client_class()(
                api_key=self._api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
                # the SDK's default wrapper closes itself on the running loop when collected,
                # which fails noisily once that is no longer the loop it was opened on
                http_client=openai.DefaultAsyncHttpxClient(),
            )
            self._client.retry_backoff = self.retry_backoff  # type: ignore[attr-defined]
            self._client.notify_retry = self._notify_retry  # type: ignore[attr-defined]
            self._client_loop = loop
        if max_retries is None or max_retries == self._client.max_retries:
            return self._client
        copy = self._client.with_options(max_retries=max_retries)
        copy.retry_backoff = self.retry_backoff  # type: ignore[attr-defined]
        copy.notify_retry = self._notify_retry  # type: ignore[attr-defined]
        return copy

    def _notify_retry(self, notice: RetryNotice) -> None:
        if self.on_retry is not None:
            self.on_retry(notice)

    def _scrub(self, text: str) -> str:
        return redact_text(text, [self._api_key])

    def _invalid_answer(self, detail: str) -> str:
        return self._scrub(
            f"the server at {self._shown_url} did not answer with a chat completion ({detail}); "
            "check that OPENAI_BASE_URL points to an OpenAI-compatible API (it usually ends "
            "in /v1)"
        )

    def _dropped(self, yielded: bool, *, stalled: bool = False) -> ModelError:
        if yielded and stalled:
            return ModelError(
                f"timed out: the answer from {self._shown_url} stalled (nothing for "
                f"{self.timeout:g}s); the text received so far is kept. Send the message again "
                "to retry, or raise the timeout (CONVERSA_TIMEOUT, in seconds)."
            )
        if yielded:
            return ModelError(
                f"the connection to {self._shown_url} broke in the middle of the answer; "
                "the text received so far is kept. Send the message again to retry."
            )
        return ModelError(
            f"the answer stream from {self._shown_url} broke before any text arrived and the "
            f"retries (max_retries={self.max_retries}) are used up; check the server's logs, "
            "then try again"
        )

    def _translate(self, exc: BaseException, tools: Sequence[dict[str, Any]] | None) -> ModelError:
        """The ModelError telling the user what failed and what to check."""
        import openai

        url = self._shown_url
        if isinstance(exc, json.JSONDecodeError | openai.APIResponseValidationError):
            return ModelError(self._invalid_answer(f"invalid JSON: {exc}"))
        if isinstance(exc, UnicodeDecodeError):
            return ModelError(self._invalid_answer(f"the body is not UTF-8 text: {exc}"))
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
            return self._translate_status(exc, tools)
        return ModelError(self._scrub(f"the model call to {url} failed: {exc}"))

    def _translate_status(
        self, exc: openai.APIStatusError, tools: Sequence[dict[str, Any]] | None
    ) -> ModelError:
        url, status = self._shown_url, exc.status_code
        said = self._scrub(_server_message(exc))
        if status == 401:
            return ModelError(
                f"the server at {url} rejected the API key (HTTP 401: {said}). Check "
                "OPENAI_API_KEY (or the api_key argument)."
            )
        if status == 403:
            return ModelError(
                f"the server at {url} refused access (HTTP 403: {said}). Check that the key in "
                f"OPENAI_API_KEY may use model {self.name!r}."
            )
        if status == 404:
            return ModelError(
                f"model {self.name!r} not found at {url} (HTTP 404: {said}). Check CONVERSA_MODEL "
                f"(or the model argument) against the models the server lists at {url}/models, "
                "and that OPENAI_BASE_URL ends in /v1."
            )
        if tools and status in (400, 422, 500, 501) and _rejects_tools(exc, said):
            return ToolsUnsupported(
                f"the endpoint at {url} does not accept the `tools` parameter for model "
                f"{self.name!r} ({said}); use the text tool protocol with this model"
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


class _StreamState:
    """Assembles streamed chunks into text, tool calls and usage."""

    def __init__(self) -> None:
        self.started = False
        self.yielded = False
        self.text_parts: list[str] = []
        self.tool_parts: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.model: str | None = None

    @property
    def text(self) -> str | None:
        return "".join(self.text_parts) if self.text_parts else None

    def feed(self, chunk: Any) -> list[TextDelta | ToolCallStarted]:
        """Take one chunk; return the events it produces (_Malformed if it is not a chunk)."""
        self.started = True
        if not _is_object(chunk):
            raise _Malformed(f"a stream chunk is {_preview(chunk)}, not an object")
        self.model = self.model or _text_field(chunk, "model")
        usage = _field(chunk, "usage")
        if usage is not None:
            self.usage = Usage.from_openai(usage)
        choices = _field(chunk, "choices")
        if choices is not None and not isinstance(choices, list):
            raise _Malformed(f"a stream chunk's choices are {_preview(choices)}, not a list")
        events: list[TextDelta | ToolCallStarted] = []
        for choice in choices or ():
            if not _is_object(choice):
                raise _Malformed(f"a stream chunk's choice is {_preview(choice)}")
            delta = _field(choice, "delta")
            if delta is not None and not _is_object(delta):
                raise _Malformed(f"a stream chunk's delta is {_preview(delta)}")
            content = _content(_field(delta, "content"))
            if content:
                self.text_parts.append(content)
                events.append(TextDelta(content))
            calls = _field(delta, "tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise _Malformed(f"a stream chunk's tool_calls are {_preview(calls)}")
            for call in calls or ():
                started = self._feed_call(call)
                if started is not None:
                    events.append(started)
            self.finish_reason = _text_field(choice, "finish_reason") or self.finish_reason
        self.yielded = self.yielded or bool(events)
        return events

    def _feed_call(self, call: Any) -> ToolCallStarted | None:
        index, call_id, fn = _field(call, "index"), _field(call, "id"), _field(call, "function")
        if not isinstance(index, int) or isinstance(index, bool):
            index = self._index_for(call_id)
        part = self.tool_parts.setdefault(
            index, {"id": None, "name": [], "bad_name": None, "arguments": [], "announced": False}
        )
        if isinstance(call_id, str) and call_id and not part["announced"]:
            part["id"] = call_id
        name, arguments = _field(fn, "name"), _field(fn, "arguments")
        if isinstance(name, str):
            part["name"].append(name)
        elif name is not None:
            part["bad_name"] = name
        if isinstance(arguments, str):
            part["arguments"].append(arguments)
        elif arguments is not None:
            part["arguments"].append(_json_text(arguments))
        if part["announced"] or part["bad_name"] is not None:
            return None
        full_name = _clean("".join(part["name"]))
        if not full_name.strip():
            return None
        part["announced"] = True
        part["id"] = part["id"] or _new_call_id()
        return ToolCallStarted(index=index, id=part["id"], name=full_name)

    def _index_for(self, call_id: object) -> int:
        # Some servers send no index: a new id starts a call, anything else continues the last.
        for index, part in self.tool_parts.items():
            if call_id is not None and part["id"] == call_id:
                return index
        last = max(self.tool_parts, default=-1)
        return last + 1 if last < 0 or (isinstance(call_id, str) and call_id) else last

    def calls(self) -> tuple[list[ToolCall], dict[str, str]]:
        """The complete tool calls, in index order, and the problems of malformed ones."""
        calls: list[ToolCall] = []
        invalid: dict[str, str] = {}
        taken: set[str] = set()
        for _, part in sorted(self.tool_parts.items()):
            name = part["bad_name"] if part["bad_name"] is not None else "".join(part["name"])
            arguments = "".join(part["arguments"])
            call, problem = _tool_call(part["id"], name, arguments, taken)
            calls.append(call)
            if problem is not None:
                invalid[call.id] = problem
        return calls, invalid


# -- reading answers ---------------------------------------------------------------------
# The SDK builds its objects from the JSON without validating it, so any field may hold any
# JSON value (or be missing); everything below checks types instead of trusting the SDK's.


class _Malformed(Exception):
    """An answer that does not have the shape of a chat completion (the detail says why)."""


def _read_completion(completion: Any, default_model: str, started: float) -> ModelResponse:
    if not _is_object(completion):
        raise _Malformed(f"the body is {_preview(completion)}, not an object")
    choices = _field(completion, "choices")
    if not choices:
        raise _Malformed("the answer has no choices")
    if not isinstance(choices, list):
        raise _Malformed(f"its choices are {_preview(choices)}, not a list")
    choice = choices[0]
    message = _field(choice, "message")
    if not _is_object(message):
        raise _Malformed(f"its first choice has no message (message: {_preview(message)})")
    raw_calls = _field(message, "tool_calls")
    if raw_calls is not None and not isinstance(raw_calls, list):
        raise _Malformed(f"the message's tool_calls are {_preview(raw_calls)}, not a list")
    calls: list[ToolCall] = []
    invalid: dict[str, str] = {}
    taken: set[str] = set()
    for raw in raw_calls or ():
        fn = _field(raw, "function")
        call, problem = _tool_call(
            _field(raw, "id"), _field(fn, "name"), _field(fn, "arguments"), taken
        )
        calls.append(call)
        if problem is not None:
            invalid[call.id] = problem
    return build_response(
        text=_content(_field(message, "content")),
        tool_calls=calls,
        model=_text_field(completion, "model") or default_model,
        usage=Usage.from_openai(_field(completion, "usage")),
        finish_reason=_text_field(choice, "finish_reason"),
        started=started,
        invalid_calls=invalid,
    )


def _tool_call(
    raw_id: object, raw_name: object, raw_arguments: object, taken: set[str]
) -> tuple[ToolCall, str | None]:
    """A ToolCall the API will accept back in the history, and what was wrong, if anything.

    A missing or repeated id gets a fresh one, and non-string arguments their JSON text; a call
    without a usable name is kept under INVALID_TOOL_NAME so it can be answered with an error.
    """
    call_id = _clean(raw_id) if isinstance(raw_id, str) and raw_id.strip() else ""
    if not call_id or call_id in taken:
        call_id = _new_call_id()
    taken.add(call_id)
    if raw_arguments is None or isinstance(raw_arguments, str):
        arguments = _clean(raw_arguments or "") or "{}"
    else:
        arguments = _json_text(raw_arguments)
    if isinstance(raw_name, str) and raw_name.strip():
        return ToolCall(call_id, _clean(raw_name), arguments), None
    if raw_name is None or isinstance(raw_name, str):
        problem = "your tool call has no function name"
    else:
        problem = f"the function name of your tool call must be a string, not {_preview(raw_name)}"
    return ToolCall(call_id, INVALID_TOOL_NAME, arguments), problem


def _content(value: object) -> str | None:
    """A message's text; a list of text parts is joined, anything else is _Malformed."""
    if value is None:
        return None
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, list):
        texts = [part if isinstance(part, str) else _field(part, "text") for part in value]
        if all(isinstance(t, str) for t in texts):
            return _clean("\n".join(texts))
    raise _Malformed(f"the message content is {_preview(value)}, not text")


def _field(obj: object, name: str) -> Any:
    """A field of a JSON object (a dict or an SDK model); None if missing or not an object."""
    if isinstance(obj, dict):
        return obj.get(name)
    if isinstance(obj, _sdk_model()):
        return getattr(obj, name, None)
    return None


def _is_object(value: object) -> bool:
    return isinstance(value, dict | _sdk_model())


def _text_field(obj: object, name: str) -> str | None:
    value = _field(obj, name)
    return _clean(value) if isinstance(value, str) else None


@cache
def _sdk_model() -> type:
    import openai

    return openai.BaseModel


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text: str) -> str:
    """The text with lone surrogates (valid in JSON escapes, not in UTF-8) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _json_text(value: object) -> str:
    try:
        return _clean(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):
        return _clean(str(value))


def _preview(value: object) -> str:
    """A short description of a JSON value for an error message: `int 5`, `null`, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool | int | float | str | list | dict):
        return f"{type(value).__name__} {_json_text(value)[:80]}"
    return type(value).__name__


def _token_count(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and math.isfinite(value):
        return max(int(value), 0)
    return 0


@cache
def _client_class() -> type[openai.AsyncOpenAI]:
    """AsyncOpenAI with a tunable retry backoff and a log line per retry."""
    import openai

    class _RetryingClient(openai.AsyncOpenAI):
        retry_backoff: float = 0.5
        notify_retry: Callable[[RetryNotice], None] | None = None
        _retry_status: int | None = None
        _SDK_INITIAL_DELAY = 0.5

        async def _sleep_for_retry(self, *, response: Any, **kwargs: Any) -> None:
            # the status that caused the retry, for the notice _calculate_retry_timeout sends
            self._retry_status = getattr(response, "status_code", None)
            await super()._sleep_for_retry(response=response, **kwargs)

        def _calculate_retry_timeout(
            self, remaining_retries: int, options: Any, response_headers: Any = None
        ) -> float:
            delay = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
            if not self._has_retry_after(response_headers):
                # the SDK's own backoff, rescaled from its fixed start to ours
                delay *= self.retry_backoff / self._SDK_INITIAL_DELAY
            attempt = self.max_retries - remaining_retries + 1
            log.info("retrying in %.3gs (retry %d of %d)", delay, attempt, self.max_retries)
            if self.notify_retry is not None:
                reason = _retry_reason(self._retry_status)
                self.notify_retry(RetryNotice(reason, delay, attempt, self.max_retries))
            return delay

        def _has_retry_after(self, headers: Any) -> bool:
            after = self._parse_retry_after_header(headers)
            return after is not None and 0 < after <= 120

    return _RetryingClient


# -- configuration ---------------------------------------------------------------------

HOW_TO_CONFIGURE = """\
No model is configured, and no local model server answers ({tried}).
Configure one with environment variables:
  OPENAI_API_KEY    your API key (for OpenAI; the default model is {default})
  OPENAI_BASE_URL   an OpenAI-compatible endpoint, e.g. a local server (which needs no key)
  CONVERSA_MODEL    the model to use
For example, with Ollama running on this machine:
  OPENAI_BASE_URL=http://localhost:11434/v1 CONVERSA_MODEL=llama3.2 conversa chat"""


def resolve_model(model: str | ChatModel | None = None) -> ChatModel:
    """A ChatModel from an instance (returned as is), a model name, or None (the environment)."""
    if model is None or isinstance(model, str):
        return OpenAIChatModel(model or None)
    if isinstance(model, ChatModel):
        return model
    raise TypeError(
        f"model must be a model name, a ChatModel (such as OpenAIChatModel) or None, "
        f"not {type(model).__name__}"
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


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _timeout_from_env() -> float:
    value = _env("CONVERSA_TIMEOUT")
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


def _retry_reason(status: int | None) -> str:
    if status == 429:
        return "rate limited"
    if status is None:
        return "no answer"
    return f"the server answered HTTP {status}"


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


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
        if any(t.__name__ == "ConnectError" for t in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = [
    "DEFAULT_MODEL",
    "INVALID_CALLS_KEY",
    "INVALID_TOOL_NAME",
    "LOCAL_SERVERS",
    "ChatModel",
    "ModelResponse",
    "OpenAIChatModel",
    "StreamEvent",
    "TextDelta",
    "ToolCallStarted",
    "Usage",
    "build_response",
    "discover_local_server",
    "list_models",
    "resolve_model",
]
