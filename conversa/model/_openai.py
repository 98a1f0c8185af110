"""OpenAIChatModel: calls to an OpenAI-compatible endpoint, retried with a backoff, streamed.

The openai SDK (and with it httpx) is imported when a call is made, not when a model is built
or this module imported, so that `import conversa` stays cheap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from .._redact import redact_url
from ._discovery import (
    DEFAULT_MODEL,
    PLACEHOLDER_API_KEY,
    Endpoint,
    configure,
    env,
    timeout_from_env,
)
from ._errors import ErrorTranslator, translatable
from ._parse import StreamState, read_completion
from ._protocol import (
    ModelResponse,
    RetryNotice,
    StreamEvent,
    WireMessage,
    build_response,
)

if TYPE_CHECKING:
    import openai

# one logger for the whole package, whichever module logs
log = logging.getLogger("conversa.model")


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
        if client is not None:
            endpoint = Endpoint(
                model=model or env("CONVERSA_MODEL") or DEFAULT_MODEL,
                base_url=str(client.base_url).rstrip("/"),
                api_key=client.api_key or PLACEHOLDER_API_KEY,
            )
            max_retries = client.max_retries
        else:
            endpoint = configure(model, api_key, base_url)
        self.base_url = endpoint.base_url
        self.name: str = endpoint.model
        self.timeout = timeout if timeout is not None else timeout_from_env()
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.on_retry = on_retry
        self._api_key = endpoint.api_key
        self._client = client
        self._owns_client = client is None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._shown_url = redact_url(self.base_url)  # what messages show: no password
        found = endpoint.found_locally
        where = f"{found} at {self._shown_url}" if found else self._shown_url
        self.description = f"{self.name} via {where}"
        if found:
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
        params = self._params(messages, tools, options)
        started = time.monotonic()
        try:
            completion = await self._get_client().chat.completions.create(**params)
            return read_completion(completion, self.name, started)
        except translatable() as exc:
            raise self._errors().translate(exc, tools) from exc

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
            state = StreamState()
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
                    raise self._errors().translate(exc, tools) from exc
                if state.yielded or attempts_left <= 0:
                    stalled = isinstance(exc, openai.APITimeoutError)
                    raise self._errors().dropped(state.yielded, stalled=stalled) from exc
                drops += 1
                delay = self.retry_backoff * 2 ** (drops - 1)
                log.info("stream from %s dropped; retrying in %.3gs", self._shown_url, delay)
                notice = RetryNotice("the answer stream broke", delay, drops, self.max_retries)
                self._notify_retry(notice)
                await asyncio.sleep(delay)
                continue
            except translatable() as exc:
                raise self._errors().translate(exc, tools) from exc
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

    def _errors(self) -> ErrorTranslator:
        # built when needed, from the settings as they are now (they are public attributes)
        return ErrorTranslator(
            url=self._shown_url,
            model=self.name,
            timeout=self.timeout,
            max_retries=self.max_retries,
            api_key=self._api_key,
        )

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


def _retry_reason(status: int | None) -> str:
    if status == 429:
        return "rate limited"
    if status is None:
        return "no answer"
    return f"the server answered HTTP {status}"
