"""Request and response interceptors in either shape, adapted once to the loop's own.

An interceptor is ``fn(x, session)`` (conversa's documented form) or ``fn(x)`` (DCAF's), sync
or async; the sync state changes it makes are stored when it returns.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from .events import (
    InterceptedResponse,
    ModelRequest,
    RequestInterceptor,
    ResponseInterceptor,
    maybe_await,
)
from .model import ModelResponse
from .state import SessionState


def _takes_one_argument(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is called as ``fn(x)`` (DCAF's shape) rather than ``fn(x, session)``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False  # no signature to read (a builtin): the documented two-argument form
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # whatever can take the session as a second argument gets it, as it always did
    return len(positional) == 1 and not any(p.kind is p.VAR_POSITIONAL for p in parameters)


def adapt_request_interceptors(
    interceptors: Sequence[RequestInterceptor], state: SessionState | None
) -> list[RequestInterceptor]:
    """Each interceptor as ``(request, session)``, its shape read once, here, not per call.

    Each call sees ``request.session``; the sync state changes it makes are stored when it
    returns.
    """
    return [_request_hook(fn, _takes_one_argument(fn), state) for fn in interceptors]


def adapt_response_interceptors(
    interceptors: Sequence[ResponseInterceptor], state: SessionState | None
) -> list[ResponseInterceptor]:
    """Each interceptor as ``(response, session) -> ModelResponse | None`` (see the request
    ones); a one-argument interceptor gets an InterceptedResponse."""
    return [_response_hook(fn, _takes_one_argument(fn), state) for fn in interceptors]


def _request_hook(
    fn: RequestInterceptor, one: bool, state: SessionState | None
) -> RequestInterceptor:
    async def hook(request: ModelRequest, session: Any) -> ModelRequest | None:
        request.session = session
        changed = await _in_scope(state, lambda: fn(request) if one else fn(request, session))
        return changed if isinstance(changed, ModelRequest) else None

    return hook


def _response_hook(
    fn: ResponseInterceptor, one: bool, state: SessionState | None
) -> ResponseInterceptor:
    async def hook(response: ModelResponse, session: Any) -> ModelResponse | None:
        if not one:
            changed = await _in_scope(state, lambda: fn(response, session))
            return changed if isinstance(changed, ModelResponse) else None
        message = response.message
        view = InterceptedResponse(
            text=message.text,
            tool_calls=[c.to_openai() for c in message.tool_calls],
            usage=response.usage,
            session=session,
            raw=response,
        )
        changed = await _in_scope(state, lambda: fn(view))
        if isinstance(changed, ModelResponse):
            return changed
        if isinstance(changed, InterceptedResponse):
            view = changed
        if view.text == message.text:
            return None
        new = message.replace(content=view.text) if view.text or message.content else message
        return dataclasses.replace(response, message=new)

    return hook


async def _in_scope(state: SessionState | None, call: Callable[[], Any]) -> Any:
    """Call a (sync or async) interceptor; store its sync state changes once it returned."""
    if state is None:
        return await maybe_await(call())
    result, changes = await state.collecting(lambda: maybe_await(call()))
    await state.commit(changes)
    return result
