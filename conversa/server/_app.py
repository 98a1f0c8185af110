"""create_app: the ASGI app of ``conversa serve``, for embedding with your own tools."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from typing import TYPE_CHECKING, Any

from ..session import DEFAULT_TURN_WAIT
from ..storage import open_storage
from ._auth import Authenticator, check_tokens
from ._body import DEFAULT_MAX_BODY
from ._service import Service
from ._sessions import DEFAULT_LIVE_MESSAGES, DEFAULT_LIVE_SESSIONS

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..events import Approver
    from ..model import ChatModel
    from ..storage import ConversationStorage
    from ..tools import Tool


def create_app(
    *,
    storage: str | PathLike[str] | ConversationStorage = "sessions",
    model: str | ChatModel | None = None,
    tools: Iterable[Tool | Callable[..., Any]] = (),
    system_prompt: str | None = None,
    max_iterations: int = 10,
    approve: Approver | None = None,
    auth: Mapping[str, str] | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    turn_wait: float | None = DEFAULT_TURN_WAIT,
    live_sessions: int = DEFAULT_LIVE_SESSIONS,
    live_messages: int = DEFAULT_LIVE_MESSAGES,
) -> FastAPI:
    """The HTTP app: native threads, Distri session values and DCAF's chat protocol.

    ``storage`` a URL, path or storage object (one opened here is closed with the app);
    ``model`` a name or ChatModel (None: from the environment); ``tools`` and
    ``system_prompt`` as for a Session; ``approve(name, arguments)`` decides tools that need
    approval (None: they are denied on the native API, and DCAF's client is asked);
    ``auth`` maps bearer tokens to user ids ("*": administrator; None: no auth);
    ``max_body`` bytes per request body; ``turn_wait`` seconds a change waits for another
    turn on the thread before a 409; ``live_sessions`` threads whose Session (and cached
    history) is kept between requests, so a turn does not read its whole thread again, and
    ``live_messages`` the most messages those Sessions may cache in all.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from . import _dcaf, _errors, _health, _threads, _values

    if max_body < 1:
        raise ValueError("max_body must be at least 1 byte")
    if live_sessions < 0 or live_messages < 0:
        raise ValueError("live_sessions and live_messages must be 0 or more")
    store = open_storage(storage)
    owned = store is not storage
    service = Service(
        storage=store,
        model=model,
        tools=tools,
        system_prompt=system_prompt,
        max_iterations=max_iterations,
        approve=approve,
        turn_wait=turn_wait,
        max_body=max_body,
        live_sessions=live_sessions,
        live_messages=live_messages,
    )
    authenticator = Authenticator(None if auth is None else check_tokens(dict(auth)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        try:
            yield
        finally:
            if owned:
                await store.close()

    app = FastAPI(
        title="conversa",
        summary="Persistent multi-turn LLM conversations over HTTP",
        version=_version(),
        lifespan=lifespan,
    )
    _errors.install(app)

    app.include_router(_health.router(service))
    app.include_router(_threads.router(service))
    app.include_router(_values.router(service))
    app.include_router(_dcaf.router(service))
    app.state.conversa = service
    app.state.conversa_auth = authenticator
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("conversa-ai")
    except PackageNotFoundError:  # pragma: no cover (running from a source tree)
        return "0"
